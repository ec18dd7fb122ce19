"Tiny smoke runs of the benchmark scripts, so they do not rot (the real runs are in bench/README.md)."

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ulmfit_tx import default_precision

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "imdb"
needs_imdb = pytest.mark.skipif(not (IMDB / "imdb.csv.gz").exists(), reason="../shared/data/imdb is not here")
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
needs_wiki = pytest.mark.skipif(not (WIKI / "train.txt.gz").exists(), reason="../shared/data/wikitext-2 is not here")


def _run(args, tmp_path):
    res = subprocess.run(
        [sys.executable, *map(str, args), "--out", tmp_path], capture_output=True, text=True, cwd=ROOT, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


SMOKE_CASES = ["clf_ours", "clf_trainer", "mlm_ours", "mlm_trainer", "infer_ours", "infer_pipeline"]
SMOKE_CASES += ["serve_torch", "serve_onnx", "serve_pipeline"]


@needs_imdb
def test_speed_benchmark_smoke(tmp_path):
    out = _run(
        [
            ROOT / "bench" / "speed.py",
            "--lengths",
            "48",
            "--tokens",
            256,
            "--bs",
            4,
            "--infer-bs",
            8,
            "--rounds",
            1,
            "--work",
            tmp_path / "work",
            "--serve-len",
            32,
            "--serve-train",
            40,
            "--serve-epochs",
            1,
            "--serve-n",
            16,
            "--latency-calls",
            4,
            "--only",  # each case is a fresh process: one of each kind (the others are the same code with a flag)
            ",".join(SMOKE_CASES),
        ],
        tmp_path,
    )
    res = json.loads((tmp_path / "cpu.json").read_text())["results"]
    assert set(res) == {"48", "serve"}  # one length (CI time)
    serve = res.pop("serve")  # 4. deployment: PyTorch, ONNX and the pipeline on the same reviews
    assert set(serve) >= {"serve_torch", "serve_onnx", "serve_pipeline"} and "serve_int8" not in serve
    for side in ("serve_torch", "serve_onnx", "serve_pipeline"):
        assert serve[side]["samples_per_s"] > 0 and 0 < serve[side]["p50_ms"] <= serve[side]["p95_ms"]
        assert 0 <= serve[side]["accuracy"] <= 1 and serve[side]["peak_mb"] > 0
    assert serve["serve_onnx"]["same_as_torch"] == 1.0  # float32 ONNX gives PyTorch's labels
    assert serve["serve_onnx"]["accuracy"] == serve["serve_torch"]["accuracy"] and "**4. Deployment**" in out
    for length, r in res.items():
        assert {c for c in SMOKE_CASES if not c.startswith("serve")} <= set(r)
        assert 0 < r["mean_tokens"] <= int(length)
        for side in ("clf_ours", "clf_trainer"):  # parts add up
            c = r[side]
            assert c["wall_s"] > c["train_s"] > 0 and 0 <= c["accuracy"] <= 1 and len(c["rounds"]) == 1
        assert all(r[k]["samples_per_s"] > 0 for k in ("mlm_ours", "mlm_trainer", "infer_ours", "infer_pipeline"))
    assert "| 48 (" in out and "**3. inference**" in out and (tmp_path / "cpu.png").exists()
    pairings = "defaults / bf16 both / fp32 both" if default_precision() == "bf16" else "defaults / fp32 both"
    assert "**Summary**" in out and f"Each cell: {pairings}" in out  # the per-length ratios of each precision pairing


@needs_imdb
def test_imdb_benchmark_smoke(tmp_path):
    args = "--labels 16 --n-test 20 --lm-texts 120 --lm-bs 8 --max-len 32 --lm-max-len 32 --bs 8 --clf-epochs 1"
    args += " --lm-objective simcse --clf-seeds 0,1 --self-train-rounds 1 --self-train-texts 30"
    args += " --self-train-threshold 0.5 --anchors trainer,setfit --tag smoke"
    out = _run([ROOT / "bench" / "imdb.py", *args.split()], tmp_path)
    rows = json.loads((tmp_path / "smoke.json").read_text())["results"]
    assert [(r["labels"], r["seed"]) for r in rows] == [(16, None)] + [(16, 0)] * 5 + [(16, 1)] * 5
    methods = [r["method"].split(" (")[0].split(",")[0] for r in rows[1:6]]
    assert methods == ["classifier alone", "stage 2", "stage 2", "HF Trainer", "SetFit 1.2"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and "TF-IDF" in out and (tmp_path / "smoke.png").exists()
    gains = [100 * (rows[i + 1]["accuracy"] - rows[i]["accuracy"]) for i in (1, 6)]  # (b) - (a), paired by seed
    assert "| 16 | 2 | " in out and f"| {gains[0]:+.2f}, {gains[1]:+.2f} |" in out, "the paired-gain summary"
    assert rows[2]["self_training"][0]["pseudo_labels"] > 0 and "ours minus it" in out
    runs = json.loads((tmp_path / "work" / "imdb_clf_runs.json").read_text())
    assert len(runs) == 10, "each (model, seed) classifier run, anchor run and probe is kept and reused"
    assert not (ROOT / "checkpoints").exists(), "SetFit's checkpoints go into --out, not the working folder"


@needs_wiki
def test_multilabel_benchmark_smoke(tmp_path):
    args = "--max-train 40 --seeds 0,1 --max-len 32 --epochs 1 --tag smoke"
    out = _run([ROOT / "bench" / "multilabel.py", *args.split()], tmp_path)
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert len(res["classes"]) == 12 and [r["seed"] for r in res["results"]] == [0, 0, 1, 1]
    assert all(0 <= r["f1_macro"] <= 1 and 0 < r["threshold"] < 1 for r in res["results"])
    assert "| TF-IDF + LR (one-vs-rest) |" in out and "Ours minus TF-IDF, macro F1 points, per seed:" in out


@needs_imdb
def test_memory_models_benchmark_smoke(tmp_path):
    out = _run(
        [
            ROOT / "bench" / "memory_models.py",
            "--vocab",
            300,
            "--dim",
            32,
            "--depth",
            1,
            "--heads",
            2,
            "--seg",
            16,
            "--lmem",
            4,
            "--cmem",
            8,
            "--ratio",
            2,
            "--bs",
            2,
            "--steps",
            2,
            "--warmup",
            1,
            "--rounds",
            1,
            "--n-train",
            24,
            "--n-test",
            16,
            "--max-len",
            64,
            "--epochs",
            1,
            "--clf-bs",
            8,
            "--work",
            tmp_path / "work",
        ],
        tmp_path,
    )
    res = json.loads((tmp_path / "cpu.json").read_text())["results"]
    assert {
        "memxl_ours",
        "memxl_ref",
        "memxl_paired",
        "compressive_ours",
        "compressive_ref",
        "compressive_paired",
        "imdb_scratch",
        "imdb_memxl",
    } <= set(res)
    assert all(
        res[f"{m}_paired"]["speedup"] > 0 and len(res[f"{m}_paired"]["rounds_speedup"]) == 1
        for m in ("memxl", "compressive")
    )
    assert res["memxl_ref_bug"]["samples"] == 0, "the reference fails three backward() calls in a row"
    assert res["imdb_memxl"]["mean_tokens_read"] > res["imdb_scratch"]["mean_tokens_read"]
    assert "| Memory Transformer-XL |" in out and "| memxl |" in out


@needs_imdb
def test_scale_benchmark_smoke(tmp_path):
    out = _run(
        [
            ROOT / "bench" / "scale.py",
            "--sizes",
            2000,
            "--hf-sizes",
            "",
            "--memory-sizes",
            2000,
            "--work",
            tmp_path / "work",
            "--tag",
            "smoke",
        ],
        tmp_path,
    )
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert [r["step"] for r in rows] == ["build", "train", "memory"] and not any("error" in r for r in rows)
    assert all(r["peak_mb"] > 0 for r in rows) and rows[0]["docs_per_s"] > 0 and "| 2,000 |" in out


@needs_imdb
def test_distributed_benchmark_smoke(tmp_path):
    out = _run(
        [
            ROOT / "bench" / "distributed.py",
            "--tasks",
            "clf",
            "--n-train",
            16,
            "--n-valid",
            8,
            "--bs",
            4,
            "--clf-len",
            32,
            "--rounds",
            1,
            "--work",
            tmp_path / "work",
            "--tag",
            "smoke",
        ],
        tmp_path,
    )
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert [r["procs"] for r in rows] == [1, 2] and all(r["samples_per_s"] > 0 for r in rows)
    assert "| clf | 2 × 1 |" in out


@needs_imdb
def test_marge_benchmark_smoke(tmp_path):
    out = _run(
        [
            ROOT / "bench" / "marge.py",
            "--parts",
            "index,wiki,imdb",
            "--index-sizes",
            "60,120",
            "--index-max-len",
            32,
            "--wiki-articles",
            2,
            "--wiki-max-len",
            32,
            "--adapt-texts",
            24,
            "--labels",
            16,
            "--seeds",
            1,
            "--n-test",
            20,
            "--clf-max-len",
            32,
            "--work",
            tmp_path / "work",
            "--tag",
            "smoke",
        ],
        tmp_path,
    )
    index = json.loads((tmp_path / "index_smoke.json").read_text())["results"]
    assert [r["n"] for r in index] == [60, 120] and all(r["embed_s"] > 0 and r["peak_mb"] > 0 for r in index)
    wiki = json.loads((tmp_path / "wiki_smoke.json").read_text())["results"]
    assert all(0 <= wiki[k][0] <= 1 for k in ("init", "tfidf", "trained")) and 0 < wiki["chance"] < 1
    imdb = json.loads((tmp_path / "imdb_smoke.json").read_text())["results"]
    assert {r["method"] for r in imdb["rows"]} == {
        "TF-IDF + logistic regression",
        "MiniLM, no adaptation",
        "MiniLM + MLM",
        "MiniLM + Marge",
    }
    assert "| MiniLM + Marge |" in out
