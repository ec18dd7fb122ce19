"""Multi-label classification on real text: which sections a Wikipedia article has, from its introduction. Built
from WikiText-2 (../shared/data/wikitext-2): every article (a ' = Title = ' line) gives its lead paragraphs (the text)
and the set of its ' = = Section = = ' titles among the `--classes` most common (the labels; an article may have none).
WikiText's own split: train.txt articles are for training (20% of them held out for the threshold), valid.txt and
test.txt articles are the test set. Ours (MiniLM classifier, ULMFiT schedule, threshold chosen on the held-out
articles) against one-vs-rest TF-IDF + logistic regression with its threshold chosen on the same articles; macro
and micro F1 on the test articles, for each seed.

    python bench/multilabel.py                       # CPU: 3 seeds, ~5 minutes each
    python bench/multilabel.py --seeds 0,1,2,3,4 --tag gpu

Writes bench/results/multilabel/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import gzip
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from _common import SHARED_DATA, minilm, out_dir, write_results

WIKI = SHARED_DATA / "wikitext-2"
TITLE, SECTION = re.compile(r"^ = ([^=].*) = $"), re.compile(r"^ = = ([^=].*) = = $")
TFIDF, OURS = "TF-IDF + LR (one-vs-rest)", "ours (MiniLM, ULMFiT schedule)"
UNDO = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}  # WikiText's tokenization of hyphens and numbers


def articles(path: Path) -> list[dict]:
    "Title, lead text and section titles of every article of a WikiText file."
    text = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    out, cur = [], None
    for line in text.split("\n"):
        if TITLE.match(line):
            cur = {"title": TITLE.match(line).group(1).strip(), "lead": [], "sections": set()}
            out.append(cur)
        elif cur is not None and SECTION.match(line):
            cur["sections"].add(SECTION.match(line).group(1).strip())
        elif cur is not None and not cur["sections"] and line.strip() and not line.startswith(" = "):
            cur["lead"].append(line.strip())
    return out


def section_data(n_classes: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(training rows with `is_valid`, test rows, classes): text = an article's lead, `sections` = its section titles
    among the `n_classes` most common of the training articles (';'-joined)."""
    parts = {name: articles(WIKI / f) for name, f in [("train", "train.txt.gz"), ("valid", "valid.txt"),
                                                       ("test", "test.txt")]}  # fmt: skip
    common = Counter(s for a in parts["train"] for s in a["sections"] if s != "<unk>").most_common(n_classes)
    classes = sorted(c for c, _ in common)

    def frame(arts):
        rows = []
        for a in arts:
            text = " ".join(a["lead"])
            for k, v in UNDO.items():
                text = text.replace(k, v)
            if text.strip():
                rows.append({"text": text, "sections": ";".join(sorted(a["sections"] & set(classes)))})
        return pd.DataFrame(rows)

    train = frame(parts["train"])
    train["is_valid"] = np.random.default_rng(seed).random(len(train)) < 0.2
    return train, frame(parts["valid"] + parts["test"]), classes


def hot(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    "The `sections` column as a multi-hot (N, C) matrix."
    sets = df.sections.map(lambda s: set(s.split(";")) if s else set())
    return np.array([[c in s for c in classes] for s in sets], dtype=int)


def f1s(y: np.ndarray, pred: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    return {
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(y, pred, average="micro", zero_division=0)),
    }


def tfidf(train: pd.DataFrame, test: pd.DataFrame, classes: list[str]) -> dict:
    "One-vs-rest TF-IDF (word 1-2-grams) + logistic regression; threshold by micro F1 on the held-out articles."
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline

    from ulmfit_tx.tasks import choose_threshold

    t0 = time.time()
    fit, held = train[~train.is_valid], train[train.is_valid]
    clf = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        OneVsRestClassifier(LogisticRegression(C=10, max_iter=2000)),
    )
    clf.fit(fit.text, hot(fit, classes))
    t = choose_threshold(clf.predict_proba(held.text), hot(held, classes))
    pred = (clf.predict_proba(test.text) >= t).astype(int)
    return {"threshold": t, **f1s(hot(test, classes), pred), "train_time_s": time.time() - t0}


def ours(a, train: pd.DataFrame, test: pd.DataFrame, classes: list[str], seed: int) -> dict:
    "MiniLM classifier with the ULMFiT schedule; threshold by micro F1 on the held-out articles (`validation_report`)."
    from fastai.torch_core import set_seed

    from ulmfit_tx import clas_dataloaders, classifier_learner

    set_seed(seed, reproducible=True)
    dls = clas_dataloaders(train, a.model, label_col="sections", label_delim=";", classes=classes,
                           max_len=a.max_len, bs=a.bs, seed=seed, cache=False)  # fmt: skip
    learn = classifier_learner(dls, a.model, precision=a.precision, class_weights=a.class_weights)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging():
        learn.fit_ulmfit(a.lr, (1, 1, 1, a.epochs))
        train_time = time.time() - t0
        report = learn.validation_report(tune_threshold=True)
    pred = learn.predict_texts(test.text.tolist())
    probs = pred[[f"prob_{c}" for c in classes]].to_numpy()
    return {
        "threshold": learn.threshold,
        "valid_f1_micro": report["f1_micro"],
        **f1s(hot(test, classes), (probs >= learn.threshold).astype(int)),
        "train_time_s": train_time,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="encoder folder (default: the offline MiniLM-L6)")
    ap.add_argument("--classes", type=int, default=12, help="the most common section titles to predict")
    ap.add_argument("--seeds", default="0,1,2", help="held-out split and classifier seeds")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the last (all layers) stage")
    ap.add_argument("--class-weights", default=None, help="'balanced' (positive-class weights) or none")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--max-train", type=int, default=0, help="use only this many training articles (smoke runs)")
    ap.add_argument("--out", default=out_dir("multilabel"))
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args()
    a.model = a.model or minilm()
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        train, test, classes = section_data(a.classes, seed)
        if a.max_train:
            train, test = train.head(a.max_train), test.head(a.max_train)
        methods = {TFIDF: lambda: tfidf(train, test, classes), OURS: lambda: ours(a, train, test, classes, seed)}
        for method, run in methods.items():
            rows.append({"method": method, "seed": seed, **run()})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    mean = df.groupby("method", sort=False)[["f1_macro", "f1_micro", "train_time_s"]].mean()
    paired = df.pivot(index="seed", columns="method", values="f1_macro")
    gain = 100 * (paired[OURS] - paired[TFIDF])
    md = [
        f"WikiText-2 sections from article leads: {len(train)} training articles ({int(train.is_valid.sum())} held "
        f"out for the threshold), {len(test)} test articles, {len(classes)} classes ({', '.join(classes)}).",
        "",
        "| method | macro F1 | micro F1 | train time (s) |",
        "|---|---|---|---|",
        *[
            f"| {m} | {100 * r.f1_macro:.2f} | {100 * r.f1_micro:.2f} | {r.train_time_s:.0f} |"
            for m, r in mean.iterrows()
        ],  # noqa: E501
        "",
        f"Ours minus TF-IDF, macro F1 points, per seed: {', '.join(f'{g:+.2f}' for g in gain)} "
        f"(mean {gain.mean():+.2f} ± {gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float('nan'):.2f})",
    ]
    print("\n".join(md))
    write_results(a, {"settings": vars(a), "classes": classes, "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
