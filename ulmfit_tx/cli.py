"""The `ulmfit-tx` command line: the same flows as the Python API (MLM fine-tuning, classifier
training, prediction, fill-mask, learning-rate finder), with progress bars, metrics and plots."""
from __future__ import annotations

import argparse
import csv
import itertools
import shutil
from contextlib import contextmanager, nullcontext
import json
import os
import sys
import warnings
from pathlib import Path

__all__ = ["main", "run", "build_parser"]

_DEFAULT_LR = {"mlm": 2e-4, "ulmfit": 2e-3, "one-cycle": 1e-4}


def _data_args(p, labels: bool = True):
    "Options shared by the commands that read training data."
    p.add_argument("--model", required=True, help="model folder (save_pretrained layout) or hub name")
    p.add_argument("--data", required=True, help="CSV (.csv, .csv.gz), TSV or parquet file" + (
        ", a folder laid out as train/<label>/*.txt" if labels else ", .txt/.txt.gz corpus") + ", or a token store (tokenize)")
    _cache_arg(p)
    p.add_argument("--text-col", default="text", help="column with the texts (default: text)")
    if labels:
        p.add_argument("--label-col", default="label", help="column with the labels (default: label)")
        p.add_argument("--valid-col", default="is_valid",
                       help="boolean column marking validation rows (default: is_valid; random 20%% split if absent)")
        p.add_argument("--truncate", default="head", choices=["head", "head+tail"],
                       help="keep the start of long texts, or the start and the end")
    p.add_argument("--max-len", type=int, help="tokens per text (default 256) or block (default 128); memory encoders: "
                   "per text (default 2048: whole reviews, read segment by segment) or per row and batch (2 segments)")
    p.add_argument("--bs", type=int, default=16, help="batch size")
    p.add_argument("--seed", type=int, default=42, help="random seed (splits, masking, initialisation)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: bf16 mixed precision on a GPU that has it (else fp16) and on a CPU with AMX or AVX512-BF16, else fp32")


def _cache_arg(p):
    p.add_argument("--cache", help="token store cache: a file is tokenized once and reused while it and the tokenizer "
                   "are unchanged (default: $ULMFIT_TX_CACHE or ~/.cache/ulmfit_tx/stores)")


def _out_args(p):
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def _checkpoint_args(p):
    p.add_argument("--checkpoint-steps", type=int, help="checkpoint every N training steps too (default: every epoch)")
    p.add_argument("--resume", action="store_true", help="continue this command's interrupted run from OUT.checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.checkpoint when the run finishes")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ulmfit-tx", description=__doc__)
    ap.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune-lm", help="fine-tune an encoder as a masked language model on your texts")
    _data_args(p, labels=False)
    _out_args(p)
    _checkpoint_args(p)
    p.add_argument("--epochs", type=int, default=1, help="epochs training every layer")
    p.add_argument("--lr", type=float, default=_DEFAULT_LR["mlm"])
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs training the MLM head (and the word embeddings "
                   "tied to it) alone first, on the frozen encoder layers, as fastai's language-model recipe does "
                   "(0: every layer from the first step, the recipe before issue 17)")
    p.add_argument("--warmup-lr", type=float, help="learning rate of those epochs (default 10 x --lr)")
    p.add_argument("--div", type=float, help="discriminative rates after the warm-up: --lr for the head and embeddings, "
                   "each encoder layer below this factor lower (default: one rate; ULMFiT's AWD-LSTM used 2.6)")
    p.add_argument("--mode", choices=["blocks", "docs", "segments"],
                   help="concatenate into blocks, one item per text, or whole texts in order (default: segments for "
                        "memory encoders, else blocks)")
    p.add_argument("--mlm-prob", type=float, default=0.15, help="share of tokens chosen for prediction")
    p.add_argument("--whole-word", action="store_true", help="choose whole words")
    p.add_argument("--valid-pct", type=float, default=0.1, help="share of texts held out for the metrics")
    p.add_argument("--valid", help="held-out texts for the metrics instead (same forms as --data)")
    p.add_argument("--docs", default="lines", choices=["lines", "files", "articles"],
                   help="for .txt/.txt.gz data: a document is a line, the file, or a WikiText article")
    p.add_argument("--max-rows", type=int, help="use only the first N texts")

    p = sub.add_parser("tokenize", help="tokenize a corpus into a token store (memory-mapped ids, offsets, labels)")
    p.add_argument("--model", required=True, help="model folder or hub name whose tokenizer to use")
    p.add_argument("--data", required=True, help="CSV/TSV/parquet file, IMDb-layout folder, or .txt/.txt.gz corpus")
    _out_args(p)
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", help="column with the labels, stored as class ids (default: none)")
    p.add_argument("--valid-col", default="is_valid", help="boolean column of validation rows, stored if present")
    p.add_argument("--docs", default="lines", choices=["lines", "files", "articles"],
                   help="for .txt/.txt.gz data: a document is a line, the file, or a WikiText article")
    p.add_argument("--max-docs", type=int, help="tokenize only the first N documents")

    p = sub.add_parser("pretrain", help="train a tokenizer and a new encoder from scratch with the MLM objective")
    p.add_argument("--corpus", required=True, help=".txt/.txt.gz file, folder of them, or CSV/parquet with --text-col")
    _cache_arg(p)
    p.add_argument("--arch", default="scratch", choices=["bert", "roberta", "albert", "scratch", "memxl", "compressive"])
    _out_args(p)
    _checkpoint_args(p)
    p.add_argument("--valid", help="held-out corpus for the metrics (default: 5%% of the documents)")
    p.add_argument("--docs", default="lines", choices=["lines", "files", "articles"],
                   help="what a document is: a line, a file, or a WikiText article (' = Title = ' lines)")
    p.add_argument("--text-col", default="text", help="column of a CSV/parquet corpus")
    p.add_argument("--max-docs", type=int, help="use only the first N documents")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-len", type=int, default=128, help="block length; memory encoders: segment length")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout while pretraining (default 0: faster learning); the saved config keeps the default")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])

    p = sub.add_parser("pretrain-marge", help="adapt an encoder to your texts with Marge (retrieval and reconstruction) "
                       "instead of MLM; the encoder folder it writes is a --model for train-clf and finetune-lm")
    p.add_argument("--data", required=True, help="CSV/TSV/parquet file, .txt/.txt.gz corpus, or a token store (tokenize)")
    p.add_argument("--model", required=True, help="encoder folder or hub name (BERT, RoBERTa, ALBERT, DistilBERT, scratch): "
                   "a new decoder is added; or a Marge folder (OUT/marge) to continue")
    p.add_argument("--from-config", action="store_true", help="build the encoder from --model's config with fresh weights")
    _out_args(p)
    _checkpoint_args(p)
    _cache_arg(p)
    p.add_argument("--text-col", default="text", help="column with the texts (default: text)")
    p.add_argument("--docs", default="lines", choices=["lines", "files", "articles"],
                   help="for .txt/.txt.gz data: a document is a line, the file, or a WikiText article")
    p.add_argument("--max-docs", type=int, help="use only the first N documents")
    p.add_argument("--max-len", type=int, default=128, help="tokens per chunk: long documents are cut into chunks")
    p.add_argument("--evidence", type=int, default=4, help="evidence chunks per target")
    p.add_argument("--reindex-every", type=int, help="training steps between neighbour-table rebuilds (default: each stage's start)")
    p.add_argument("--retrieval-layer", type=int, help="encoder layers before the document embedding (default: half)")
    p.add_argument("--self-layers", type=int, help="decoder layers with self-attention only (default 2)")
    p.add_argument("--cross-layers", type=int, help="then decoder layers with cross-attention over the evidence (default 2)")
    p.add_argument("--same-doc", action="store_true", help="allow evidence from the target's own document (other chunks)")
    p.add_argument("--index", default="torch", choices=["torch", "faiss"],
                   help="exact nearest-neighbour search: blocked matrix products in torch, or faiss (when installed)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs training the new decoder on the frozen encoder")
    p.add_argument("--epochs", type=int, default=1, help="then epochs training everything")
    p.add_argument("--lr", type=float, default=3e-3, help="warm-up learning rate; then the decoder trains at lr/3")
    p.add_argument("--encoder-div", type=float, help="after the warm-up the encoder trains this many times slower than the "
                   "decoder (default 10; 1 with --from-config)")
    p.add_argument("--bs", type=int, default=8, help="targets per batch")
    p.add_argument("--valid-pct", type=float, default=0.05, help="share of documents whose chunks are held-out targets")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])

    p = sub.add_parser("train-clf", help="train a classifier on top of an encoder (ULMFiT schedule by default)")
    _data_args(p)
    _out_args(p)
    _checkpoint_args(p)
    p.add_argument("--epochs", type=int, default=1,
                   help="one-cycle: epochs of the single fit; ulmfit: epochs of the last (all layers) stage")
    p.add_argument("--lr", type=float, help="ulmfit: head learning rate of stage 1 (default 2e-3); one-cycle: 1e-4")
    p.add_argument("--schedule", default="ulmfit", choices=["ulmfit", "one-cycle"])
    p.add_argument("--div", type=float, help="ulmfit: factor between the learning rates of consecutive layer groups "
                   "(default 1.2, the library's LAYER_DIV; ULMFiT's AWD-LSTM used 2.6)")
    p.add_argument("--head", default="pooling", choices=["pooling", "native"],
                   help="ULMFiT concat-pooling head, or the architecture's own (also saved as a HF folder)")

    p = sub.add_parser("predict", help="labels and probabilities from an exported classifier")
    p.add_argument("--model", required=True, help="folder written by train-clf (a bundle: config, safetensors, tokenizer, "
                   "ulmfit_tx.json), or learn.export_bundle")
    p.add_argument("--trust-pickle", action="store_true", help="load a folder's export.pkl when it has no bundle: a pickle "
                   "runs any code its author put in it, so only for files you made or trust")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch: the bundle's weights; onnx: its ONNX graph on ONNX Runtime (written by export-onnx)")
    p.add_argument("--int8", action="store_true", help="onnx: the int8 graph (model.int8.onnx, export-onnx --int8)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="CSV/parquet file of texts, or a token store made with the model's tokenizer")
    src.add_argument("--text", action="append", help="a text (repeat for several)")
    p.add_argument("--text-col", default="text")
    p.add_argument("--out", help="CSV file to write (default: print)")
    p.add_argument("--bs", type=int, default=64)

    p = sub.add_parser("export-onnx", help="a classifier bundle's ONNX graph for ONNX Runtime, checked against PyTorch")
    p.add_argument("--model", required=True, help="a bundle folder (train-clf's output, or learn.export_bundle)")
    p.add_argument("--int8", action="store_true", help="quantize the weights of the matrix products to int8 (dynamic)")
    p.add_argument("--out", help="the .onnx file (default: MODEL/model.onnx, or MODEL/model.int8.onnx with --int8); "
                   "the config, tokenizer and ulmfit_tx.json are kept beside it")
    p.add_argument("--force", action="store_true", help="replace an existing ONNX file")

    p = sub.add_parser("fill-mask", help="top-k tokens for every [MASK] or <mask> in a sentence")
    p.add_argument("--model", required=True, help="MLM model folder (e.g. from finetune-lm) or hub name")
    p.add_argument("text")
    p.add_argument("--top-k", type=int, default=5)

    p = sub.add_parser("lr-find", help="fastai's learning-rate finder: suggestions and a PNG plot")
    _data_args(p)
    _out_args(p)
    p.add_argument("--task", default="clf", choices=["clf", "mlm"])
    return ap


_NOT_SETTINGS = ("resume", "keep_checkpoints", "force", "debug", "cache", "checkpoint_steps", "command")


def _checkpoint(a):
    """The run's `CheckpointCallback` in OUT.checkpoint, loaded with --resume (and checked against this command's
    settings); an interrupted run's checkpoint is never silently overwritten."""
    from .checkpoint import CKPT, CheckpointCallback
    from .errors import UlmfitError
    folder = Path(str(a.out).rstrip("/") + ".checkpoint")
    if not a.resume and (folder / CKPT).exists():
        if not a.force:
            raise UlmfitError(f"{folder}: an interrupted run's checkpoint is there; pass --resume to continue it, "
                              "--force to start again without it, or delete it")
        shutil.rmtree(folder)
    settings = {k: v for k, v in vars(a).items() if k not in _NOT_SETTINGS}
    return CheckpointCallback(folder, a.checkpoint_steps, settings, resume=a.resume, defer_last=not a.keep_checkpoints)


@contextmanager
def _finishing(ckpt, keep: bool):
    """Around writing a run's outputs: if that fails, the checkpoint of the trained weights (held back by
    `defer_last`) is written, so `--resume` writes the outputs without training again; if it succeeds, the
    checkpoint folder is removed unless --keep-checkpoints."""
    try: yield
    except BaseException:
        ckpt.save_deferred()
        raise
    if not keep: ckpt.remove()


def _train(learn, stages) -> list:
    """`fit_stages`: in one process, or, under a distributed launcher (torchrun), on every process with fastai's
    `distrib_ctx` (the data sharded by batches, the validation metrics over all ranks' rows). Returns the validation
    values of the final weights: the last epoch's (a fit validates after every epoch, so no second pass), or a
    `validate`'s when no epoch ran (a resumed run whose checkpoint was taken after the last stage)."""
    from fastai.torch_core import num_distrib

    from .learner import fit_stages
    with (learn.distrib_ctx() if num_distrib() > 1 else nullcontext()):
        fit_stages(learn, stages)
        values = getattr(learn.recorder, "values", None)                   # (set by the fit's first epoch)
        return list(values[-1][1:]) if values else learn.validate()


def _run_stats(learn, hist, samples: int) -> dict:
    "Seconds spent training and validating (from `LossHistory`), the training throughput, and the precision used."
    from .learner import precision_of
    return dict(train_time_s=hist.train_seconds, valid_time_s=hist.valid_seconds,
                train_samples_per_s=samples / hist.train_seconds if hist.train_seconds else None,
                precision=precision_of(learn))


def _quiet_libraries(debug: bool):
    "Keep transformers' load reports out of the console unless --debug."
    import transformers
    if not debug: transformers.logging.set_verbosity_error()
    try: transformers.utils.logging.disable_progress_bar()
    except AttributeError: pass


def _say(msg: str):
    "Print on the process of rank 0 only (the only one in a single-process run)."
    from .distributed import is_rank0
    if is_rank0(): print(msg)


def _write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, default=float) + "\n")


def _seed(seed: int):
    from fastai.torch_core import set_seed
    set_seed(seed, reproducible=True)


NEW_HEAD_NOTE = ("note: {model} has no masked-LM head (a sentence-embedding model, or an encoder saved without it); "
                 "a new one starts from scratch (--warmup-epochs trains it first). If the encoder was not pretrained as "
                 "a masked LM (all-MiniLM-L6-v2 was trained on sentence pairs), this stage was measured not to improve "
                 "its classifier: README, 'Is stage 2 worth it?'")


def finetune_lm(a):
    from .encoders import MEMORY_MODEL_TYPES
    from .io import check_out_dir
    from .learner import mlm_learner, mlm_stages
    from .mlm import mlm_dataloaders
    from .models import load_config
    from .plots import LossHistory
    from .store import as_store
    from .tokenize import HFTokenizer
    _check_args(a)
    check_out_dir(a.out, a.force)
    ckpt = _checkpoint(a)
    _seed(a.seed)
    config, tfm = load_config(a.model), HFTokenizer(a.model)
    opts = dict(text_col=a.text_col, docs=a.docs, unk=tfm.tok.unk_token)
    store = as_store(a.data, tfm, a.cache, **opts, max_docs=a.max_rows)
    valid = as_store(a.valid, tfm, a.cache, **opts) if a.valid else None
    memory = config.model_type in MEMORY_MODEL_TYPES
    mode = a.mode or ("segments" if memory else "blocks")
    max_len = a.max_len or (2 * config.segment_len if memory else 128)
    dls = mlm_dataloaders(store, tfm.tok, a.text_col, max_len, mode, a.valid_pct, valid, bs=a.bs, seed=a.seed,
                          mlm_prob=a.mlm_prob, whole_word=a.whole_word)
    hist = LossHistory()
    learn = mlm_learner(dls, a.model, precision=a.precision, cbs=[hist, ckpt])
    if learn.model.new_head: _say(NEW_HEAD_NOTE.format(model=a.model))
    stages = mlm_stages(a.lr, a.epochs, a.warmup_epochs, a.warmup_lr, a.div)
    loss, acc, ppl = _train(learn, stages)
    metrics = dict(mlm_loss=loss, perplexity=ppl, masked_accuracy=acc, new_head=learn.model.new_head, epochs=a.epochs,
                   lr=a.lr, div=a.div, warmup_epochs=a.warmup_epochs,
                   warmup_lr=stages[0].lr if a.warmup_epochs else None, max_len=max_len, mode=mode,
                   n_train_items=len(dls.train_ds), n_valid_items=len(dls.valid_ds),
                   **_run_stats(learn, hist, (a.epochs + a.warmup_epochs) * len(dls.train_ds)))
    with _finishing(ckpt, a.keep_checkpoints): _save_mlm(learn, hist, metrics, a)
    _say(f"MLM fine-tuned: loss {loss:.4f}, perplexity {ppl:.2f}, masked-token accuracy {acc:.4f} -> {a.out}")
    return metrics


def _save_mlm(learn, hist, metrics: dict, a):
    "The MLM model folder: weights, tokenizer, metrics.json (with each epoch's metrics) and loss.png, written atomically."
    from .io import atomic_dir
    from .plots import plot_losses
    metrics["per_epoch"] = hist.epochs
    from .distributed import rank0_only
    with rank0_only() as main, (atomic_dir(a.out, a.force) if main else nullcontext()) as tmp:
        if not main: return
        learn.write_pretrained(tmp)
        _write_json(tmp / "metrics.json", metrics)
        plot_losses(hist, tmp / "loss.png")


def pretrain(a):
    from .io import check_out_dir, iter_corpus
    from .learner import Stage
    from .plots import LossHistory
    from .pretrain import pretrain_learner
    _check_args(a)
    check_out_dir(a.out, a.force)
    ckpt = _checkpoint(a)
    _seed(a.seed)
    texts = list(itertools.islice(iter_corpus(a.corpus, a.docs, a.text_col), a.max_docs)) if a.max_docs else a.corpus
    hist = LossHistory()
    learn = pretrain_learner(texts, a.arch, a.valid, a.vocab_size, a.max_len, a.layers, a.hidden, a.heads, a.bs, a.seed,
                             a.dropout, docs=a.docs, text_col=a.text_col, cache=a.cache, precision=a.precision,
                             cbs=[hist, ckpt])
    loss, acc, ppl = _train(learn, [Stage(None, a.epochs, a.lr)])
    n_params = sum(p.numel() for p in learn.model.parameters())
    metrics = dict(arch=a.arch, mlm_loss=loss, perplexity=ppl, masked_accuracy=acc, epochs=a.epochs, lr=a.lr, dropout=a.dropout,
                   max_len=a.max_len, vocab_size=len(learn.tokenizer.tok), parameters=n_params,
                   n_train_items=len(learn.dls.train_ds), n_valid_items=len(learn.dls.valid_ds),
                   **_run_stats(learn, hist, a.epochs * len(learn.dls.train_ds)))
    with _finishing(ckpt, a.keep_checkpoints): _save_mlm(learn, hist, metrics, a)
    _say(f"pretrained {a.arch} ({n_params / 1e6:.1f}M parameters): held-out perplexity {ppl:.2f}, "
          f"masked-token accuracy {acc:.4f}, {metrics['train_time_s']:.0f}s -> {a.out}")
    return metrics


def pretrain_marge(a):
    from .io import atomic_dir, check_out_dir
    from .learner import marge_learner, marge_stages
    from .plots import LossHistory, plot_losses
    from .retrieval import marge_dataloaders
    from .store import as_store
    from .tokenize import HFTokenizer
    _check_args(a)
    check_out_dir(a.out, a.force)
    ckpt = _checkpoint(a)
    _seed(a.seed)
    tfm = HFTokenizer(a.model, a.max_len)
    store = as_store(a.data, tfm, a.cache, text_col=a.text_col, docs=a.docs, unk=tfm.tok.unk_token, max_docs=a.max_docs)
    dls = marge_dataloaders(store, tfm.tok, a.max_len, a.evidence, a.valid_pct, a.bs, a.seed, exclude_same_doc=not a.same_doc,
                            backend=a.index)
    hist = LossHistory()
    decoder = {k: getattr(a, k) for k in ("self_layers", "cross_layers", "retrieval_layer") if getattr(a, k) is not None}
    learn = marge_learner(dls, a.model, a.from_config, a.reindex_every, a.precision, cbs=[hist, ckpt], **decoder)
    encoder_div = a.encoder_div or (1.0 if a.from_config else 10.0)
    loss, beta = _train(learn, marge_stages(a.lr, a.warmup_epochs, a.epochs, encoder_div=encoder_div))
    n_train = len(dls.train_ds)
    metrics = dict(valid_loss=loss, beta=beta, retrieval_layer=learn.model.hf.config.retrieval_layer, evidence=a.evidence,
                   n_chunks=len(dls.train.retriever.chunks), n_train_targets=n_train, n_valid_targets=len(dls.valid_ds),
                   warmup_epochs=a.warmup_epochs, epochs=a.epochs, lr=a.lr, encoder_div=encoder_div, max_len=a.max_len,
                   per_epoch=hist.epochs,
                   reindex=learn.reindexer.history, **_run_stats(learn, hist, (a.warmup_epochs + a.epochs) * n_train))
    with _finishing(ckpt, a.keep_checkpoints), atomic_dir(a.out, a.force) as tmp:
        learn.write_pretrained(tmp)                                      # OUT is the encoder folder train-clf reads
        learn.write_pretrained(tmp / "marge", learn.model.hf)            # the whole model, to continue training
        _write_json(tmp / "metrics.json", metrics)
        plot_losses(hist, tmp / "loss.png")
    _say(f"Marge: held-out reconstruction loss {loss:.4f}, beta {beta:.2f}, {metrics['train_time_s']:.0f}s -> {a.out} "
         f"(the encoder; the whole model in {Path(a.out) / 'marge'})")
    return metrics


def train_clf(a):
    from .data import clas_dataloaders
    from .io import atomic_dir, check_out_dir
    from fastai.torch_core import num_distrib

    from .learner import LAYER_DIV, Stage, classifier_learner, ulmfit_stages
    from .export import write_bundle
    from .plots import ConfusionCounts, LossHistory, plot_confusion_matrix, plot_losses
    _check_args(a)
    check_out_dir(a.out, a.force)
    ckpt = _checkpoint(a)
    _seed(a.seed)
    a.max_len = a.max_len or _clf_max_len(a.model)
    dls = clas_dataloaders(a.data, a.model, a.text_col, a.label_col, a.valid_col, seed=a.seed, max_len=a.max_len,
                           truncate=a.truncate, bs=a.bs, cache=a.cache)
    hist, counts = LossHistory(), ConfusionCounts()
    learn = classifier_learner(dls, a.model, head=a.head, precision=a.precision, cbs=[hist, counts, ckpt])
    lr = a.lr or _DEFAULT_LR[a.schedule]
    div = (LAYER_DIV if a.div is None else a.div) if a.schedule == "ulmfit" else None  # ulmfit_lrs checks it
    stages = ulmfit_stages(lr, (1, 1, 1, a.epochs), div=div) if a.schedule == "ulmfit" else [Stage(None, a.epochs, lr)]
    epochs = [st.epochs for st in stages]
    valid_loss, acc = _train(learn, stages)
    metrics = dict(accuracy=acc, valid_loss=valid_loss, schedule=a.schedule, epochs_per_stage=list(epochs),
                   passes=sum(epochs), lr=lr, div=div, head=a.head, max_len=a.max_len, bs=a.bs,
                   n_train=len(dls.train_ds), n_valid=len(dls.valid_ds), labels=[str(v) for v in dls.vocab],
                   processes=max(1, num_distrib()), **_run_stats(learn, hist, sum(epochs) * len(dls.train_ds)))
    from .distributed import rank0_only
    with _finishing(ckpt, a.keep_checkpoints), rank0_only() as main, \
            (atomic_dir(a.out, a.force) if main else nullcontext()) as tmp:
        if not main: return metrics
        learn.path = tmp
        learn.export("export.pkl")                                        # for fastai's load_learner
        write_bundle(learn.model, learn.tokenizer, list(dls.vocab), tmp)  # what predict loads: no pickle
        _write_json(tmp / "metrics.json", metrics)
        plot_losses(hist, tmp / "loss.png")
        plot_confusion_matrix(counts.counts, dls.vocab, tmp / "confusion_matrix.png")
        if a.head == "native":
            learn.write_pretrained(tmp / "hf")
    _say(f"classifier: validation accuracy {acc:.4f} ({len(dls.valid_ds)} rows), "
          f"{sum(epochs)} passes in {metrics['train_time_s']:.0f}s -> {a.out}")
    return metrics


def _clf_max_len(model) -> int:
    "256 tokens, or up to 2048 for memory encoders (they read long texts segment by segment)."
    from .encoders import MEMORY_MODEL_TYPES
    from .models import load_config
    config = load_config(model)
    return min(2048, config.max_position_embeddings) if config.model_type in MEMORY_MODEL_TYPES else 256


def _load_classifier(folder, trust_pickle: bool = False, backend: str = "torch", int8: bool = False):
    """The bundle in `folder` (nothing unpickled); only with --trust-pickle, and only when there is no bundle, its
    export.pkl through fastai's `load_learner`."""
    from .export import is_bundle
    from .learner import load_classifier
    pkl = Path(folder) / "export.pkl"
    if is_bundle(folder) or backend != "torch" or not (trust_pickle and pkl.is_file()):
        return load_classifier(folder, backend=backend, int8=int8)
    from fastai.learner import load_learner

    from .errors import UlmfitError
    try:
        with warnings.catch_warnings():  # fastai warns that pickles run code: the user said they trust this one
            warnings.simplefilter("ignore")
            return load_learner(pkl)
    except Exception as e: raise UlmfitError(f"{pkl}: cannot be loaded ({type(e).__name__}: {e})") from None


def predict(a):
    from .io import read_data
    learn = _load_classifier(a.model, a.trust_pickle, a.backend, a.int8)
    if a.text is not None:
        res = learn.predict_texts(a.text)
        res.insert(0, "text", [t if len(t) <= 60 else t[:57] + "..." for t in a.text])
        print(res.to_string(index=False))
        return res
    from .errors import check_texts
    from .store import TokenStore, is_store
    if is_store(a.data):  # a token store made with the model's tokenizer: one row per document, in order
        res = learn.predict_texts(TokenStore(a.data), bs=a.bs)
        first = ("doc", range(len(res)))
    else:
        df = read_data(a.data)
        check_texts(df, a.text_col, a.data)
        res = learn.predict_texts(df[a.text_col], bs=a.bs)
        first = (a.text_col, df[a.text_col].values)
    if a.out:
        tmp = Path(a.out).with_name(Path(a.out).name + ".tmp")
        res.insert(0, *first)
        # every text quoted: pandas leaves a field ending in a lone \r unquoted, which readers split into two rows
        res.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
        os.replace(tmp, a.out)
        print(f"{len(res)} predictions -> {a.out}")
    else: print(res.to_string())
    return res


def export_onnx_cmd(a):
    from .export import ONNX_FILES
    from .learner import load_classifier
    out = a.out or Path(a.model) / ONNX_FILES[a.int8]
    res = load_classifier(a.model).export_onnx(out, a.int8, force=a.force)
    print(f"{'int8' if a.int8 else 'float32'} ONNX model ({res['mb']:.1f} MB) in {res['seconds']:.1f}s -> {out}\n"
          f"checked against PyTorch on sample texts: probabilities within {res['max_abs_diff']:.1e}, "
          f"{res['agreement']:.0%} of labels equal")
    return res


def tokenize_cmd(a):
    from .store import build_store
    from .tokenize import HFTokenizer
    _check_args(a)
    tfm = HFTokenizer(a.model)
    store = build_store(a.data, tfm, a.out, a.text_col, a.label_col, a.valid_col, a.docs, tfm.tok.unk_token,
                        max_docs=a.max_docs, force=a.force)
    m = store.meta
    print(f"token store: {m['n_docs']:,} documents, {m['n_tokens']:,} tokens ({m['dtype']})"
          + (f", classes {m['classes']}" if m["classes"] else "") + f" in {m['seconds']:.1f}s -> {a.out}")
    return store


def _check_args(a):
    "Refuse numeric options out of range and data paths that do not exist, before any work starts."
    from .errors import UlmfitError, check_positive
    for name in ("data", "corpus", "valid"):
        path = getattr(a, name, None)
        if path is not None and not Path(path).exists(): raise UlmfitError(f"{path}: no such file or folder (--{name})")
    names = ("max_len", "bs", "epochs", "lr", "max_rows", "max_docs", "vocab_size", "layers", "hidden", "heads", "top_k",
             "div", "checkpoint_steps", "encoder_div", "evidence", "reindex_every", "retrieval_layer", "self_layers", "cross_layers")
    check_positive(**{n: getattr(a, n) for n in names if hasattr(a, n)})


def fill_mask_cmd(a):
    from .mlm import fill_mask
    from .models import masked_lm_model
    from .tokenize import HFTokenizer
    tfm = HFTokenizer(a.model)
    res = fill_mask(masked_lm_model(a.model, tfm.tok), tfm, a.text, a.top_k)
    for i, cands in enumerate(res, 1):
        print(f"mask {i}: " + ", ".join(f"{t} ({p:.3f})" for t, p in cands))
    return res


def lr_find_cmd(a):
    from .io import atomic_dir, check_out_dir
    from .plots import plot_lr_find
    _check_args(a)
    check_out_dir(a.out, a.force)
    _seed(a.seed)
    if a.task == "mlm":
        from .learner import mlm_learner
        from .mlm import mlm_dataloaders
        learn = mlm_learner(mlm_dataloaders(a.data, a.model, a.text_col, a.max_len or 128, bs=a.bs, seed=a.seed,
                                            cache=a.cache), a.model, precision=a.precision)
    else:
        from .data import clas_dataloaders
        from .learner import classifier_learner
        dls = clas_dataloaders(a.data, a.model, a.text_col, a.label_col, a.valid_col, seed=a.seed,
                               max_len=a.max_len or _clf_max_len(a.model), truncate=a.truncate, bs=a.bs, cache=a.cache)
        learn = classifier_learner(dls, a.model, precision=a.precision)
    with atomic_dir(a.out, a.force) as tmp:
        sugg = plot_lr_find(learn, tmp / "lr_find.png")
        _write_json(tmp / "lr_find.json", sugg)
    print("suggested learning rates: " + ", ".join(f"{k} {v:.2e}" for k, v in sugg.items()) + f" -> {a.out}")
    return sugg


COMMANDS = {"tokenize": tokenize_cmd, "pretrain": pretrain, "pretrain-marge": pretrain_marge, "finetune-lm": finetune_lm, "train-clf": train_clf, "predict": predict,
            "export-onnx": export_onnx_cmd, "fill-mask": fill_mask_cmd,
            "lr-find": lr_find_cmd}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from .errors import UlmfitError
    try:
        from .distributed import init_distributed
        init_distributed()  # joins the process group when torchrun (or accelerate launch) started this process
        _quiet_libraries(a.debug)
        COMMANDS[a.command](a)
    except (UlmfitError, FileNotFoundError, PermissionError) as e:
        if a.debug: raise
        print(f"ulmfit-tx {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from .checkpoint import Interrupted
        print(f"ulmfit-tx {a.command}: interrupted" + (f" ({e}); rerun the same command with --resume to continue"
                                                       if isinstance(e, Interrupted) else ""), file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The `ulmfit-tx` program: `main`, then exit without tearing the interpreter down. Freeing torch,
    transformers and fastai module by module took 1.2 s after every command (measured); exit handlers and
    finalizers still run, other threads are joined and output is flushed first, so nothing written is lost.
    Output piped into a reader that stops early (`| head`) ends the command quietly, with code 141."""
    import atexit
    import threading
    try: rc = main()
    except BrokenPipeError:   # the reader went away (`ulmfit-tx predict ... | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 141              # 128 + SIGPIPE, the shell's code for it
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon: t.join()
    atexit._run_exitfuncs()   # what the interpreter runs at exit: logging, temporary folders, weakref finalizers
    for f in (sys.stdout, sys.stderr):
        try: f.flush()
        except (AttributeError, OSError, ValueError): pass   # no stream, a closed pipe: as at a normal exit
    os._exit(rc)


if __name__ == "__main__": run()
