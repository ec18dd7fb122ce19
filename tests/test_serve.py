"""`ulmfit-tx serve`: the HTTP API over a bundle, its micro-batching, its 4xx answers to bad input, its drain on
SIGTERM."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from ulmfit_tx.cli import main  # noqa: E402
from ulmfit_tx.serve import create_app  # noqa: E402

from .test_export import TEXTS, trained  # noqa: E402, F401 (the module fixture: a trained roberta classifier)


def _scores(row) -> dict:
    return {c: row[f"prob_{c}"] for c in ("neg", "pos")}


def test_predict_health_and_metadata_answer_as_the_learner_predicts(trained):  # noqa: F811
    learn = trained["pooling"]
    want = learn.predict_texts(TEXTS)
    with TestClient(create_app(learn)) as client:
        one = client.post("/predict", json={"text": TEXTS[0]}).json()["predictions"]
        many = client.post("/predict", json={"texts": TEXTS}).json()["predictions"]
        assert len(one) == 1 and one[0]["label"] == str(want.label[0])
        assert [p["label"] for p in many] == [str(v) for v in want.label]
        for p, (_, row) in zip(many, want.iterrows()):
            assert p["scores"] == pytest.approx(_scores(row), abs=1e-5)
        meta = client.get("/metadata").json()
        assert meta["task"] == "single_label" and meta["labels"] == ["neg", "pos"] and meta["pair"] is False
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["requests"] == 2 and health["texts"] == 1 + len(TEXTS)
        assert client.get("/openapi.json").json()["paths"]["/predict"]["post"]


@pytest.mark.parametrize(
    "body,status,detail",
    [
        (b'{"text": "unclosed', 422, "JSON decode error"),
        ({"text": 3}, 422, "string"),
        ({"texts": "not a list"}, 422, "list"),
        ({}, 422, "give one of text, texts"),
        ({"text": "a", "texts": ["b"]}, 422, "give one of text, texts"),
        ({"texts": []}, 422, "no texts"),
        ({"texts": ["fine", "  "]}, 422, "1 text(s) are empty"),
        ({"text": "a", "text_pair": "b"}, 422, "reads one text an item"),
        ({"texts": ["x"] * 5}, 413, "5 texts in one request; at most 4"),
        ({"text": "x" * 51}, 413, "a text of 51 characters; at most 50"),
        ({"text": "x" * 40, "pad": "y" * 2000}, 413, "request body over 1000 bytes"),
        (iter([b'{"text": "', b"x" * 2000, b'"}']), 413, "request body over 1000 bytes"),  # chunked: no length
    ],
)
def test_bad_input_gets_a_4xx_json_answer(trained, body, status, detail):  # noqa: F811
    app = create_app(trained["pooling"], max_texts=4, max_chars=50, max_body=1000)
    with TestClient(app) as client:
        if isinstance(body, dict):
            r = client.post("/predict", json=body)
        else:
            r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and detail in json.dumps(r.json()["detail"]), r.text


def test_concurrent_requests_share_forward_passes(trained):  # noqa: F811
    learn = trained["pooling"]
    app = create_app(learn, max_batch=16, max_wait_ms=300)
    want = learn.predict_texts(TEXTS)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            rs = await asyncio.gather(*[client.post("/predict", json={"text": t}) for t in TEXTS * 2])
            return [r.json()["predictions"][0] for r in rs], (await client.get("/health")).json()

    got, health = asyncio.run(burst())
    assert [p["label"] for p in got] == [str(v) for v in want.label] * 2, "each request gets its own text's answer"
    assert health["requests"] == 2 * len(TEXTS) and health["batches"] < health["requests"]
    assert health["largest_batch"] > 1, "several requests were served by one forward pass"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_drains_requests_in_flight_on_sigterm(trained, tmp_path):  # noqa: F811
    bundle = trained["pooling"].export_bundle(tmp_path / "bundle")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ulmfit_tx.cli", "serve", "--model", str(bundle), "--port", str(port),
         "--max-wait-ms", "1500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}/predict", json={"text": TEXTS[0]},
                                                                         timeout=30)))  # fmt: skip
        t.start()
        time.sleep(0.5)  # the request waits in its batch window (1.5 s) ...
        proc.send_signal(signal.SIGTERM)  # ... when the server is told to stop
        t.join(30)
        assert answer["r"].status_code == 200 and answer["r"].json()["predictions"][0]["label"] in ("neg", "pos")
        assert proc.wait(30) in (0, -signal.SIGTERM)  # (uvicorn ends by the signal it drained for)
    finally:
        proc.kill()


def test_serve_refuses_what_is_not_a_bundle_in_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such model folder" in err and len(err.splitlines()) == 1
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 2
    assert "max-batch must be positive" in capsys.readouterr().err
