"""Speed of ulmfit_tx against what a user would otherwise run, at every text length: the Hugging Face Trainer
(with and without `group_by_length`), the `text-classification` pipeline, and the Trainer for MLM. Same IMDb texts,
same MiniLM-L6 weights, max_len, batch size, learning rate and epochs on both sides; every case runs in its own
process, the cases alternate in rounds (a slow spell of the machine hits all alike), medians are reported.

Precision: each side runs its default (ours: `precision="auto"`, bf16 mixed precision on a GPU or on a CPU with AMX
or AVX512-BF16; the Trainer: float32 unless told, bf16 on a GPU here as before), and, for a like-for-like
comparison, ours in float32 (`clf_ours_fp32`, `mlm_ours_fp32`) and the Trainer with `bf16=True` (`clf_trainer_bf16`,
`mlm_trainer_bf16`). The summary table gives the three pairings: defaults, bf16 against bf16, float32 against
float32. Inference runs in float32 on the CPU on both sides.

At each length L (32, 64, 128, 256, 512 tokens) the texts are the leading sentences of IMDb reviews, up to a seeded
random L/4 to 0.75 L words each (so lengths vary as real short texts do; at 512 many reviews are whole), labelled with
their review's label.
The number of texts falls as L grows (`--tokens` / L training texts), so each length trains for a similar time.

1. classifier, whole command: `ulmfit-tx train-clf --schedule one-cycle --epochs 1` against a Trainer script (read
   the CSV, tokenize, train, evaluate, save the model, write metrics), each timed from process start to exit, with
   the training loop's samples/s, the validation accuracy, and where the rest of the time went.
2. MLM fine-tuning loop: the same blocks of L tokens, `mlm_learner` against the Trainer with
   `DataCollatorForLanguageModeling`.
3. inference: `learn.predict_texts` on an exported learner against `pipeline("text-classification")`, same weights.

    python bench/speed.py                                  # CPU defaults (about 40 minutes on 2 cores)
    python bench/speed.py --tokens 1048576 --bs 32         # a GPU (bf16 on both sides)

Writes bench/results/speed/<tag>.json and .md, and a chart <tag>.png of the ratios per length (tag: the device
unless --tag).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from _common import (
    IMDB,
    WORK,
    device,
    length_data,
    minilm,
    out_dir,
    precision,
    reviews,
    run_case,
    run_one,
    sizes,
    trainer_args,
    trainer_examples,
    write_results,
)


def our_precision() -> str:
    "What `precision='auto'` picks here (ulmfit_tx's default)."
    from ulmfit_tx import default_precision

    return default_precision()


# ---- 1. the classifier command: ours is the CLI; theirs is this script run as `--case clf_trainer[_fixed]` ----


def clf_command(a, side: str, length: int, out: Path) -> list[str]:
    "The command line of one side of (1)."
    data = length_data(a, length) / "train.csv"
    common = ["--max-len", str(length), "--bs", str(a.bs), "--lr", str(a.lr), "--seed", str(a.seed)]
    if side.startswith("clf_ours"):
        return [
            sys.executable,
            "-m",
            "ulmfit_tx.cli",
            "train-clf",
            "--model",
            minilm(),
            "--data",
            str(data),
            "--out",
            str(out),
            "--cache",
            str(out.parent / "cache"),
            "--schedule",
            "one-cycle",
            "--epochs",
            "1",
            *common,
            *(["--precision", "fp32"] if side == "clf_ours_fp32" else []),
        ]
    return [sys.executable, __file__, "--case", side, "--csv", str(data), "--out", str(out), *common]


def run_command(cmd: list[str], out: Path) -> dict:
    "Run a whole command in a fresh process; its wall time from start to exit, and the metrics.json it wrote."
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {
        "wall_s": wall,
        "train_s": m["train_time_s"],
        "valid_s": m["valid_time_s"],
        "other_s": wall - m["train_time_s"] - m["valid_time_s"],
        "samples_per_s": m["train_samples_per_s"],
        "accuracy": m["accuracy"],
    }


def clf_trainer(a, fixed: bool = False, bf16: bool | None = None):
    """What a user writes with the Trainer: read the CSV, tokenize (dynamic padding with `group_by_length`, or fixed
    padding), train, evaluate once, save the model and tokenizer, write the metrics."""
    import numpy as np
    import pandas as pd
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        default_data_collator,
        set_seed,
    )

    set_seed(a.seed)  # before the model, so that the new head's initialisation is seeded too
    df = pd.read_csv(a.csv, keep_default_na=False)
    classes = sorted(df.label.unique())
    tok = AutoTokenizer.from_pretrained(minilm())

    train, valid = (
        trainer_examples(tok, part, classes, a.max_len, fixed) for part in (df[~df.is_valid], df[df.is_valid])
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm(),
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
    )
    accuracy = lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}
    args = trainer_args(a, a.out, a.lr, bf16, **({} if fixed else {"train_sampling_strategy": "group_by_length"}))
    tr = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=valid,
        compute_metrics=accuracy,
        data_collator=default_data_collator if fixed else DataCollatorWithPadding(tok),
    )
    t = tr.train().metrics["train_runtime"]
    ev = tr.evaluate()
    tr.save_model(a.out)
    tok.save_pretrained(a.out)
    Path(a.out, "metrics.json").write_text(
        json.dumps(
            {
                "accuracy": ev["eval_accuracy"],
                "train_time_s": t,
                "valid_time_s": ev["eval_runtime"],
                "train_samples_per_s": len(train) / t,
            }
        )
    )


# ---- 2. MLM fine-tuning loop and 3. inference: each returns the samples processed and the seconds it took ----


def _mlm_blocks(a):
    "The same MLM blocks for both sides: `mlm` blocks of `max_len` tokens from training reviews."
    from ulmfit_tx import BlockView, HFTokenizer, as_store

    tfm = HFTokenizer(minilm(), a.max_len)
    df, n, need = reviews(a, 25000), 0, sizes(a, a.max_len)["mlm"] + a.bs
    while True:
        n += 500
        store = as_store(df.text[:n].tolist(), tfm, cache=False)
        view = BlockView(store, range(len(store)), tfm)
        if len(view) >= need or n >= len(df):
            return [view[i][0].numpy() for i in range(min(need, len(view)))]


def mlm_ours(a, precision: str = "auto"):
    from fastai.data.core import Datasets, TfmdDL

    from ulmfit_tx import HFTokenizer, MaskTokens, PadTokens, mlm_learner
    from ulmfit_tx.plots import LossHistory

    blocks = _mlm_blocks(a)
    tfm = HFTokenizer(minilm(), a.max_len)
    n = len(blocks) - a.bs
    dsets = Datasets(blocks, tfms=[[tfm]], splits=(list(range(n)), list(range(n, len(blocks)))), n_inp=2)
    dls = dsets.dataloaders(
        bs=a.bs, num_workers=0, dl_type=TfmdDL, before_batch=PadTokens(tfm.pad_id), after_batch=MaskTokens(tfm)
    )
    hist = LossHistory()  # times the training phase
    learn = mlm_learner(dls, minilm(), precision=precision, cbs=hist)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-4)
    return n // a.bs * a.bs, hist.train_seconds


def mlm_trainer(a, bf16: bool | None = None):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    blocks = _mlm_blocks(a)[: -a.bs]
    tok = AutoTokenizer.from_pretrained(minilm())
    ds = [{"input_ids": b.tolist()} for b in blocks]
    model = AutoModelForMaskedLM.from_pretrained(minilm())
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(
            model=model,
            args=trainer_args(a, out, 1e-4, bf16),
            train_dataset=ds,
            data_collator=DataCollatorForLanguageModeling(tok, mlm_probability=0.15),
        )
        t0 = time.perf_counter()
        tr.train()
        return len(ds), time.perf_counter() - t0


def _clf_folder(a) -> str:
    "One classifier (MiniLM + a seeded native head) saved once, so both inference sides load the same weights."
    folder = Path(a.work) / "clf_hf"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(
            minilm(), num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
        )
        m.save_pretrained(folder)
        AutoTokenizer.from_pretrained(minilm()).save_pretrained(folder)
    return str(folder)


def _export(a) -> Path:
    "Our exported learner around the same weights, reading `max_len` tokens."
    path = Path(a.work) / f"export_{a.max_len}.pkl"
    if not path.exists():
        from ulmfit_tx import clas_dataloaders, classifier_learner

        df = reviews(a, 64).assign(is_valid=[False] * 48 + [True] * 16)
        learn = classifier_learner(
            clas_dataloaders(df, _clf_folder(a), max_len=a.max_len, cache=False),
            _clf_folder(a),
            head="native",
            precision=precision(),
        )
        learn.path = path.parent
        learn.export(path.name)
    return path


def _infer_texts(a) -> list[str]:
    import pandas as pd

    return pd.read_csv(length_data(a, a.max_len) / "infer.csv", keep_default_na=False).text.tolist()


def infer_ours(a):
    import warnings

    from fastai.learner import load_learner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = load_learner(_export(a), cpu=device() == "cpu")
    if precision() == "bf16":
        learn.to_bf16()
    texts = _infer_texts(a)
    t0 = time.perf_counter()
    with learn.no_bar():
        learn.predict_texts(texts, bs=a.infer_bs)
    return len(texts), time.perf_counter() - t0


def infer_pipeline(a):
    import torch
    from transformers import pipeline

    pipe = pipeline(
        "text-classification",
        model=_clf_folder(a),
        device=0 if device() == "cuda" else -1,
        dtype=torch.bfloat16 if precision() == "bf16" else torch.float32,
    )
    texts = _infer_texts(a)
    t0 = time.perf_counter()
    pipe(texts, batch_size=a.infer_bs, truncation=True, max_length=a.max_len, top_k=None)
    return len(texts), time.perf_counter() - t0


# ---- 4. deployment: one trained classifier, served four ways on the same IMDb test reviews ----

SERVE = {
    "serve_torch": "PyTorch eager (`load_classifier`)",
    "serve_onnx": "ONNX Runtime float32",
    "serve_int8": "ONNX Runtime int8",
    "serve_pipeline": 'pipeline("text-classification")',
}


def _cli(*args):
    res = subprocess.run(
        [sys.executable, "-m", "ulmfit_tx.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if res.returncode != 0:
        raise RuntimeError(f"ulmfit-tx {args[0]} failed:\n{res.stderr[-3000:]}")


def served_bundle(a) -> Path:
    """A MiniLM classifier with the native head (so the pipeline side runs Hugging Face's own model class), trained
    once by `ulmfit-tx train-clf` on `--serve-train` training reviews at `--serve-len` tokens, with both ONNX
    graphs."""
    folder = Path(a.work) / f"serve_len{a.serve_len}_{a.serve_train}reviews_{a.serve_epochs}ep_lr{a.serve_lr:g}"
    if not (folder / "ulmfit_tx.json").exists():
        data = Path(a.work) / f"serve_train_{a.serve_train}.csv"
        df = reviews(a, a.serve_train).assign(is_valid=lambda d: d.index >= int(0.9 * len(d)))
        df[["text", "label", "is_valid"]].to_csv(data, index=False)
        _cli(
            "train-clf",
            "--model",
            minilm(),
            "--data",
            data,
            "--out",
            folder,
            "--head",
            "native",
            "--force",
            "--max-len",
            a.serve_len,
            "--bs",
            a.bs,
            "--schedule",
            "one-cycle",
            "--epochs",
            a.serve_epochs,
            "--lr",
            a.serve_lr,
            "--cache",
            Path(a.work) / "cache",
        )
    for name, int8 in (("model.onnx", []), ("model.int8.onnx", ["--int8"])):
        if not (folder / name).exists():
            _cli("export-onnx", "--model", folder, *int8)
    return folder


def _serve_texts(a):
    "The test reviews (`--serve-n`, both labels) and the short ones the single-review calls send."
    df = reviews(a, a.serve_n, "test")
    short = df.text[df.text.str.split().str.len().argsort()[: a.latency_calls]].tolist()
    return df, short


def _serve(a, name: str, predict_many, predict_one, load_s: float):
    """Samples/s and accuracy of `predict_many(texts) -> labels`, the share of labels equal to those of the PyTorch
    case's last run (kept in `--work`), then the latency of `predict_one(text)` per call."""
    import numpy as np

    df, short = _serve_texts(a)
    predict_many(df.text[:8].tolist())  # warm-up
    t0 = time.perf_counter()
    labels = [str(x) for x in predict_many(df.text.tolist())]
    seconds = time.perf_counter() - t0
    kept = Path(a.work) / f"serve_labels_{name}_{a.serve_n}.json"
    kept.write_text(json.dumps(labels))
    torch_labels = kept.with_name(f"serve_labels_serve_torch_{a.serve_n}.json")
    same = np.mean(np.array(json.loads(torch_labels.read_text())) == labels) if torch_labels.exists() else np.nan
    lat = []
    for t in short:
        t1 = time.perf_counter()
        predict_one(t)
        lat.append(time.perf_counter() - t1)
    ms = np.array(lat) * 1000
    return (
        len(df),
        seconds,
        {
            "accuracy": float(np.mean(np.array(labels) == df.label.astype(str).values)),
            "same_as_torch": float(same),
            "load_s": load_s,
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
        },
    )


def _serve_ours(a, backend: str, int8: bool = False):
    from ulmfit_tx import load_classifier

    t0 = time.perf_counter()
    learn = load_classifier(served_bundle(a), bs=a.infer_bs, backend=backend, int8=int8)
    load_s = time.perf_counter() - t0
    with learn.no_bar():
        return _serve(
            a,
            "serve_int8" if int8 else f"serve_{backend}",
            lambda texts: learn.predict_texts(texts, bs=a.infer_bs).label.tolist(),
            lambda text: learn.predict_texts([text]),
            load_s,
        )


def serve_torch(a):
    return _serve_ours(a, "torch")


def serve_onnx(a):
    return _serve_ours(a, "onnx")


def serve_int8(a):
    return _serve_ours(a, "onnx", int8=True)


def serve_pipeline(a):
    from transformers import pipeline

    t0 = time.perf_counter()
    pipe = pipeline("text-classification", model=str(served_bundle(a)), device=-1)
    load_s = time.perf_counter() - t0
    kw = dict(truncation=True, max_length=a.serve_len)
    return _serve(
        a,
        "serve_pipeline",
        lambda texts: [r["label"] for r in pipe(texts, batch_size=a.infer_bs, **kw)],
        lambda text: pipe(text, **kw),
        load_s,
    )


CASES = {
    "mlm_ours": mlm_ours,
    "mlm_ours_fp32": lambda a: mlm_ours(a, "fp32"),
    "mlm_trainer": mlm_trainer,
    "mlm_trainer_bf16": lambda a: mlm_trainer(a, bf16=True),
    "infer_ours": infer_ours,
    "infer_pipeline": infer_pipeline,
    "serve_torch": serve_torch,
    "serve_onnx": serve_onnx,
    "serve_int8": serve_int8,
    "serve_pipeline": serve_pipeline,
}
CLF_SIDES = {
    "clf_ours": "ours (auto precision)",
    "clf_ours_fp32": "ours, --precision fp32",
    "clf_trainer": "Trainer, group_by_length + dynamic padding",
    "clf_trainer_bf16": "Trainer, group_by_length, bf16=True",
    "clf_trainer_fixed": "Trainer, fixed padding",
}
TRAINER_CASES = {"clf_trainer": {}, "clf_trainer_fixed": {"fixed": True}, "clf_trainer_bf16": {"bf16": True}}
# The summary's pairings: (label, ours, Trainer) for the classifier and for MLM
PAIRINGS = [
    ("defaults", "ours", "trainer"),
    ("bf16 both", "ours", "trainer_bf16"),
    ("fp32 both", "ours_fp32", "trainer"),
]
# (task, ours, theirs, label, target ratio)
LOOP_PAIRS = [
    ("2. MLM fine-tuning loop", "mlm_ours", "mlm_trainer", "Trainer + DataCollatorForLanguageModeling", 1.2),
    ("2b. MLM fine-tuning loop, ours in float32", "mlm_ours_fp32", "mlm_trainer", "the Trainer in float32", 1.2),
    ("2c. MLM fine-tuning loop, the Trainer with bf16=True", "mlm_ours", "mlm_trainer_bf16", "Trainer bf16=True", 1.2),
    ("3. inference", "infer_ours", "infer_pipeline", 'pipeline("text-classification")', 1.2),
]


def summarize(runs: dict) -> dict:
    "Per length and case: the median of each number over the rounds, and every round's numbers."
    out = {}
    for (length, name), rs in runs.items():
        keys = [k for k in rs[0] if isinstance(rs[0][k], (int, float))]
        out.setdefault(str(length), {})[name] = {**{k: median([r[k] for r in rs]) for k in keys}, "rounds": rs}
    return out


def mean_tokens(a, length: int) -> float:
    "Mean model-input tokens of the training texts of one length (special tokens included, truncated at `length`)."
    import pandas as pd
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(minilm()) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()  # (the file pads and truncates to 128)
    texts = pd.read_csv(length_data(a, length) / "train.csv", keep_default_na=False).text.tolist()
    return sum(min(len(e.ids), length) for e in tok.encode_batch(texts)) / len(texts)


def ratio(r: dict, ours: str, theirs: str, key: str) -> float | None:
    "ours / theirs in speed: samples/s over samples/s, or their wall time over ours; None if a side did not run."
    if ours not in r or theirs not in r:
        return None
    return r[theirs]["wall_s"] / r[ours]["wall_s"] if key == "wall_s" else r[ours][key] / r[theirs][key]


def summary(res: dict, ours_precision: str) -> list[str]:
    "The per-length ratios of every pairing: each side's default precision, bf16 on both sides, float32 on both sides."
    pairs = [(label, o, t) for label, o, t in PAIRINGS if label != "bf16 both" or ours_precision == "bf16"]
    fmt = lambda x: "" if x is None else f"{x:.2f}×"
    head = " / ".join(label for label, _, _ in pairs)
    lines = [
        f"**Summary** (ours / theirs in speed; ≥ 1.2 is the target; ours' default here: {ours_precision}, the "
        f"Trainer's: float32 on a CPU). Each cell: {head}",
        "",
        "| max_len | classifier loop | classifier whole command | MLM loop | inference (float32) |",
        "|---|---|---|---|---|",
    ]
    for length, r in res.items():
        if not length.isdigit():
            continue
        cells = [
            " / ".join(fmt(ratio(r, f"{task}_{o}", f"{task}_{t}", key)) for _, o, t in pairs)
            for task, key in (("clf", "samples_per_s"), ("clf", "wall_s"), ("mlm", "samples_per_s"))
        ]
        lines.append(
            f"| {length} ({r['mean_tokens']:.0f}) | "
            + " | ".join(cells)
            + f" | {fmt(ratio(r, 'infer_ours', 'infer_pipeline', 'samples_per_s'))} |"
        )
    return lines


def tables(res: dict, a, ours_precision: str) -> str:
    lines = [
        *summary(res, ours_precision),
        "",
        "**1. Classifier, whole command** (`ulmfit-tx train-clf --schedule one-cycle --epochs 1` against a Trainer "
        "script; ratios: ours with its default precision / this side)",
        "",
        "| max_len (mean tokens) | n train / valid | side | loop samples/s | loop ratio | whole command s "
        "| whole ratio | train / valid / other s | accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length, r in res.items():
        for name, label in CLF_SIDES.items():
            if name not in r:
                continue
            t = r[name]
            loop, whole = (
                ratio(r, "clf_ours", name, k) if name.startswith("clf_trainer") else None
                for k in ("samples_per_s", "wall_s")
            )
            lines.append(
                f"| {length} ({r['mean_tokens']:.0f}) | {r['n_train']} / {r['n_valid']} | {label} | "
                f"{t['samples_per_s']:.1f} | {f'**{loop:.2f}×**' if loop else ''} | {t['wall_s']:.1f} | "
                f"{f'**{whole:.2f}×**' if whole else ''} | "
                f"{t['train_s']:.1f} / {t['valid_s']:.1f} / {t['other_s']:.1f} | {t['accuracy']:.3f} |"
            )
    if not any(name in r for r in res.values() for name in CLF_SIDES):
        lines = summary(res, ours_precision)
    if "serve" in res:
        lines += ["", *serve_table(res["serve"])]
    for task, ours, theirs, label, target in LOOP_PAIRS:
        rows = [
            f"| {length} | {r[ours]['samples_per_s']:.1f} | {r[theirs]['samples_per_s']:.1f} | "
            f"**{r[ours]['samples_per_s'] / r[theirs]['samples_per_s']:.2f}×** |"
            for length, r in res.items()
            if ours in r and theirs in r
        ]
        if rows:
            lines += [
                "",
                f"**{task}** (against {label}; target ≥ {target}×)",
                "",
                "| max_len | ulmfit_tx samples/s | theirs samples/s | ratio |",
                "|---|---|---|---|",
                *rows,
            ]
    return "\n".join(lines)


def serve_table(r: dict) -> list[str]:
    "Table 4: throughput, ratio to the pipeline, peak memory, accuracy and single-review latency of each way to serve."
    base = r.get("serve_pipeline")
    rows = [
        f"**4. Deployment** (one MiniLM classifier, native head, trained by `train-clf` on {r['n_train']:,} reviews "
        f"at {r['max_len']} tokens for {r['epochs']} one-cycle epochs; {r['n']:,} IMDb test reviews in batches of "
        "the same size; latency: one review per call, the "
        "shortest reviews; targets: ONNX float32 ≥ 1.3× PyTorch, int8 ≥ 2.5× the pipeline with < 0.5 points "
        "accuracy lost)",
        "",
        "| served by | samples/s | vs pipeline | peak MB | accuracy | labels = PyTorch's | p50 / p95 ms per review | "
        "load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in SERVE.items():
        if name not in r:
            continue
        t = r[name]
        ratio = f"**{t['samples_per_s'] / base['samples_per_s']:.2f}×**" if base and name != "serve_pipeline" else ""
        if name in ("serve_onnx", "serve_int8") and "serve_torch" in r:
            ratio += f" ({t['samples_per_s'] / r['serve_torch']['samples_per_s']:.2f}× PyTorch)"
        rows.append(
            f"| {label} | {t['samples_per_s']:.1f} | {ratio} | {t['peak_mb']:.0f} | {100 * t['accuracy']:.2f}% | "
            f"{100 * t.get('same_as_torch', float('nan')):.2f}% | {t['p50_ms']:.1f} / {t['p95_ms']:.1f} | "
            f"{t['load_s']:.1f} |"
        )
    return rows


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "classifier loop vs Trainer (group_by_length)": ("clf_ours", "clf_trainer", "samples_per_s"),
        "classifier whole command vs Trainer (group_by_length)": ("clf_ours", "clf_trainer", "wall_s"),
        "classifier loop vs Trainer bf16=True": ("clf_ours", "clf_trainer_bf16", "samples_per_s"),
        "MLM loop vs Trainer": ("mlm_ours", "mlm_trainer", "samples_per_s"),
        "inference vs pipeline": ("infer_ours", "infer_pipeline", "samples_per_s"),
    }
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for label, pair in series.items():
        pts = [
            (int(length), x) for length, r in res.items() if length.isdigit() and (x := ratio(r, *pair)) is not None
        ]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.axhline(1.2, color="black", ls="--", lw=1, label="target 1.2×")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set(xscale="log", xlabel="max_len (tokens)", ylabel="speed ratio, ulmfit_tx / alternative")
    ax.minorticks_off()
    ax.set_xticks([int(k) for k in res if k.isdigit()], [k for k in res if k.isdigit()])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32,64,128,256,512", help="max_len values, comma-separated")
    ap.add_argument("--tokens", type=int, default=49152, help="training texts per length: this / max_len")
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5, help="classifier learning rate (both sides)")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of both classifier sides (ours: --seed; the Trainer: "
        "set_seed before its model, and TrainingArguments.seed): head, shuffling, dropout",
    )
    ap.add_argument("--infer-bs", type=int, default=64)
    ap.add_argument("--serve-len", type=int, default=256, help="4. deployment: max_len of the served classifier")
    ap.add_argument(
        "--serve-train", type=int, default=1000, help="4. deployment: training reviews of the served classifier"
    )
    ap.add_argument(
        "--serve-epochs", type=int, default=2, help="4. deployment: one-cycle epochs of the served classifier"
    )
    ap.add_argument(
        "--serve-lr", type=float, default=2e-4, help="4. deployment: learning rate of the served classifier"
    )
    ap.add_argument("--serve-n", type=int, default=2000, help="4. deployment: test reviews served")
    ap.add_argument(
        "--latency-calls", type=int, default=200, help="4. deployment: single-review calls (the shortest reviews)"
    )
    ap.add_argument("--data-dir", default=str(IMDB))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--out", default=out_dir("speed"), help="folder for the results files")
    ap.add_argument("--only", default="", help="comma-separated cases to run (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each case, cycling through lengths and cases")
    ap.add_argument("--tag", help="name of the result files (default: the device, cpu or cuda)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case in TRAINER_CASES:
        return clf_trainer(a, **TRAINER_CASES[a.case])
    if a.case:
        return run_one(a, CASES)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    names = [n for n in [*CLF_SIDES, *CASES] if not a.only or n in a.only.split(",")]
    serve, names = [n for n in names if n in SERVE], [n for n in names if n not in SERVE]
    lengths = [int(x) for x in a.lengths.split(",")] if names else []
    runs = {(L, n): [] for L in lengths for n in names}
    runs.update({("serve", n): [] for n in serve})
    if serve:
        served_bundle(a)  # trained and exported once, before the clock runs
    for r in range(a.rounds):
        for n in serve:
            run = run_case(a, n, __file__)
            runs[("serve", n)].append(run)
            print(
                f"round {r + 1} {n:18s} {run['samples_per_s']:7.1f} samples/s  p50 {run['p50_ms']:.1f} ms  "
                f"accuracy {run['accuracy']:.4f}",
                flush=True,
            )
        for L in lengths:
            for n in names:
                if n in CLF_SIDES:
                    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
                        out = Path(tmp) / "out"
                        run = run_command(clf_command(a, n, L, out), out)
                    msg = (
                        f"whole {run['wall_s']:6.1f}s  loop {run['samples_per_s']:7.1f} samples/s  "
                        f"accuracy {run['accuracy']:.3f}"
                    )
                else:
                    run = run_case(argparse.Namespace(**{**vars(a), "max_len": L}), n, __file__)
                    msg = f"{run['samples_per_s']:7.1f} samples/s"
                runs[(L, n)].append(run)
                print(f"round {r + 1} max_len {L:4d} {n:18s} {msg}", flush=True)
    res = summarize(runs)
    if serve:
        res["serve"].update(max_len=a.serve_len, n=a.serve_n, n_train=a.serve_train, epochs=a.serve_epochs)
    for L in lengths:
        n = sizes(a, L)
        res[str(L)].update(mean_tokens=mean_tokens(a, L), n_train=n["train"], n_valid=n["valid"])
    import torch

    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "precision": {"ours": our_precision(), "Trainer and pipeline": precision()},
        "settings": {k: v for k, v in vars(a).items() if k not in ("case", "only", "max_len", "csv")},
    }
    md = tables(res, a, our_precision())
    print(md)
    png = write_results(
        argparse.Namespace(**{**vars(a), "tag": a.tag or device()}),
        {"env": env, "results": res},
        f"Environment: {json.dumps(env)}\n\n{md}",
    )
    if lengths:
        plot(res, png)


if __name__ == "__main__":
    main()
