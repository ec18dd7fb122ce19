"The inference bundle: written by train-clf and learn.export_bundle, read by load_classifier without any pickle."

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from ulmfit_tx import UlmfitError, clas_dataloaders, classifier_learner, load_classifier
from ulmfit_tx.cli import main

from .conftest import SEGMENT
from .test_export import TEXTS, trained  # noqa: F401 (the module fixture: a trained roberta, pooling and native heads)
from .test_training import keyword_task

LOAD = (
    "import json; from ulmfit_tx import load_classifier; learn = load_classifier({path!r}); "
    "r = learn.predict_texts({texts!r}); p = learn.predict({texts!r}[0]); "
    "print(json.dumps({{'labels': [str(x) for x in r.label], 'probs': r.iloc[:, 1:].values.tolist(), "
    "'one': [str(p[0]), p[2].tolist()]}}))"
)


def _fresh_process_matches(learn, path):
    "load_classifier(path) in a new interpreter predicts what `learn` predicts, to 1e-6."
    before = learn.predict_texts(TEXTS)
    res = subprocess.run(
        [sys.executable, "-c", LOAD.format(path=str(path), texts=TEXTS)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["labels"] == [str(x) for x in before.label]
    torch.testing.assert_close(torch.tensor(got["probs"]), torch.tensor(before.iloc[:, 1:].values), rtol=0, atol=1e-6)
    assert got["one"][0] == str(learn.predict(TEXTS[0])[0])


@pytest.mark.parametrize("head", ["pooling", "native"])
def test_bundle_loads_in_a_fresh_process_with_identical_probabilities(trained, head, tmp_path):  # noqa: F811
    learn = trained[head]
    path = learn.export_bundle(tmp_path / "bundle")
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        *(["modeling_ulmfit_tx.py"] if head == "pooling" else []),  # the pooling head's code (`auto_map`)
        "tokenizer.json",
        "tokenizer_config.json",
        "ulmfit_tx.json",
    ]
    assert json.loads((path / "ulmfit_tx.json").read_text())["head"] == head
    card = (path / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: ulmfit_tx\npipeline_tag: text-classification") and "## How to use" in card
    )
    _fresh_process_matches(learn, path)
    with pytest.raises(UlmfitError, match="exists"):
        learn.export_bundle(path)


@pytest.mark.parametrize("head", ["pooling", "native"])
def test_bundle_is_a_hugging_face_folder_with_the_same_probabilities(trained, head, tmp_path):  # noqa: F811
    """After `import ulmfit_tx`, the Auto class and pipeline('text-classification') read a bundle and agree with
    predict."""
    from transformers import AutoModelForSequenceClassification, pipeline

    learn = trained[head]
    path = learn.export_bundle(tmp_path / "bundle")
    want = learn.predict_texts(TEXTS)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert type(model).__name__ == (
        "PoolingForSequenceClassification" if head == "pooling" else "RobertaForSequenceClassification"
    )
    pipe = pipeline("text-classification", model=str(path), device=-1)
    got = pipe(TEXTS, top_k=None)
    probs = torch.tensor([[{d["label"]: d["score"] for d in row}[str(c)] for c in learn.dls.vocab] for row in got])
    torch.testing.assert_close(probs, torch.tensor(want.iloc[:, 1:].values, dtype=probs.dtype), rtol=0, atol=1e-5)
    saved = learn.save_pretrained(tmp_path / "hf")  # the same Hugging Face folder, without ulmfit_tx.json
    assert AutoModelForSequenceClassification.from_pretrained(saved).config.id2label == model.config.id2label


PORTABLE = (
    "import json, sys\n"
    "try:\n    import ulmfit_tx  # noqa\nexcept ImportError:\n    pass\n"
    "else:\n    sys.exit('ulmfit_tx is importable here')\n"
    "from transformers import AutoModelForSequenceClassification, pipeline\n"
    "m = AutoModelForSequenceClassification.from_pretrained({path!r}, trust_remote_code=True)\n"
    "pipe = pipeline('text-classification', model={path!r}, trust_remote_code=True, top_k=None)\n"
    "print(json.dumps([type(m).__name__, pipe({texts!r})]))\n"
)


def test_the_pooling_bundle_loads_where_ulmfit_tx_is_not_installed(trained, tmp_path):  # noqa: F811
    """A venv that has torch and transformers but not ulmfit_tx (nor its source on the path) loads the bundle with
    `trust_remote_code=True`: its config names the pooling head's code, which the bundle carries."""
    learn = trained["pooling"]
    path = learn.export_bundle(tmp_path / "bundle")
    assert (path / "modeling_ulmfit_tx.py").is_file()
    assert json.loads((path / "config.json").read_text())["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_ulmfit_tx.PoolingForSequenceClassification"
    )
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = next(env.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    res = subprocess.run(
        [str(env / "bin" / "python"), "-c", PORTABLE.format(path=str(path), texts=TEXTS)],
        cwd=tmp_path,  # (not the repository: its ulmfit_tx/ must not be importable)
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    name, got = json.loads(res.stdout.strip().splitlines()[-1])
    assert name == "PoolingForSequenceClassification"
    want = learn.predict_texts(TEXTS)
    probs = torch.tensor([[{d["label"]: d["score"] for d in row}[str(c)] for c in learn.dls.vocab] for row in got])
    torch.testing.assert_close(probs, torch.tensor(want.iloc[:, 1:].values, dtype=probs.dtype), rtol=0, atol=1e-5)


def test_memory_encoder_bundle(own_models, tmp_path):
    torch.manual_seed(0)
    learn = classifier_learner(
        clas_dataloaders(keyword_task(), own_models["memxl"], max_len=3 * SEGMENT, bs=8), own_models["memxl"]
    )
    learn.fit_one_cycle(1, 3e-3)
    _fresh_process_matches(learn, learn.export_bundle(tmp_path / "bundle"))


class _Hostile:
    "Unpickling this creates a file: what a stranger's export.pkl could do."

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_predict_never_unpickles_a_strangers_export(trained, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "export.pkl").write_bytes(pickle.dumps(_Hostile(str(marker))))
    assert main(["predict", "--model", str(folder), "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert "export.pkl" in err and "--trust-pickle" in err and not marker.exists()
    # beside a real bundle the pickle is ignored, even with --trust-pickle
    shutil.rmtree(folder)
    trained["pooling"].export_bundle(folder)
    (folder / "export.pkl").write_bytes(pickle.dumps(_Hostile(str(marker))))
    assert main(["predict", "--model", str(folder), "--text", "a wonderful film", "--trust-pickle"]) == 0
    assert not marker.exists()


def test_broken_bundles_are_refused_with_what_is_wrong(trained, tiny_models, tmp_path):  # noqa: F811
    good = trained["pooling"].export_bundle(tmp_path / "good")

    def broken(name, edit):
        path = tmp_path / name
        shutil.copytree(good, path)
        edit(path)
        return path

    with pytest.raises(UlmfitError, match="no such model folder"):
        load_classifier(tmp_path / "nope")
    with pytest.raises(UlmfitError, match="has no model.safetensors"):
        load_classifier(broken("no_weights", lambda p: (p / "model.safetensors").unlink()))
    with pytest.raises(UlmfitError, match="bundle format 99"):
        load_classifier(
            broken(
                "future",
                lambda p: (p / "ulmfit_tx.json").write_text(
                    json.dumps({**json.loads((good / "ulmfit_tx.json").read_text()), "format": 99})
                ),
            )
        )
    with pytest.raises(UlmfitError, match="incomplete .no tokenizer_fingerprint"):
        load_classifier(
            broken(
                "old",
                lambda p: (p / "ulmfit_tx.json").write_text(
                    json.dumps(
                        {
                            k: v
                            for k, v in json.loads((good / "ulmfit_tx.json").read_text()).items()
                            if k != "tokenizer_fingerprint"
                        }
                    )
                ),
            )
        )
    other = trained["native"].export_bundle(tmp_path / "other")  # the same encoder without the pooling head
    with pytest.raises(UlmfitError, match="model.safetensors does not fit"):
        load_classifier(
            broken("other_weights", lambda p: shutil.copy(other / "model.safetensors", p / "model.safetensors"))
        )

    def other_tokenizer(p):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_models["bert"] / f, p / f)

    with pytest.raises(UlmfitError, match="tokenizer files are another model's"):
        load_classifier(broken("other_tok", other_tokenizer))


def test_train_clf_writes_a_bundle_that_predict_reads(tiny_models, tmp_path, capsys):
    data = tmp_path / "d.csv"
    keyword_task().to_csv(data, index=False)
    out = tmp_path / "clf"
    assert (
        main(
            [
                "train-clf",
                "--model",
                str(tiny_models["bert"]),
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--schedule",
                "one-cycle",
                "--bs",
                "8",
            ]
        )
        == 0
    )
    assert (out / "ulmfit_tx.json").exists() and (out / "export.pkl").exists()
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--text", "a wonderful film"]) == 0
    assert "prob_" in capsys.readouterr().out
    (out / "ulmfit_tx.json").unlink()  # only the pickle left: refused, then trusted
    assert main(["predict", "--model", str(out), "--text", "a wonderful film"]) == 2
    assert main(["predict", "--model", str(out), "--text", "a wonderful film", "--trust-pickle"]) == 0


def test_predict_texts_matches_fastai_get_preds(trained, tmp_path):  # noqa: F811
    "predict_texts' lean path (no fastai events) gives get_preds' probabilities, in input order."
    learn = load_classifier(trained["pooling"].export_bundle(tmp_path / "bundle"), bs=2)
    texts = TEXTS + ["the film " * 20, "terrible"]  # lengths differ: batches are length-sorted
    got = learn.predict_texts(texts, bs=2)
    want = learn.get_preds(dl=learn.dls.test_dl(texts, bs=2))[0]
    torch.testing.assert_close(torch.tensor(got.iloc[:, 1:].values), want, rtol=0, atol=1e-6)
    assert got.label.tolist() == [learn.dls.vocab[i] for i in want.argmax(1)]
