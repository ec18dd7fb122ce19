"""Training on several processes (torchrun, fastai's `distrib_ctx`) against one, with the CLI as users run it:
`ulmfit-tx train-clf` (one-cycle) and `ulmfit-tx finetune-lm` with the offline MiniLM-L6, on IMDb reviews.

    python bench/distributed.py                                  # CPU: 1 process x 2 threads vs 2 processes x 1 thread
    python bench/distributed.py --procs 1,2,4,8 --threads 4 --n-train 8192 --bs 32 --tag gpu   # on a GPU machine

Each configuration runs `--rounds` times, alternating, each run a fresh command. The table gives the median
training samples/s (from metrics.json: all processes together), the whole command's wall time, the validation
metric, and the scaling efficiency: samples/s at N processes / (N x samples/s at 1). Results in
bench/results/distributed/<tag>.{json,md}."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from _common import IMDB, WORK, minilm, out_dir, write_results

DATA = IMDB / "imdb.csv.gz"


def data(a) -> Path:
    "`n_train` training and `n_valid` validation reviews (balanced, seeded), as a CSV in the work folder."
    path = Path(a.work) / f"imdb_{a.n_train}_{a.n_valid}.csv"
    if not path.exists():
        df = pd.read_csv(DATA, keep_default_na=False)
        parts = [
            df[df.is_valid == v].groupby("label").sample(n // 2, random_state=0)
            for v, n in ((False, a.n_train), (True, a.n_valid))
        ]
        pd.concat(parts).to_csv(path, index=False)
    return path


def run(a, task: str, procs: int, round_: int) -> dict:
    out = Path(a.work) / f"{task}_{procs}p_{round_}"
    cli = ["-m", "ulmfit_tx.cli"]
    launch = (
        [sys.executable, *cli]
        if procs == 1
        else [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(procs), *cli]
    )
    common = [
        "--model",
        minilm(),
        "--data",
        str(data(a)),
        "--out",
        str(out),
        "--force",
        "--bs",
        str(a.bs),
        "--cache",
        str(Path(a.work) / "cache"),
        "--epochs",
        "1",
    ]
    cmd = [
        *launch,
        *(
            ["train-clf", "--schedule", "one-cycle", "--max-len", str(a.clf_len)]
            if task == "clf"
            else ["finetune-lm", "--max-len", str(a.mlm_len)]
        ),
        *common,
    ]
    threads = a.threads if procs > 1 else a.threads * a.base_procs
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"{task} on {procs} process(es) failed:\n{res.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    n = m.get("n_train") or m.get("n_train_items")
    return {
        "task": task,
        "procs": procs,
        "threads_per_proc": threads,
        "round": round_,
        "wall_s": wall,
        "train_s": m["train_time_s"],
        "samples_per_s": n / m["train_time_s"],
        "metric": m.get("accuracy", m.get("perplexity")),
        "metric_name": "accuracy" if task == "clf" else "perplexity",
    }


def table(rows: list[dict]) -> str:
    out = [
        "| task | processes × threads | samples/s (median) | vs 1 process | scaling efficiency | whole command s "
        "| metric |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        base = None
        for procs in sorted({r["procs"] for r in rows if r["task"] == task}):
            rs = [r for r in rows if r["task"] == task and r["procs"] == procs]
            sps = statistics.median(r["samples_per_s"] for r in rs)
            base = base or sps
            out.append(
                f"| {task} | {procs} × {rs[0]['threads_per_proc']} | {sps:.2f} | {sps / base:.2f}× | "
                f"{sps / (base * procs):.2f} | "
                f"{statistics.median(r['wall_s'] for r in rs):.0f} | "
                f"{rs[0]['metric_name']} {statistics.median(r['metric'] for r in rs):.4f} |"
            )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2", help="process counts to compare")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process when several run")
    ap.add_argument("--base-procs", type=int, default=2, help="the single process gets threads x this (all the cores)")
    ap.add_argument("--tasks", default="clf,mlm")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-valid", type=int, default=64)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--clf-len", type=int, default=128)
    ap.add_argument("--mlm-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=str(WORK / "distributed"))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=out_dir("distributed"), help="folder for the results files")
    a = ap.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(a.rounds):
        for task in a.tasks.split(","):
            for procs in [int(p) for p in a.procs.split(",")]:
                rows.append(run(a, task, procs, r))
                print(json.dumps(rows[-1]), flush=True)
    md = table(rows)
    print(md)
    write_results(a, {"rows": rows, "args": vars(a)}, md)


if __name__ == "__main__":
    main()
