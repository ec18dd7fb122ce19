"""Marge (ulmfit_tx.encoders.marge, ulmfit_tx.retrieval) measured in four parts, each written to its own results file:

  index  index build and reindex for 10k, 50k and 100k IMDb reviews (one chunk of `--index-max-len` tokens each,
         the offline MiniLM's first 3 layers): seconds to embed, seconds to search (torch and faiss), peak memory;
         each size in a fresh process
  step   training step time against lucidrains' marge-pytorch 0.2.9 at the same sizes on this CPU, alternating
  wiki   WikiText-2 chunks: how often the retrieved evidence comes from the chunk's own article, at initialisation
         and after Marge training (evidence from the own article allowed), beside a TF-IDF cosine retriever
  imdb   the classifier on MiniLM without adaptation, after MLM fine-tuning, and after Marge, on the same unlabelled
         reviews with the same passes; then the same classifier (bench/imdb.py's) with 1,000 labels, 3 seeds each,
         scored on bench/imdb.py's 2,000 test reviews

    python bench/marge.py                                   # all parts, CPU defaults (about 80 minutes on 2 cores)
    python bench/marge.py --parts index --index-sizes 2000 --tag smoke

marge-pytorch is installed for this benchmark only, into bench/results/work/marge_ref (its wheel and einops's, from
PyPI; `import faiss` is satisfied by faiss-cpu). Its `.cuda()` calls sit in its dataset, `generate` and
`TrainingWrapper`, none of which this benchmark calls: it times `Marge.forward` (embedding the targets with
`get_embeds`, as its `TrainingWrapper.forward` does) on the CPU, so no source edit is needed.
Writes bench/results/marge/<part>_<tag>.{json,md}."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import SHARED_DATA as DATA
from _common import WORK, minilm, out_dir, peak_mb, write_results

PRECISION = "fp32"  # every learner here: the runs in bench/README.md were made in float32


def imdb_pool(seed: int = 0) -> list[str]:
    "Every IMDb review but the test half's (training half and unlabelled), shuffled."
    import pandas as pd

    imdb = pd.read_csv(DATA / "imdb" / "imdb.csv.gz", keep_default_na=False)
    unsup = pd.read_csv(DATA / "imdb" / "imdb_unsup.csv.gz", keep_default_na=False)
    return pd.concat([unsup.text, imdb[~imdb.is_valid].text]).sample(frac=1, random_state=seed).tolist()


def write(a, part: str, res, md: str):
    write_results(a, {"settings": vars(a), "results": res}, md, f"{part}_{a.tag}")
    print(md, flush=True)


# ---------------------------------------------------------------- index
def index_child(a) -> dict:
    "One size: the store (cached), chunks and hashes, then the embeddings and the search, timed apart."
    import torch

    from ulmfit_tx.models import marge_model
    from ulmfit_tx.retrieval import Chunks, embed_chunks, top_k_neighbours
    from ulmfit_tx.store import TokenStore, build_store, is_store
    from ulmfit_tx.tokenize import HFTokenizer

    tfm = HFTokenizer(minilm(), a.index_max_len)
    path = Path(a.work) / f"store_{a.n}"
    t0 = time.perf_counter()
    store = TokenStore(path) if is_store(path) else build_store(imdb_pool()[: a.n], tfm, path, progress=False)
    chunks = Chunks(store, tfm, split_docs=False)
    hashes = chunks.hashes()
    setup = time.perf_counter() - t0
    model = marge_model(minilm(), tfm.tok).hf
    t0 = time.perf_counter()
    emb = embed_chunks(model, chunks, bs=128, progress=False)
    embed = time.perf_counter() - t0
    res = {"n": a.n, "chunks": len(chunks), "setup_s": setup, "embed_s": embed, "embed_per_s": len(chunks) / embed}
    for backend in ("torch", "faiss"):
        t0 = time.perf_counter()
        idx, _ = top_k_neighbours(emb, 4, hashes, backend=backend)
        res[f"search_{backend}_s"] = time.perf_counter() - t0
    res["reindex_s"] = embed + res["search_torch_s"]
    return {**res, "peak_mb": peak_mb(), "threads": torch.get_num_threads()}


def part_index(a):
    rows = []
    for n in map(int, a.index_sizes.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "index",
            "--n",
            str(n),
            "--index-max-len",
            str(a.index_max_len),
            "--work",
            a.work,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    md = [
        f"Index build and reindex, MiniLM's first 3 layers, one chunk of up to {a.index_max_len} tokens per review, "
        "k = 4, exact search",
        "",
        "| reviews | setup s (store, chunks, hashes) | embed s | chunks/s | search s (torch) | search s (faiss) | "
        "reindex s | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['n']:,} | {r['setup_s']:.1f} | {r['embed_s']:.1f} | {r['embed_per_s']:.0f} | "
        f"{r['search_torch_s']:.1f} | "
        f"{r['search_faiss_s']:.1f} | {r['reindex_s']:.1f} | {r['peak_mb']:,.0f} |"
        for r in rows
    ]
    if len(rows) > 1:
        f, l = rows[0], rows[-1]
        md += [
            "",
            f"From {f['n']:,} to {l['n']:,} reviews ({l['n'] / f['n']:.0f}×): "
            f"embedding {l['embed_s'] / f['embed_s']:.1f}× "
            f"(one pass per chunk), search {l['search_torch_s'] / f['search_torch_s']:.1f}× (every pair is scored).",
        ]
    write(a, "index", rows, "\n".join(md))


# ---------------------------------------------------------------- step
def reference_path(a) -> Path:
    "marge-pytorch 0.2.9 and einops unpacked for this benchmark only (from PyPI)."
    ref = Path(a.work) / "marge_ref"
    if not (ref / "marge_pytorch").exists():
        ref.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(ref),
                "marge-pytorch==0.2.9",
                "einops",
            ],
            check=True,
        )
    return ref


def step_child(a) -> dict:
    "Median seconds of a training step (forward, backward, fused AdamW) of one side, random full-length ids."
    import torch

    torch.manual_seed(0)
    V, D, H, L, B, K = 8000, a.step_dim, 8, a.step_len, a.step_bs, 4
    tgt, ev = torch.randint(5, V, (B, L)), torch.randint(5, V, (B, K, L))
    tmask, emask = torch.ones(B, L, dtype=torch.bool), torch.ones(B, K, L, dtype=torch.bool)
    if a.child == "step_ours":
        from ulmfit_tx.encoders import MargeConfig, MargeModel
        from ulmfit_tx.mlm import mlm_loss
        from ulmfit_tx.models import MargeLM

        drop = dict(hidden_dropout=0.0, attn_dropout=a.step_dropout, attn_layer_dropout=0.0, ff_dropout=0.0)
        model = MargeLM(
            MargeModel(
                MargeConfig(
                    vocab_size=V,
                    hidden_size=D,
                    num_attention_heads=H,
                    intermediate_size=4 * D,
                    num_hidden_layers=4,
                    retrieval_layer=2,
                    self_layers=4,
                    cross_layers=2,
                    max_position_embeddings=L,
                    **drop,
                )
            )
        )
        labels = torch.full_like(tgt, -100)
        labels[:, :-1] = tgt[:, 1:]
        loss_fn = lambda: mlm_loss(model(tgt, tmask, ev, emask, labels), labels)
    else:
        sys.path.insert(0, str(reference_path(a)))
        from marge_pytorch import Marge

        model = Marge(
            dim=D,
            num_tokens=V,
            max_seq_len=L + 1,
            enc_depth=4,
            enc_retrieval_depth=2,
            enc_heads=H,
            dec_depth=6,
            dec_heads=H,
            dec_ff_mult=4,
            enc_attn_dropout=a.step_dropout,
            dec_attn_dropout=a.step_dropout,
        )
        model.train()
        loss_fn = lambda: model(ev, tgt, model.get_embeds(tgt, masks=tmask), src_mask=emask, tgt_mask=tmask)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(a.steps + 2):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)  # two warm-up steps
    return {
        "step_s": statistics.median(times),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_mb": peak_mb(),
    }


def part_step(a):
    reference_path(a)
    res, md = (
        {},
        [
            f"Training step, batch {a.step_bs} targets x 4 evidence, {a.step_len} tokens, width {a.step_dim}, "
            "8 heads, vocabulary 8,000, encoder 4 layers (retrieval after 2), decoder 4 self-attention + 2 "
            "cross-attention layers, "
            f"fused AdamW; median of {a.steps} steps per process, {a.rounds} alternating rounds. Attention dropout as "
            "given, no other dropout (marge-pytorch ignores its feed-forward dropout arguments)",
            "",
            "| attention dropout | ulmfit_tx step s | marge-pytorch step s | ratio (median) | ratio per round | "
            "parameters (M) ours / theirs |",
            "|---|---|---|---|---|---|",
        ],
    )
    for p in map(float, a.step_dropouts.split(",")):
        a.step_dropout, runs = p, {"step_ours": [], "step_ref": []}
        for r in range(a.rounds):
            for side in runs:
                cmd = [sys.executable, __file__, "--child", side] + [
                    f"--{k}={getattr(a, k.replace('-', '_'))}"
                    for k in ("step-dim", "step-len", "step-bs", "steps", "step-dropout", "work")
                ]
                out = subprocess.run(
                    cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
                )
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"dropout {p} round {r + 1} {side}: {runs[side][-1]}", flush=True)
        med = {s: statistics.median(x["step_s"] for x in rs) for s, rs in runs.items()}
        ratios = [t["step_s"] / o["step_s"] for o, t in zip(runs["step_ours"], runs["step_ref"])]
        res[str(p)] = {"runs": runs, "median_s": med, "ratios": ratios}
        md.append(
            f"| {p} | {med['step_ours']:.3f} | {med['step_ref']:.3f} | {med['step_ref'] / med['step_ours']:.2f}× | "
            + ", ".join(f"{x:.2f}×" for x in ratios)
            + f" | {runs['step_ours'][0]['params_m']:.1f} / "
            f"{runs['step_ref'][0]['params_m']:.1f} |"
        )
    write(a, "step", res, "\n".join(md))


# ---------------------------------------------------------------- wiki
def own_article(neighbours: np.ndarray, doc: np.ndarray) -> tuple[float, float]:
    "Share of top-1 and of all top-k neighbours from the chunk's own article."
    same = doc[neighbours] == doc[:, None]
    return float(same[:, 0].mean()), float(same.mean())


def tfidf_neighbours(texts: list[str], hashes: np.ndarray, k: int) -> np.ndarray:
    "Top-k by TF-IDF cosine (word 1-2-grams, sublinear tf), never itself or a duplicate."
    import torch
    from sklearn.feature_extraction.text import TfidfVectorizer

    X = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(texts)
    sim = torch.from_numpy((X @ X.T).toarray().astype(np.float32))  # (N, N) cosines: the rows are L2-normalised
    sim.fill_diagonal_(float("-inf"))
    sim[torch.from_numpy(hashes[:, None] == hashes[None])] = float("-inf")
    return sim.topk(k, dim=1).indices.numpy()


def part_wiki(a):
    import itertools

    import transformers

    from ulmfit_tx import fit_marge, marge_learner
    from ulmfit_tx.io import iter_corpus
    from ulmfit_tx.retrieval import marge_dataloaders
    from ulmfit_tx.store import build_store
    from ulmfit_tx.tokenize import HFTokenizer

    transformers.logging.set_verbosity_error()
    tfm = HFTokenizer(minilm(), a.wiki_max_len)
    texts = list(itertools.islice(iter_corpus(DATA / "wikitext-2" / "train.txt.gz", "articles"), a.wiki_articles))
    store = build_store(texts, tfm, Path(a.work) / f"wiki_{a.wiki_articles}", force=True, progress=False)
    dls = marge_dataloaders(store, tfm.tok, a.wiki_max_len, k=4, bs=8, valid_pct=0.05, exclude_same_doc=False)
    r = dls.train.retriever
    doc, n = r.chunks.doc, len(r.chunks)
    sizes = np.bincount(doc)
    chance = float(((sizes[doc] - 1) / (n - 1)).mean())
    learn = marge_learner(dls, minilm(), reindex_every=a.wiki_reindex, progress=False, precision=PRECISION)
    rows = {"chunks": n, "articles": len(store), "chance": chance}
    learn.reindex()
    rows["init"] = own_article(r.neighbours, doc)
    rows["tfidf"] = own_article(tfidf_neighbours([r.chunks.text(i) for i in range(n)], r.chunks.hashes(), 4), doc)
    t0 = time.perf_counter()
    with learn.no_bar():
        fit_marge(learn, a.wiki_lr, a.wiki_warmup, a.wiki_epochs)
    rows["train_s"] = time.perf_counter() - t0
    learn.reindex()
    rows["trained"] = own_article(r.neighbours, doc)
    rows["history"] = learn.reindexer.history
    rows["valid_loss"] = float(learn.recorder.values[-1][1])
    md = [
        f"WikiText-2, the first {rows['articles']} training articles cut into {n:,} chunks of up to "
        f"{a.wiki_max_len} MiniLM tokens; "
        "evidence from the own article allowed; k = 4; Marge from the offline MiniLM "
        f"({a.wiki_warmup} warm-up + {a.wiki_epochs} epoch(s), {rows['train_s'] / 60:.0f} min)",
        "",
        "| retriever | top-1 from own article | top-4 from own article |",
        "|---|---|---|",
        f"| chance (random chunks) | {chance:.1%} | {chance:.1%} |",
    ]
    md += [
        f"| {name} | {rows[k][0]:.1%} | {rows[k][1]:.1%} |"
        for name, k in (
            ("TF-IDF cosine (1-2-grams)", "tfidf"),
            ("Marge at initialisation (MiniLM)", "init"),
            ("Marge after training", "trained"),
        )
    ]
    write(a, "wiki", rows, "\n".join(md))


# ---------------------------------------------------------------- imdb
def part_imdb(a):
    import pandas as pd
    import transformers
    from imdb import classifier, stratified, tfidf_baseline

    from ulmfit_tx import fit_marge, marge_learner, mlm_learner
    from ulmfit_tx.mlm import mlm_dataloaders
    from ulmfit_tx.retrieval import marge_dataloaders

    transformers.logging.set_verbosity_error()
    base = minilm()
    imdb = pd.read_csv(DATA / "imdb" / "imdb.csv.gz", keep_default_na=False)
    train_half, test_half = imdb[~imdb.is_valid], imdb[imdb.is_valid]
    test = stratified(test_half, a.n_test, 0).reset_index(drop=True)
    train = stratified(train_half, a.labels, 0).reset_index(drop=True)
    unsup = pd.read_csv(DATA / "imdb" / "imdb_unsup.csv.gz", keep_default_na=False).text.sample(frac=1, random_state=0)
    texts = unsup.iloc[: a.adapt_texts].tolist()
    passes = a.adapt_warmup + a.adapt_epochs
    methods = a.methods.split(",")
    adapted, encoders = {}, {"none": ("MiniLM, no adaptation", base)}
    if "mlm" in methods:  # each text once per pass, truncated to the same max_len as Marge's chunks
        t0, out = time.perf_counter(), Path(a.work) / f"imdb_mlm_{a.adapt_texts}"
        learn = mlm_learner(
            mlm_dataloaders(texts, base, max_len=a.clf_max_len, mode="docs", bs=16, valid_pct=0.02),
            base,
            precision=PRECISION,
        )
        with learn.no_bar():
            learn.fit_one_cycle(passes, 2e-4)
        learn.save_pretrained(out, force=True)
        adapted["mlm"] = {
            "minutes": (time.perf_counter() - t0) / 60,
            "valid": [float(v) for v in learn.recorder.values[-1]],
        }
        encoders["mlm"] = ("MiniLM + MLM", str(out))
    if "marge" in methods:
        t0, out = time.perf_counter(), Path(a.work) / f"imdb_marge_{a.adapt_texts}"
        dls = marge_dataloaders(texts, base, max_len=a.clf_max_len, k=4, bs=8, valid_pct=0.02, split_docs=False)
        learn = marge_learner(dls, base, reindex_every=a.adapt_reindex, progress=False, precision=PRECISION)
        with learn.no_bar():
            fit_marge(learn, 3e-3, a.adapt_warmup, a.adapt_epochs)
        learn.save_pretrained(out, force=True)
        adapted["marge"] = {
            "minutes": (time.perf_counter() - t0) / 60,
            "valid": [float(v) for v in learn.recorder.values[-1]],
            "reindex": learn.reindexer.history,
        }
        encoders["marge"] = ("MiniLM + Marge", str(out))
    print(json.dumps(adapted, default=float), flush=True)
    ns = argparse.Namespace(
        max_len=a.clf_max_len,
        bs=16,
        truncate="head+tail",
        chunks=1,
        clf_lr=2e-3,
        clf_div=1.2,
        seed=0,
        clf_seed=None,
        precision=PRECISION,
    )
    rows = [{"method": "TF-IDF + logistic regression", "seed": 0, **tfidf_baseline(train, test)}]
    for seed in range(a.seeds):
        ns.clf_seed = seed
        for key in methods:
            method, model = encoders[key]
            rows.append({"method": method, "seed": seed, **classifier(ns, model, train, test, a.clf_epochs)})
            print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    md = [
        f"IMDb, {len(train):,} labels, {len(test):,} test reviews (bench/imdb.py's), classifier: bench/imdb.py's "
        f"ULMFiT schedule ({3 + a.clf_epochs} passes), {a.clf_max_len} tokens head+tail. Adaptation on "
        f"{a.adapt_texts:,} unlabelled reviews, "
        f"{passes} passes each (first {a.clf_max_len} tokens of each review): "
        + ", ".join(f"{k} {v['minutes']:.0f} min" for k, v in adapted.items()),
        "",
        "| method | accuracy per seed | mean | train s (mean) |",
        "|---|---|---|---|",
    ]
    for method, g in df.groupby("method", sort=False):
        md.append(
            f"| {method} | "
            + ", ".join(f"{100 * x:.2f}%" for x in g.accuracy)
            + f" | {100 * g.accuracy.mean():.2f}% | "
            f"{g.train_time_s.mean():.0f} |"
        )
    write(a, "imdb", {"adapted": adapted, "rows": rows}, "\n".join(md))


PARTS = {"index": part_index, "step": part_step, "wiki": part_wiki, "imdb": part_imdb}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="index,step,wiki,imdb")
    ap.add_argument("--index-sizes", default="10000,50000,100000")
    ap.add_argument("--index-max-len", type=int, default=128)
    ap.add_argument("--step-dim", type=int, default=256)
    ap.add_argument("--step-len", type=int, default=128)
    ap.add_argument("--step-bs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process")
    ap.add_argument("--step-dropouts", default="0,0.1", help="attention dropout settings to time")
    ap.add_argument("--step-dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--wiki-articles", type=int, default=40)
    ap.add_argument("--wiki-max-len", type=int, default=128)
    ap.add_argument("--wiki-warmup", type=int, default=1)
    ap.add_argument("--wiki-epochs", type=int, default=1)
    ap.add_argument("--wiki-lr", type=float, default=3e-3)
    ap.add_argument("--wiki-reindex", type=int, default=50)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--adapt-texts", type=int, default=1000)
    ap.add_argument("--adapt-warmup", type=int, default=1)
    ap.add_argument("--adapt-epochs", type=int, default=1)
    ap.add_argument("--adapt-reindex", type=int, default=50)
    ap.add_argument("--methods", default="none,mlm,marge", help="encoders to train the classifier on")
    ap.add_argument("--clf-max-len", type=int, default=128)
    ap.add_argument("--clf-epochs", type=int, default=1, help="epochs of the classifier's last (all layers) stage")
    ap.add_argument(
        "--n-test", type=int, default=2000, help="stratified test reviews (bench/imdb.py's 2,000 by default)"
    )
    ap.add_argument("--work", default=str(WORK / "marge"), help="stores, models and marge-pytorch")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=out_dir("marge"), help="folder for the results files")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.child:
        import transformers

        transformers.logging.set_verbosity_error()
        print(json.dumps(index_child(a) if a.child == "index" else step_child(a)))
        return
    for part in a.parts.split(","):
        PARTS[part](a)


if __name__ == "__main__":
    main()
