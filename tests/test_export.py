import json
import pickletools
import subprocess
import sys
import zipfile

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from ulmfit_tx import UlmfitError, clas_dataloaders, classifier_learner, mlm_dataloaders, mlm_learner

from .test_training import keyword_task

TEXTS = ["it was a wonderful film", "terrible, the plot was terrible", "the actor and the scene", "x"]


@pytest.fixture(scope="module")
def trained(tiny_models):
    torch.manual_seed(0)
    out = {}
    for head in ["pooling", "native"]:
        learn = classifier_learner(
            clas_dataloaders(keyword_task(), tiny_models["roberta"], max_len=32, bs=8),
            tiny_models["roberta"],
            head=head,
        )
        learn.unfreeze()
        learn.fit_one_cycle(3, 3e-3)
        out[head] = learn
    return out


def _globals_in_pickle(path):
    "Module names of every class or function the pickle inside a torch.save file refers to."
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    mods, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            mods.add(strings[-2])
        elif op.name == "GLOBAL":
            mods.add(arg.split(" ")[0])
    return mods


@pytest.mark.parametrize("head", ["pooling", "native"])
def test_export_loads_in_a_fresh_process_with_identical_predictions(trained, head, tmp_path):
    learn = trained[head]
    learn.path = tmp_path
    learn.export("export.pkl")
    mods = _globals_in_pickle(tmp_path / "export.pkl")
    assert not any(m.split(".")[0] in ("transformers", "tokenizers") for m in mods), mods
    before = learn.predict_texts(TEXTS)
    single = [learn.predict(t) for t in TEXTS]
    assert [str(s[0]) for s in single] == before.label.tolist()
    code = (
        "import json, sys; from fastai.learner import load_learner; "
        f"learn = load_learner({str(tmp_path / 'export.pkl')!r}); "
        f"r = learn.predict_texts({TEXTS!r}); p = learn.predict({TEXTS[0]!r}); "
        "print(json.dumps({'labels': r.label.tolist(), 'probs': r.iloc[:, 1:].values.tolist(), "
        "'one': [str(p[0]), p[2].tolist()]}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["labels"] == before.label.tolist()
    torch.testing.assert_close(torch.tensor(got["probs"]), torch.tensor(before.iloc[:, 1:].values), rtol=0, atol=1e-6)
    assert got["one"][0] == str(single[0][0])
    torch.testing.assert_close(torch.tensor(got["one"][1]), single[0][2], rtol=0, atol=1e-6)


def test_native_head_round_trips_through_a_hugging_face_folder(trained, tmp_path):
    learn = trained["native"]
    learn.save_pretrained(tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        probs = model(**tok(TEXTS[:2], return_tensors="pt", padding=True)).logits.softmax(-1)
    want = torch.tensor(learn.predict_texts(TEXTS[:2]).iloc[:, 1:].values, dtype=probs.dtype)
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-5)
    with pytest.raises(UlmfitError, match="exists"):
        learn.save_pretrained(tmp_path / "hf")


def test_mlm_save_pretrained_round_trip(bert_dir, small_df, tmp_path):
    learn = mlm_learner(mlm_dataloaders(small_df, bert_dir, max_len=32, bs=8), bert_dir)
    learn.save_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "model.safetensors").exists() and (tmp_path / "lm" / "tokenizer.json").exists()
    back = AutoModelForMaskedLM.from_pretrained(tmp_path / "lm").eval()
    learn.model.eval()
    ids = torch.tensor([list(learn.tokenizer.encode_batch(["the [MASK] was good"])[0])])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, learn.model(ids), rtol=0, atol=1e-5)


def test_fastai_display_and_interpretation_work_on_text(trained):
    from fastai.interpret import ClassificationInterpretation

    learn = trained["pooling"]
    learn.dls.show_batch(max_n=2)
    learn.show_results(max_n=2)  # fastai 2.8.12's own text show_results fails under plum
    interp = ClassificationInterpretation.from_learner(learn)
    losses, idx = interp.top_losses(3)
    assert len(idx) == 3 and (losses[:-1] >= losses[1:]).all()
    interp.plot_top_losses(2)
    interp.plot_confusion_matrix()
    assert interp.confusion_matrix().sum() == len(learn.dls.valid_ds)
    from ulmfit_tx.plots import ConfusionCounts

    counts = ConfusionCounts()
    learn.validate(cbs=counts)  # counted while validating: the same matrix as fastai's
    assert (counts.counts.numpy() == interp.confusion_matrix()).all()
