"""A classifier over HTTP: a FastAPI app around `load_classifier` whose concurrent requests are gathered into batches
(continuous micro-batching: one forward pass for the texts of every request that queued while the last one ran, up to
`max_batch` texts). `ulmfit-tx serve` runs it with uvicorn, which drains the requests in flight on SIGTERM.

    POST /predict   {"text": "..."} | {"texts": [...]}
                    pair models: {"text": "...", "text_pair": "..."} | {"pairs": [["...", "..."], ...]}
    GET  /health    status and counts (requests, texts, forward passes)
    GET  /metadata  task, labels, threshold, max_len, limits, versions
"""

import asyncio  # (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations as classes)
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._version import __version__
from .errors import UlmfitError
from .tasks import MULTI, SINGLE

__all__ = ["MicroBatcher", "BodyLimit", "create_app", "predictions"]

EXTRA = "pip install 'ulmfit_tx[serve]'"  # fastapi and uvicorn


class MicroBatcher:
    """Gathers the items of concurrent `submit` calls into batches for `predict` (a blocking function of a list of
    items, run in a worker thread, one batch at a time): a batch starts with the first waiting request and takes the
    requests that queued while the last batch ran, and those that arrive within `max_wait_ms`, up to `max_batch`
    items (a larger request is a batch of its own). With `max_wait_ms=0` an idle server answers at once and a busy
    one batches what arrived meanwhile."""

    def __init__(
        self,
        predict: Callable[[list], list],  # items -> one result per item, in order
        max_batch: int = 32,  # Most items a forward pass takes from several requests
        max_wait_ms: float = 0.0,  # How long the first request of a batch waits for others to arrive
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise UlmfitError(f"max_batch must be >= 1 and max_wait_ms >= 0, not {max_batch} and {max_wait_ms}")
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.carry = None  # a request that did not fit the last batch: the first of the next
        # one thread runs every batch: torch's (OpenMP) worker threads stay one team, not one per calling thread
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ulmfit_tx-predict")
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "largest_batch": 0, "predict_s": 0.0}

    async def submit(self, items: list) -> list:
        "The results of `items`, computed in a batch with the other requests' items."
        if self.task is None:  # started by the first request, on the server's event loop
            self.queue, self.task = asyncio.Queue(), asyncio.create_task(self._run())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((items, done))
        return await done

    async def _run(self):
        while True:
            first, self.carry = self.carry or await self.queue.get(), None
            batch, n, deadline = [first], len(first[0]), time.monotonic() + self.max_wait
            while n < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()  # what queued while the last batch ran
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if n + len(nxt[0]) > self.max_batch:  # it starts the next batch
                    self.carry = nxt
                    break
                batch.append(nxt)
                n += len(nxt[0])
            await self._serve(batch, n)

    async def _serve(self, batch: list, n: int):
        items, t0 = [it for its, _ in batch for it in its], time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, items)
        except Exception as e:  # every request of the batch gets the error
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
            return
        self.stats["requests"] += len(batch)
        self.stats["texts"] += n
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        self.stats["predict_s"] += time.perf_counter() - t0
        start = 0
        for its, done in batch:
            if not done.done():  # (a client that went away)
                done.set_result(out[start : start + len(its)])
            start += len(its)

    async def close(self):
        "Serve what is queued, then stop (the server's shutdown, after the requests in flight)."
        if self.task is not None:
            while not self.queue.empty() or self.carry is not None:
                await asyncio.sleep(0.01)
            self.task.cancel()


def predictions(learn, items: list) -> list[dict]:
    """`learn.predict_texts(items)` as JSON objects by task: `{"label", "scores": {class: probability}}`,
    `{"labels": [classes at or above the threshold], "scores"}` or `{"prediction": value}`."""
    task = learn.task
    table = learn.predict_texts(items)
    if task.kind not in (SINGLE, MULTI):
        return [{"prediction": float(v)} for v in table["prediction"]]
    probs = table[[f"prob_{c}" for c in task.classes]].to_numpy(np.float64)
    names = [str(c) for c in task.classes]
    res = []
    for row, p in zip(table.itertuples(index=False), probs):
        scores = dict(zip(names, map(float, p)))
        if task.kind == SINGLE:
            res.append({"label": str(row.label), "scores": scores})
        else:
            res.append({"labels": [c for c, q in scores.items() if q >= task.threshold], "scores": scores})
    return res


class BodyLimit:
    """ASGI middleware: a request whose body is over `max_body` bytes gets a 413 with a JSON `detail`, whether it
    declares its length (refused before it is read) or is sent in chunks (counted as they arrive)."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        over = f"request body over {self.max_body} bytes"
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return await JSONResponse({"detail": over}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # (raised inside FastAPI's body reading: answered as a 413)
                raise HTTPException(413, over)
            return message

        await self.app(scope, counted, send)


def create_app(
    model,  # A bundle folder (train-clf's output), or a loaded `ClassifierLearner`
    backend: str = "torch",  # "torch" or "onnx" (the bundle's ONNX graph)
    int8: bool = False,  # onnx: the int8 graph
    max_batch: int = 32,  # Most texts one forward pass takes from concurrent requests
    max_wait_ms: float = 0.0,  # How long a request waits for others to arrive (they queue while a batch runs)
    max_texts: int = 256,  # Most texts (or pairs) one request may send
    max_chars: int = 100_000,  # Longest text a request may send, in characters
    max_body: int = 8 * 2**20,  # Largest request body, in bytes
):
    """The FastAPI app that serves `model`: POST /predict, GET /health, GET /metadata, OpenAPI docs at /docs. Bad
    input (malformed JSON, wrong types, no text, a blank text, too many or too long texts, a body over `max_body`)
    gets a 4xx answer with a JSON `detail`, never a 500."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, Field
    except ImportError:
        raise UlmfitError(f"serving needs fastapi and uvicorn: {EXTRA}") from None
    from contextlib import asynccontextmanager

    from .learner import load_classifier

    learn = model if hasattr(model, "predict_texts") else load_classifier(model, backend=backend, int8=int8)
    task, tfm = learn.task, learn.tokenizer
    batcher = MicroBatcher(lambda items: predictions(learn, items), max_batch, max_wait_ms)

    class PredictRequest(BaseModel):
        "One text or a list of texts; for a pair model, one pair (text and text_pair) or a list of pairs."

        text: str | None = Field(None, description="one text (pair models: the first text)")
        text_pair: str | None = Field(None, description="pair models: the second text of `text`")
        texts: list[str] | None = Field(None, description="several texts")
        pairs: list[tuple[str, str]] | None = Field(None, description="pair models: several [text, text_pair]")

    def items_of(req: PredictRequest) -> list:
        given = [k for k in ("text", "texts", "pairs") if getattr(req, k) is not None]
        if len(given) != 1:
            raise HTTPException(422, "give one of text, texts" + (", pairs" if tfm.pair else ""))
        if tfm.pair and (req.texts is not None or (req.text is not None and req.text_pair is None)):
            raise HTTPException(422, "this model reads pairs of texts: give text and text_pair, or pairs")
        if not tfm.pair and (req.pairs is not None or req.text_pair is not None):
            raise HTTPException(422, "this model reads one text an item: give text or texts")
        items = (
            [(req.text, req.text_pair)] if tfm.pair and req.text is not None
            else [req.text] if req.text is not None
            else req.texts if req.texts is not None
            else [tuple(p) for p in req.pairs]
        )  # fmt: skip
        if not items:
            raise HTTPException(422, "no texts")
        if len(items) > max_texts:
            raise HTTPException(413, f"{len(items)} texts in one request; at most {max_texts}")
        flat = [t for it in items for t in (it if tfm.pair else [it])]
        if any(not t.strip() for t in flat):
            raise HTTPException(422, f"{sum(not t.strip() for t in flat)} text(s) are empty")
        if max(map(len, flat)) > max_chars:
            raise HTTPException(413, f"a text of {max(map(len, flat))} characters; at most {max_chars}")
        return items

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = FastAPI(
        title="ulmfit_tx classifier",
        version=__version__,
        description=f"{task.kind} classifier: {', '.join(map(str, task.classes))}",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    @app.exception_handler(UlmfitError)
    async def bad_input(request: Request, e: UlmfitError):  # what the model refuses is the input's fault
        return JSONResponse({"detail": str(e)}, status_code=422)

    app.add_middleware(BodyLimit, max_body=max_body)

    @app.post("/predict")
    async def predict(req: PredictRequest) -> dict:
        "Labels and scores (or values) of the texts, in their order."
        return {"predictions": await batcher.submit(items_of(req))}

    @app.get("/health")
    async def health() -> dict:
        "Whether the server answers, and what it has served."
        return {"status": "ok", **batcher.stats}

    @app.get("/metadata")
    async def metadata() -> dict:
        "What the model predicts and the server's settings."
        return {
            "task": task.kind,
            "labels": [str(c) for c in task.classes],
            "threshold": task.threshold if task.kind == MULTI else None,
            "pair": tfm.pair,
            "max_len": tfm.max_len,
            "chunks": tfm.chunks,
            "backend": backend,
            "int8": int8,
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "limits": {"max_texts": max_texts, "max_chars": max_chars, "max_body": max_body},
            "ulmfit_tx_version": __version__,
        }

    return app
