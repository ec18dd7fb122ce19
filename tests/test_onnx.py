"""ONNX export (learn.export_onnx, ulmfit-tx export-onnx) and serving it with ONNX Runtime
(load_classifier(backend='onnx'))."""

import copy
import shutil
from collections import Counter

import pytest
import torch
from transformers import AutoModel

from ulmfit_tx import UlmfitError, clas_dataloaders, classifier_learner, load_classifier
from ulmfit_tx.cli import main

from .conftest import ARCHS, N_LAYERS, SEGMENT
from .test_export import TEXTS, trained  # noqa: F401 (the module fixture: a trained roberta, pooling and native heads)
from .test_training import keyword_task

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
onnx_format = pytest.importorskip("onnx")
from ulmfit_tx.onnx_attention import fuse_attention  # noqa: E402 (needs the onnx extra)

LONG = [
    "the film was wonderful " * 40,
    "terrible",
]  # truncated at max_len; batches of other shapes than the traced one


def _probs(learn, texts, bs=2):
    return torch.tensor(learn.predict_texts(texts, bs=bs).iloc[:, 1:].values)


@pytest.mark.parametrize("head", ["pooling", "native"])
def test_onnx_predicts_what_pytorch_predicts(trained, head, tmp_path):  # noqa: F811
    learn = trained[head]
    bundle = learn.export_bundle(tmp_path / "bundle")
    res = learn.export_onnx(bundle / "model.onnx")
    assert res["max_abs_diff"] < 1e-4 and res["agreement"] == 1.0
    onnx = load_classifier(bundle, backend="onnx")
    texts = TEXTS + LONG
    torch.testing.assert_close(_probs(onnx, texts), _probs(learn, texts), rtol=0, atol=1e-4)
    assert onnx.predict_texts(texts).label.tolist() == learn.predict_texts(texts).label.tolist()
    label, idx, probs = onnx.predict(TEXTS[0])
    assert str(label) == str(learn.predict(TEXTS[0])[0]) and probs.shape == (2,)
    # labelled data through fastai's own path, as on the learner that wrote it
    df = keyword_task(16, seed=3)
    preds, targs = onnx.get_preds(dl=onnx.dls.test_dl(df, with_labels=True))
    eager = load_classifier(bundle)  # the same bundle on PyTorch
    want, want_targs = eager.get_preds(dl=eager.dls.test_dl(df, with_labels=True))
    assert preds.shape == (16, 2) and torch.equal(targs, want_targs)
    torch.testing.assert_close(preds, want, rtol=0, atol=1e-4)


def test_int8_graph_is_smaller_and_close(trained, tmp_path):  # noqa: F811
    learn = trained["pooling"]
    bundle = learn.export_bundle(tmp_path / "bundle")
    fp32, int8 = learn.export_onnx(bundle / "model.onnx"), learn.export_onnx(bundle / "model.int8.onnx", int8=True)
    assert int8["mb"] < fp32["mb"] and int8["int8"]
    ops = Counter(n.op_type for n in onnx_format.load(bundle / "model.int8.onnx").graph.node)
    assert ops["QAttention"] == N_LAYERS and not ops["MatMul"] and not ops["Gemm"]  # every weight is int8
    got = _probs(load_classifier(bundle, backend="onnx", int8=True), TEXTS)
    assert (got - _probs(learn, TEXTS)).abs().max() < 0.05  # quantized: close, not equal
    with pytest.raises(UlmfitError, match="backend='onnx'"):
        load_classifier(bundle, int8=True)


@pytest.mark.parametrize("arch", ["bert", "albert", "distilbert", "scratch"])
def test_every_architecture_exports_with_dynamic_batch_and_length(tiny_models, own_models, arch, tmp_path):
    src = own_models[arch] if arch == "scratch" else tiny_models[arch]
    learn = classifier_learner(clas_dataloaders(keyword_task(16), src, max_len=48, bs=8), src)
    res = learn.export_onnx(tmp_path / "m.onnx")  # checked on other batch sizes and lengths
    assert res["max_abs_diff"] < 1e-4
    ops = Counter(n.op_type for n in onnx_format.load(tmp_path / "m.onnx").graph.node)
    assert ops["Attention"] == (0 if arch == "scratch" else N_LAYERS)  # Hugging Face encoders: one node a layer
    torch.testing.assert_close(
        _probs(load_classifier(tmp_path / "m.onnx", backend="onnx"), TEXTS + LONG, bs=3),
        _probs(learn, TEXTS + LONG, bs=3),
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_attention_computes_what_the_encoder_computes(tiny_models, arch):
    hf = AutoModel.from_pretrained(tiny_models[arch]).eval()
    fused = copy.deepcopy(hf)
    assert fuse_attention(fused) and fused.config._attn_implementation == "ulmfit_tx_onnx"
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padded at the end
    mask[1, :4] = 0  # padded at the start
    with torch.inference_mode():
        want, got = (m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (hf, fused))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_portable_graph_holds_standard_operators_only(tiny_models, tmp_path):
    src = tiny_models["bert"]
    learn = classifier_learner(clas_dataloaders(keyword_task(16), src, max_len=48, bs=8), src)
    assert learn.export_onnx(tmp_path / "p.onnx", portable=True)["max_abs_diff"] < 1e-4
    onnx_format.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)  # any ONNX runtime can read it
    assert {n.domain for n in onnx_format.load(tmp_path / "p.onnx").graph.node} == {""}
    learn.export_onnx(tmp_path / "f.onnx")  # the default graph: ONNX Runtime's fused attention
    assert "com.microsoft" in {n.domain for n in onnx_format.load(tmp_path / "f.onnx").graph.node}


def test_memory_encoders_are_refused_with_the_reason(own_models, tmp_path):
    learn = classifier_learner(
        clas_dataloaders(keyword_task(16), own_models["memxl"], max_len=2 * SEGMENT, bs=8), own_models["memxl"]
    )
    with pytest.raises(UlmfitError, match="segment by segment"):
        learn.export_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_onnx_and_predict_with_onnx_runtime(trained, tmp_path, capsys):  # noqa: F811
    bundle = trained["pooling"].export_bundle(tmp_path / "bundle")
    assert main(["predict", "--model", str(bundle), "--backend", "onnx", "--text", "x"]) == 2
    assert "no model.onnx; write it with: ulmfit-tx export-onnx" in capsys.readouterr().err
    assert main(["export-onnx", "--model", str(bundle)]) == 0
    assert "probabilities within" in capsys.readouterr().out and (bundle / "model.onnx").is_file()
    assert main(["export-onnx", "--model", str(bundle)]) == 2  # never replaced without --force
    assert "exists" in capsys.readouterr().err
    outs = {}
    for backend in ("torch", "onnx"):
        assert (
            main(["predict", "--model", str(bundle), "--backend", backend, "--text", TEXTS[0], "--text", TEXTS[1]])
            == 0
        )
        outs[backend] = capsys.readouterr().out.split("\n")[-3:]
    assert [r.split()[:-2] for r in outs["onnx"]] == [r.split()[:-2] for r in outs["torch"]]  # same texts and labels
    # elsewhere: the ONNX file with what it needs beside it, usable without the bundle
    elsewhere = tmp_path / "serve"
    elsewhere.mkdir()
    assert main(["export-onnx", "--model", str(bundle), "--int8", "--out", str(elsewhere / "clf.onnx")]) == 0
    shutil.rmtree(bundle)
    assert {"clf.onnx", "ulmfit_tx.json", "tokenizer.json", "config.json"} <= {p.name for p in elsewhere.iterdir()}
    assert main(["predict", "--model", str(elsewhere / "clf.onnx"), "--backend", "onnx", "--text", TEXTS[0]]) == 0
    assert main(["predict", "--model", str(elsewhere), "--text", TEXTS[0]]) == 2  # no weights there for torch
    assert "no model.safetensors" in capsys.readouterr().err


def test_onnx_file_is_not_written_beside_another_models_files(trained, tmp_path):  # noqa: F811
    other = trained["native"].export_bundle(tmp_path / "other")
    with pytest.raises(UlmfitError, match="another model's ulmfit_tx.json"):
        trained["pooling"].export_onnx(other / "model.onnx")
    assert not (other / "model.onnx").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text("{}")  # a user's file of the same name is kept
    with pytest.raises(UlmfitError, match="already has tokenizer.json"):
        trained["pooling"].export_onnx(mine / "m.onnx")
    assert (mine / "tokenizer.json").read_text() == "{}" and sorted(p.name for p in mine.iterdir()) == [
        "tokenizer.json"
    ]
