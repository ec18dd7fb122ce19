"""The token store at the users' scale: corpora of 100k, 1M and 3M documents (IMDb reviews and WikiText-2 lines,
repeated and shuffled, written as CSV under bench/results/work/, never committed).

For each size, each step in a fresh process (so its peak RSS is its own):
  build     tokenize the CSV into a token store (streaming): seconds, documents/s, disk size, peak RSS
  train     MLM DataLoaders from the warm cache (as `finetune-lm` builds them), the first 200 training batches
            (masking included): seconds to the first batch, seconds for 200 batches, peak RSS
  datasets  Hugging Face `datasets`: load_dataset("csv") + map(batched=True) with the same tokenizer (`--hf-sizes`)
  memory    today's in-memory path before the store: the CSV read whole, ids in lists, blocks in a list, fastai
            Datasets over them, 200 batches (`--memory-sizes`, under an address-space limit so it fails cleanly)

    python bench/scale.py                               # 100k, 1M, 3M; datasets at 1M; in-memory at 100k and 1M
    python bench/scale.py --sizes 2000 --hf-sizes 2000 --memory-sizes 2000 --tag smoke   # seconds

Prints a table and writes bench/results/scale/<tag>.{json,md}. `datasets` is installed for this benchmark only."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import SHARED_DATA as DATA
from _common import WORK, minilm, out_dir, peak_mb, write_results


def corpus(work: Path, n: int) -> Path:
    "A CSV of `n` documents: IMDb reviews (labelled and unlabelled) and WikiText-2 lines, repeated and shuffled."
    path = work / f"corpus_{n}.csv"
    if path.exists():
        return path
    import numpy as np
    import pandas as pd

    texts = pd.concat(
        [pd.read_csv(DATA / "imdb" / f, keep_default_na=False).text for f in ("imdb.csv.gz", "imdb_unsup.csv.gz")]
    )
    with gzip.open(DATA / "wikitext-2" / "train.txt.gz", "rt", encoding="utf-8") as f:
        lines = [l.strip() for l in f if len(l.strip()) > 20 and not l.strip().startswith("=")]
    pool = np.array(texts.tolist() + lines, dtype=object)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    for i, start in enumerate(range(0, n, 500_000)):  # written in pieces: never all in memory
        part = pool[rng.integers(0, len(pool), min(500_000, n - start))]
        pd.DataFrame({"text": part}).to_csv(tmp, mode="a" if i else "w", header=not i, index=False)
    os.replace(tmp, path)
    return path


def step_build(a, csv: Path) -> dict:
    import shutil

    from ulmfit_tx import HFTokenizer, cached_store

    cache = Path(a.work) / f"cache_{a.n}"
    shutil.rmtree(cache, ignore_errors=True)
    tfm = HFTokenizer(minilm(), 128)
    t0 = time.perf_counter()
    store = cached_store(csv, tfm, cache, verbose=False, text_col="text", docs="lines", unk=tfm.tok.unk_token)
    s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in store.path.iterdir())
    return {
        "seconds": s,
        "docs_per_s": len(store) / s,
        "tokens": store.meta["n_tokens"],
        "disk_mb": disk / 2**20,
        "csv_mb": csv.stat().st_size / 2**20,
    }


def step_train(a, csv: Path) -> dict:
    from ulmfit_tx import mlm_dataloaders

    t0 = time.perf_counter()
    dls = mlm_dataloaders(csv, minilm(), max_len=128, bs=32, cache=Path(a.work) / f"cache_{a.n}")
    it = iter(dls.train)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(min(199, len(dls.train) - 1)):
        next(it)
    return {"first_batch_s": first, "batches_200_s": time.perf_counter() - t0, "train_blocks": len(dls.train_ds)}


def step_datasets(a, csv: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(minilm())
    cache = Path(a.work) / f"hf_cache_{a.n}"
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("csv", data_files=str(csv), cache_dir=str(cache), split="train")
    t1 = time.perf_counter()
    ds = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"])
    t2 = time.perf_counter()
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": t2 - t0, "load_s": t1 - t0, "map_s": t2 - t1, "docs_per_s": len(ds) / (t2 - t0)}


def step_memory(a, csv: Path) -> dict:
    "The pipeline as it was before the store (ulmfit_tx 0.1.0's mlm_dataloaders, inlined)."
    import numpy as np
    import pandas as pd
    from fastai.data.core import Datasets, TfmdDL

    from ulmfit_tx import HFTokenizer, MaskTokens, PadTokens

    t0 = time.perf_counter()
    texts = pd.read_csv(csv, keep_default_na=False).text.tolist()
    tfm = HFTokenizer(minilm(), 128)
    perm = np.random.default_rng(42).permutation(len(texts))
    parts = [[texts[i] for i in np.sort(idx)] for idx in (perm[len(texts) // 10 :], perm[: len(texts) // 10])]
    sep, n = tfm.tok.sep_token_id, 126
    blocks = []
    for p in parts:
        flat = np.fromiter((t for d in tfm.token_ids(p) for t in d + [sep]), dtype=np.int32)
        body = flat[: len(flat) // n * n].reshape(-1, n)
        blocks.append(
            list(np.concatenate([np.tile(tfm.prefix, (len(body), 1)), body, np.tile(tfm.suffix, (len(body), 1))], 1))
        )
    splits = (list(range(len(blocks[0]))), list(range(len(blocks[0]), len(blocks[0]) + len(blocks[1]))))
    dsets = Datasets(blocks[0] + blocks[1], tfms=[[tfm]], splits=splits, n_inp=2)
    dls = dsets.dataloaders(
        bs=32, num_workers=0, dl_type=TfmdDL, before_batch=PadTokens(tfm.pad_id), after_batch=MaskTokens(tfm)
    )
    it = iter(dls.train)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(min(199, len(dls.train) - 1)):
        next(it)
    return {"first_batch_s": first, "batches_200_s": time.perf_counter() - t0}


STEPS = {"build": step_build, "train": step_train, "datasets": step_datasets, "memory": step_memory}


def run_step(a, step: str, n: int) -> dict:
    "One step in a fresh process; its JSON result with its peak RSS, or the error it died of."
    cmd = [
        sys.executable,
        __file__,
        "--step",
        step,
        "--n",
        str(n),
        "--work",
        a.work,
        "--mem-limit-gb",
        str(a.mem_limit_gb),
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode or not lines:
        err = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {
            "step": step,
            "n": n,
            "error": f"exit {res.returncode}: {err[:200]}",
            "wall_s": time.perf_counter() - t0,
        }
    return {"step": step, "n": n, **json.loads(lines[-1])}


def table(rows: list[dict]) -> str:
    by = {(r["step"], r["n"]): r for r in rows}
    sizes = sorted({r["n"] for r in rows})
    fmt = lambda r, k, f: "—" if r is None else (r["error"][:40] if "error" in r else f.format(r[k]))
    out = [
        "| documents | store build s | docs/s | `datasets` docs/s | ours / `datasets` | disk MB | build peak MB "
        "| start from warm cache s | 200 batches s | train peak MB | in-memory start s | in-memory peak MB |",
        "|" + "---|" * 12,
    ]
    for n in sizes:
        b, t, d, m = (by.get((s, n)) for s in ("build", "train", "datasets", "memory"))
        ratio = "—" if not (b and d) or "error" in b or "error" in d else f"{b['docs_per_s'] / d['docs_per_s']:.2f}×"
        out.append(
            f"| {n:,} | {fmt(b, 'seconds', '{:.1f}')} | {fmt(b, 'docs_per_s', '{:,.0f}')} | "
            f"{fmt(d, 'docs_per_s', '{:,.0f}')} | {ratio} | {fmt(b, 'disk_mb', '{:,.0f}')} | "
            f"{fmt(b, 'peak_mb', '{:,.0f}')} | {fmt(t, 'first_batch_s', '{:.2f}')} | "
            f"{fmt(t, 'batches_200_s', '{:.2f}')} | {fmt(t, 'peak_mb', '{:,.0f}')} | "
            f"{fmt(m, 'first_batch_s', '{:.1f}')} | {fmt(m, 'peak_mb', '{:,.0f}')} |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,3000000", help="corpus sizes in documents")
    ap.add_argument("--hf-sizes", default="1000000", help="sizes at which to run Hugging Face datasets' map")
    ap.add_argument("--memory-sizes", default="100000,1000000", help="sizes at which to run the old in-memory path")
    ap.add_argument("--mem-limit-gb", type=float, default=16, help="address-space limit of the in-memory step")
    ap.add_argument("--work", default=str(WORK / "scale"))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=out_dir("scale"), help="folder for the results files")
    ap.add_argument("--merge", help="a results JSON of other sizes to merge into this run's table")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:  # a child process: one step
        if a.step == "memory":
            lim = int(a.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        res = STEPS[a.step](a, corpus(Path(a.work), a.n))
        print(json.dumps({**res, "peak_mb": peak_mb()}))
        return
    Path(a.work).mkdir(parents=True, exist_ok=True)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    rows = []
    for n in ints(a.sizes):
        t0 = time.perf_counter()
        corpus(Path(a.work), n)
        print(f"corpus of {n:,} documents ready ({time.perf_counter() - t0:.0f}s)", flush=True)
        steps = (
            ["build", "train"]
            + (["datasets"] if n in ints(a.hf_sizes) else [])
            + (["memory"] if n in ints(a.memory_sizes) else [])
        )
        for step in steps:
            rows.append(run_step(a, step, n))
            print(json.dumps(rows[-1]), flush=True)
    if a.merge:
        rows = [r for r in json.loads(Path(a.merge).read_text())["rows"] if r["n"] not in ints(a.sizes)] + rows
    md = table(rows)
    print(md)
    write_results(a, {"rows": rows, "cpu_count": os.cpu_count()}, md)


if __name__ == "__main__":
    main()
