"""Option groups shared by the verbs (one name per concept: `--data`, `--max-docs`, `--out` everywhere), the checks
that run before any work starts, and the settings a resumed run must share."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = [
    "add_model",
    "add_data",
    "text_col_arg",
    "add_docs",
    "add_classifier_data",
    "add_labels",
    "label_options",
    "classifier_data",
    "add_self_training",
    "add_output",
    "add_checkpoint",
    "add_training",
    "check_args",
    "settings_of",
    "start_run",
]

DATA_FORMS = (
    "CSV (.csv, .csv.gz), TSV, parquet or JSON-lines (.jsonl, .jsonl.gz) file, .txt/.txt.gz corpus, or a token "
    "store (tokenize)"
)


def add_model(
    p: argparse.ArgumentParser, help: str = "model folder (save_pretrained layout) or hub name", required: bool = True
):
    p.add_argument("--model", required=required, help=help)


def add_data(
    p: argparse.ArgumentParser, labels: bool = False, required: bool = True, cache: bool = True, former: tuple = ()
):
    "--data (`former`: older names it also answers to) and --text-col; with `labels` --label-col and --valid-col."
    forms = DATA_FORMS + (", or a folder laid out as train/<label>/*.txt" if labels else "")
    p.add_argument("--data", *former, required=required, help=forms)
    p.add_argument(
        "--text-col",
        default="text",
        type=text_col_arg,
        help="column with the texts (default: text); two comma-separated for pairs of texts (FIRST,SECOND)",
    )
    if labels:
        p.add_argument("--label-col", default="label", help="column with the labels (default: label)")
        p.add_argument(
            "--valid-col",
            default="is_valid",
            help="boolean column marking validation rows (default: is_valid; random 20%% split if absent)",
        )
    if cache:
        p.add_argument(
            "--cache",
            help="token store cache: a file is tokenized once and reused while it and the "
            "tokenizer are unchanged (default: $ULMFIT_TX_CACHE or ~/.cache/ulmfit_tx/stores)",
        )


def text_col_arg(value: str) -> str | list:
    "--text-col's value: a column name, or the two names of a pair's columns (`a,b`)."
    cols = [c.strip() for c in value.split(",")]
    return cols[0] if len(cols) == 1 else cols


def add_docs(p: argparse.ArgumentParser, former: tuple = ()):
    "--docs and --max-docs (`former`: older names it also answers to): what a document is, and how many to read."
    p.add_argument(
        "--docs",
        default="lines",
        choices=["lines", "files", "articles"],
        help="for .txt/.txt.gz data: a document is a line, the file, or a WikiText article (' = Title = ')",
    )
    p.add_argument("--max-docs", *former, type=int, help="use only the first N documents")


def add_classifier_data(p):
    "--max-len and --truncate: how texts become classifier inputs (train-clf and lr-find)."
    p.add_argument(
        "--max-len",
        type=int,
        help="tokens per text (default 256; memory encoders: up to 2048, whole reviews read segment by segment)",
    )
    p.add_argument(
        "--truncate",
        default="head",
        choices=["head", "head+tail"],
        help="keep the start of long texts, or the start and the end",
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=1,
        help="chunk-and-pool: encode up to N chunks of --max-len tokens a text and pool them (whole documents); "
        "--truncate applies beyond N chunks (default 1: one sequence)",
    )


def add_labels(p: argparse.ArgumentParser):
    "--task, --label-delim and --classes: what the label column(s) hold (with --label-col of `add_data`)."
    p.add_argument(
        "--task",
        choices=["single_label", "multi_label", "regression"],
        help="what to predict: one class a text, any set of classes, or a number (default: multi_label for several "
        "--label-col columns or a --label-delim, else single_label)",
    )
    p.add_argument(
        "--label-delim",
        help="multi_label from one column: the separator between a text's class names (e.g. ';'); "
        "or give several 0/1 columns as --label-col a,b,c",
    )
    p.add_argument("--classes", help="the classes, comma-separated, in output order: any other label is refused")


def label_options(a: argparse.Namespace) -> dict:
    "The label options as `clas_dataloaders` / `build_store` arguments (label_col, task, label_delim, classes)."
    cols = [c.strip() for c in a.label_col.split(",")] if a.label_col else []
    return dict(
        label_col=cols[0] if len(cols) == 1 else (cols or None),
        task=a.task,
        label_delim=a.label_delim,
        classes=[c.strip() for c in a.classes.split(",")] if a.classes else None,
    )


def classifier_data(a: argparse.Namespace):
    "The classifier DataLoaders the data options describe; sets `a.max_len` to the model's default when not given."
    from ..data import clas_dataloaders
    from ..models import default_clf_max_len

    a.max_len = a.max_len or default_clf_max_len(a.model)
    labels = label_options(a)
    return clas_dataloaders(
        a.data,
        a.model,
        a.text_col,
        labels.pop("label_col"),
        a.valid_col,
        **labels,
        seed=a.seed,
        max_len=a.max_len,
        truncate=a.truncate,
        chunks=a.chunks,
        bs=a.bs,
        cache=a.cache,
    )


def add_self_training(p: argparse.ArgumentParser):
    "--unlabelled and the --self-train-* options (`selftrain.self_train` after the classifier)."
    g = p.add_argument_group("self-training on unlabelled texts, after the classifier")
    g.add_argument(
        "--unlabelled", help="unlabelled texts of the same domain: CSV/TSV/parquet (--text-col) or .txt, one per line"
    )
    g.add_argument("--self-train-rounds", type=int, help="rounds of pseudo-labelling then training (default 1)")
    g.add_argument(
        "--self-train-threshold", type=float, default=0.9, help="class probability a pseudo-label needs (default 0.9)"
    )
    g.add_argument("--self-train-epochs", type=int, default=2, help="epochs of each round (every layer trains)")
    g.add_argument("--self-train-per-class", type=int, help="at most this many pseudo-labels per class and round")


def add_output(p: argparse.ArgumentParser, required: bool = True):
    p.add_argument("--out", required=required, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def add_checkpoint(p: argparse.ArgumentParser):
    "--checkpoint-steps, --resume, --keep-checkpoints, and --report-to (the run's logs, kept beside its checkpoint)."
    p.add_argument("--checkpoint-steps", type=int, help="checkpoint every N training steps too (default: every epoch)")
    p.add_argument("--resume", action="store_true", help="continue this command's interrupted run from OUT.checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.checkpoint when the run finishes")
    p.add_argument(
        "--report-to",
        default="none",
        help="log every epoch to csv, tensorboard and/or wandb (comma-separated; fastai's callbacks): written to "
        "OUT.checkpoint/logs while the run goes on, then kept in OUT/logs (wandb: WANDB_MODE=offline writes there "
        "too; WANDB_PROJECT names the project; tensorboard and wandb: pip install 'ulmfit_tx[report]')",
    )


def add_training(
    p: argparse.ArgumentParser,
    bs: int = 16,
    lr: float | None = None,
    epochs: int = 1,
    lr_help: str | None = None,
    epochs_help: str = "epochs",
    fit: bool = True,
):
    "--bs, --seed and --precision; with `fit` also --lr and --epochs."
    p.add_argument("--bs", type=int, default=bs, help="batch size")
    if fit:
        p.add_argument("--lr", type=float, default=lr, help=lr_help)
        p.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    p.add_argument("--seed", type=int, default=42, help="random seed (splits, masking, initialisation)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: bf16 mixed precision on a GPU that has it (else fp16) and on a CPU with AMX or "
        "AVX512-BF16, else fp32",
    )


NUMERIC = (
    "max_len",
    "bs",
    "epochs",
    "lr",
    "max_docs",
    "vocab_size",
    "layers",
    "hidden",
    "heads",
    "top_k",
    "div",
    "checkpoint_steps",
    "encoder_div",
    "evidence",
    "reindex_every",
    "retrieval_layer",
    "self_layers",
    "cross_layers",
    "temperature",
    "chunks",
    "self_train_rounds",
    "self_train_epochs",
    "self_train_per_class",
)


def check_args(a: argparse.Namespace):
    "Refuse numeric options out of range and data paths that do not exist, before any work starts."
    from ..errors import UlmfitError, check_positive

    for name in ("data", "valid", "unlabelled"):
        path = getattr(a, name, None)
        if path is not None and not Path(path).exists():
            raise UlmfitError(f"{path}: no such file or folder (--{name})")
    check_positive(**{n: getattr(a, n) for n in NUMERIC if hasattr(a, n)})


NOT_SETTINGS = ("resume", "keep_checkpoints", "force", "debug", "cache", "checkpoint_steps", "command", "report_to")


def settings_of(a: argparse.Namespace) -> dict:
    "The options that decide what a run computes: a resumed run must have the same."
    return {k: v for k, v in vars(a).items() if k not in NOT_SETTINGS}


def start_run(a: argparse.Namespace):
    "Check the options, then set up the `Run` that writes --out (checkpoint, resume, seed)."
    from ..run import Run

    check_args(a)
    return Run(a.out, a.force, a.resume, a.checkpoint_steps, a.keep_checkpoints, settings_of(a), a.seed, a.report_to)
