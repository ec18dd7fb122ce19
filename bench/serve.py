"""Load test of `ulmfit-tx serve` (PyTorch, ONNX, ONNX int8) against what a user writes by hand: a FastAPI server
that calls `pipeline("text-classification")` for each request. Every server runs in its own process on localhost;
one asyncio client sends one review a request at concurrency 1, 8 and 32 (`--requests` each), then reports
requests/s and the p50 / p95 / p99 latency, and counts the requests that failed or got no answer. A last run sends
`--memory-requests` requests to `--memory-server` and samples its resident memory every 1,000 (flat or not).

The classifier: the offline MiniLM-L6 encoder with the pooling head (untrained: this measures speed only), max_len
`--max-len`, exported as a bundle, its ONNX graph and its int8 graph. The reviews: data/imdb_sample.csv.

    python bench/serve.py                                   # CPU: about 15 minutes
    python bench/serve.py --requests 100 --memory-requests 0 --tag smoke

Writes bench/results/serve/<tag>.json and .md.
"""

import argparse  # (no `from __future__ import annotations`: FastAPI reads the baseline endpoint's annotations)
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import HERE, WORK, minilm, out_dir, write_results

SAMPLE = HERE.parent / "data" / "imdb_sample.csv"
SERVERS = ("serve_torch", "serve_onnx", "serve_int8", "pipeline")


def baseline_app(bundle: str, max_len: int):
    "The hand-written alternative: FastAPI, `pipeline()` once per request (in FastAPI's thread pool)."
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    import ulmfit_tx  # noqa: F401 (registers the pooling head's class)

    pipe = pipeline("text-classification", model=bundle, top_k=None, truncation=True, max_length=max_len)
    app = FastAPI()

    class Req(BaseModel):
        text: str

    @app.post("/predict")
    def predict(req: Req) -> dict:
        return {"predictions": pipe([req.text])}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


def make_bundle(a) -> Path:
    "The MiniLM pooling classifier as a bundle with both ONNX graphs (made once, in `WORK/serve`)."
    folder = WORK / "serve" / f"minilm_{a.max_len}"
    if (folder / "model.int8.onnx").exists():
        return folder
    from ulmfit_tx import clas_dataloaders, classifier_learner

    df = pd.read_csv(SAMPLE, keep_default_na=False).head(64)
    learn = classifier_learner(clas_dataloaders(df, minilm(), max_len=a.max_len, bs=16, cache=False), minilm())
    learn.export_bundle(folder, force=True)
    for int8 in (False, True):
        learn.export_onnx(folder / ("model.int8.onnx" if int8 else "model.onnx"), int8=int8, force=True)
    return folder


def start(kind: str, bundle: Path, a) -> tuple[subprocess.Popen, str]:
    "A server of `kind` on a free localhost port, started and answering /health."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if kind == "pipeline":
        cmd = [sys.executable, __file__, "--baseline-server", str(bundle), "--port", str(port), "--max-len",
               str(a.max_len)]  # fmt: skip
    else:
        backend = ["--backend", "torch"] if kind == "serve_torch" else ["--backend", "onnx"]
        cmd = [sys.executable, "-m", "ulmfit_tx.cli", "serve", "--model", str(bundle), "--port", str(port), *backend,
               *(["--int8"] if kind == "serve_int8" else []), "--max-batch", str(a.max_batch),
               "--max-wait-ms", str(a.max_wait_ms)]  # fmt: skip
    log = open(WORK / "serve" / f"{kind}.log", "w")  # (a pipe nobody reads would stall the server once full)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} did not start: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} did not answer /health in 2 minutes")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def load(url: str, texts: list[str], concurrency: int, n: int, on_thousand=None) -> dict:
    "`n` requests of one text each, `concurrency` at a time; latencies of the answered ones, failures counted."
    import httpx

    latencies, failed, sent = [], 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker():
            nonlocal failed, sent
            while sent < n:
                text = texts[sent % len(texts)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", json={"text": text})
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failed += 1
                if on_thousand and (len(latencies) + failed) % 1000 == 0:
                    on_thousand(len(latencies) + failed)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        seconds = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": n,
        "answered": len(latencies),
        "failed": failed,
        "requests_per_s": len(latencies) / seconds,
        **{f"p{q}_ms": float(np.percentile(ms, q)) if len(ms) else None for q in (50, 95, 99)},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests per server and concurrency")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--memory-requests", type=int, default=10_000, help="requests of the memory run (0: none)")
    ap.add_argument("--memory-server", default="serve_torch", choices=SERVERS[:3], help="the server of the memory run")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=0.0)
    ap.add_argument("--out", default=out_dir("serve"))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--baseline-server", help=argparse.SUPPRESS)  # (internal: run the pipeline() server)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.baseline_server:
        import uvicorn

        uvicorn.run(baseline_app(a.baseline_server, a.max_len), host="127.0.0.1", port=a.port, log_level="warning")
        return
    texts = pd.read_csv(SAMPLE, keep_default_na=False).text.tolist()
    bundle = make_bundle(a)
    rows, memory = [], None
    for kind in a.servers.split(","):
        proc, url = start(kind, bundle, a)
        try:
            asyncio.run(load(url, texts, 4, 32))  # warm-up
            for c in map(int, a.concurrency.split(",")):
                res = {"server": kind, **asyncio.run(load(url, texts, c, a.requests)), "rss_mb": rss_mb(proc.pid)}
                if kind != "pipeline":  # forward passes and their seconds so far (warm-up and earlier loads too)
                    import httpx

                    res["health"] = httpx.get(f"{url}/health").json()
                rows.append(res)
                print(f"{kind:12s} c={c:3d}: {res['requests_per_s']:6.1f} req/s, p50 {res['p50_ms'] or 0:.0f} ms, "
                      f"p99 {res['p99_ms'] or 0:.0f} ms, failed {res['failed']}", flush=True)  # fmt: skip
            if kind == a.memory_server and a.memory_requests:
                samples = []
                asyncio.run(load(url, texts, 8, a.memory_requests, lambda k: samples.append((k, rss_mb(proc.pid)))))
                memory = {"requests": a.memory_requests, "rss_mb_every_1000": samples}
                print(f"memory over {a.memory_requests} requests (MB): {[round(m) for _, m in samples]}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    df = pd.DataFrame(rows)
    base = df[df.server == "pipeline"].set_index("concurrency").requests_per_s
    df["vs_pipeline"] = [r.requests_per_s / base.get(r.concurrency, np.nan) for r in df.itertuples()]
    cols = ["server", "concurrency", "requests_per_s", "vs_pipeline", "p50_ms", "p95_ms", "p99_ms", "failed", "rss_mb"]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = "\n".join(
        ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    )
    if memory:
        mb = [m for _, m in memory["rss_mb_every_1000"]]
        md += f"\n\n{a.memory_server} resident memory every 1,000 of {memory['requests']} requests (MB): " + ", ".join(
            f"{m:.0f}" for m in mb
        )
    print(md)
    settings = {k: v for k, v in vars(a).items() if k not in ("baseline_server", "port")}
    write_results(a, {"settings": settings, "rows": rows, "memory": memory, "threads": os.cpu_count()}, md)


if __name__ == "__main__":
    main()
