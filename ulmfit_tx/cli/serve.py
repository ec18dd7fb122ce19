"`ulmfit-tx serve`: a classifier bundle over HTTP (FastAPI + uvicorn), concurrent requests batched together."

from ._options import add_model

HELP = "serve a classifier bundle over HTTP: POST /predict, GET /health, GET /metadata (micro-batched)"


def add_arguments(p):
    add_model(p, "a bundle folder (train-clf's output, or learn.export_bundle)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="the bundle's weights or ONNX graph")
    p.add_argument("--int8", action="store_true", help="onnx: the int8 graph (model.int8.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="most texts one forward pass takes (default 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a request waits for others to share its forward pass (default 0: a batch is what queued "
        "while the last one ran)",
    )
    p.add_argument("--max-texts", type=int, default=256, help="most texts one request may send (default 256)")
    p.add_argument("--max-chars", type=int, default=100_000, help="longest text, in characters (default 100000)")


def run(a):
    from ..errors import UlmfitError, check_positive
    from ..serve import EXTRA, create_app

    check_positive(port=a.port, max_batch=a.max_batch, max_texts=a.max_texts, max_chars=a.max_chars)
    if a.max_wait_ms < 0:
        raise UlmfitError(f"--max-wait-ms must be 0 or more, not {a.max_wait_ms}")
    try:
        import uvicorn
    except ImportError:
        raise UlmfitError(f"ulmfit-tx serve needs fastapi and uvicorn: {EXTRA}") from None
    app = create_app(a.model, a.backend, a.int8, a.max_batch, a.max_wait_ms, a.max_texts, a.max_chars)
    print(f"serving {a.model} ({a.backend}{' int8' if a.int8 else ''}) on http://{a.host}:{a.port} (docs: /docs)",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")  # SIGTERM / Ctrl-C: drains, then exits
