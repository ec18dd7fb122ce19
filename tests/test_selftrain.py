"Self-training: class-balanced confident pseudo-labels, rounds that train on them, Python and `train-clf`."

import json

import pytest
import torch
from fastai.torch_core import set_seed

from ulmfit_tx import UlmfitError, clas_dataloaders, classifier_learner, pseudo_labels
from ulmfit_tx.cli import main

from .test_training import keyword_task


@pytest.fixture()
def trained(bert_dir):
    "A tiny BERT classifier trained on 24 keyword-task texts (8 held out)."
    set_seed(0, reproducible=True)
    dls = clas_dataloaders(keyword_task(32), bert_dir, max_len=32, bs=8, cache=False)
    learn = classifier_learner(dls, bert_dir, precision="fp32")
    with learn.no_bar(), learn.no_logging():
        learn.unfreeze()
        learn.fit_one_cycle(8, 3e-3)
    return learn


def test_pseudo_labels_are_confident_balanced_and_mostly_right(trained):
    unlabelled = keyword_task(60, 1)
    pl = pseudo_labels(trained, unlabelled.text, threshold=0.6)
    counts = pl.label.value_counts()
    assert set(counts.index) == {"neg", "pos"} and counts["neg"] == counts["pos"] > 0  # balanced
    assert (pl.confidence >= 0.6).all()
    assert all(g.confidence.is_monotonic_decreasing for _, g in pl.groupby("label"))  # most confident first
    truth = unlabelled.set_index("text").label
    assert (pl.label.values == truth[pl.text].values).mean() >= 0.8  # the model learnt the toy task
    capped = pseudo_labels(trained, unlabelled.text, threshold=0.6, per_class=3)
    assert capped.label.value_counts().to_dict() == {"neg": 3, "pos": 3}
    assert (capped.confidence.values[:3] >= pl[pl.label == capped.label[0]].confidence.min()).all()
    with pytest.raises(UlmfitError, match="threshold must be between 0 and 1"):
        pseudo_labels(trained, unlabelled.text, threshold=1.5)
    with pytest.raises(UlmfitError, match="1 unlabelled texts are empty or not strings"):
        pseudo_labels(trained, ["a fine film", "  "])


def test_self_train_trains_on_labelled_and_pseudo_rows_and_restores_the_data(trained):
    labelled = trained.dls
    before = [p.detach().clone() for p in trained.model.parameters()]
    seen, fit = [], trained.fit_one_cycle

    def counting(*args, **kwargs):  # the training rows of each round's fit
        seen.append(len(trained.dls.train_ds))
        return fit(*args, **kwargs)

    trained.fit_one_cycle = counting
    with trained.no_bar(), trained.no_logging():
        history = trained.self_train(keyword_task(40, 2).text, rounds=2, threshold=0.55, epochs=1)
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["pseudo_labels"] > 0 and h["per_class"]["neg"] == h["per_class"]["pos"] for h in history)
    assert seen == [24 + h["pseudo_labels"] for h in history]  # labelled + pseudo-labelled rows
    assert 0 <= history[-1]["accuracy"] <= 1 and history[-1]["valid_loss"] > 0
    assert trained.dls is labelled and len(trained.dls.train_ds) == 24  # the labelled data is back
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.model.parameters()))
    with pytest.raises(UlmfitError, match="rounds and epochs must be at least 1"):
        trained.self_train(["a film"], rounds=0)


def test_train_clf_self_trains_on_an_unlabelled_file(bert_dir, tmp_path, capsys):
    keyword_task(32).to_csv(tmp_path / "d.csv", index=False)
    keyword_task(40, 3)[["text"]].to_csv(tmp_path / "u.csv", index=False)
    args = ["train-clf", "--model", str(bert_dir), "--data", str(tmp_path / "d.csv"), "--max-len", "32"]
    args += ["--bs", "8", "--epochs", "2", "--precision", "fp32", "--lr", "3e-3"]
    main(args + ["--out", str(tmp_path / "clf"), "--unlabelled", str(tmp_path / "u.csv")]
         + ["--self-train-rounds", "1", "--self-train-threshold", "0.5"])  # fmt: skip
    m = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert len(m["self_training"]) == 1 and m["self_training"][0]["pseudo_labels"] > 0
    assert m["accuracy"] == m["self_training"][-1]["accuracy"]  # the saved model is the self-trained one
    for bad, msg in [
        (["--self-train-rounds", "1"], "--self-train-rounds needs --unlabelled"),
        (["--unlabelled", str(tmp_path / "nope.csv")], "nope.csv: no such file or folder (--unlabelled)"),
        (["--unlabelled", str(tmp_path / "u.csv"), "--self-train-threshold", "1"], "between 0 and 1"),
    ]:
        capsys.readouterr()
        assert main(args + ["--out", str(tmp_path / "c2"), *bad]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "c2").exists()
