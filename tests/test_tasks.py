"""The tasks users bring besides one class a text: multi-label (a list column or 0/1 columns) and regression, through
the store, the learner, the bundle, ONNX and `pipeline()`; class weights, keep-best and the validation report."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.torch_core import set_seed
from sklearn.utils.class_weight import compute_class_weight

from ulmfit_tx import (
    KeepBest,
    Task,
    UlmfitError,
    build_store,
    clas_dataloaders,
    classifier_learner,
    load_classifier,
    task_of,
)
from ulmfit_tx.cli import main
from ulmfit_tx.tasks import MULTI, REGRESSION, class_weights

from .test_training import keyword_task

TAGS = [("wonderful", "good"), ("music", "music"), ("funny", "comedy")]


def tagged_task(n=96, seed=0) -> pd.DataFrame:
    """Texts of filler words with up to three keywords, each one a tag: `tags` lists them (';'), `good`/`music`/
    `comedy` are 0/1 columns, `score` counts them (a regression target)."""
    rng = np.random.default_rng(seed)
    filler = "the a movie film plot actor scene story it was and of to in this that".split()
    rows = []
    for i in range(n):
        words, tags = list(rng.choice(filler, 12)), []
        for kw, tag in TAGS:
            if rng.random() < 0.5:
                words.insert(int(rng.integers(0, len(words))), kw)
                tags.append(tag)
        hot = {tag: int(tag in tags) for _, tag in TAGS}
        rows.append({"text": " ".join(words), "tags": ";".join(tags), **hot, "score": 1.5 * len(tags) + 0.2,
                     "is_valid": i >= n * 3 // 4})  # fmt: skip
    return pd.DataFrame(rows)


def test_the_store_keeps_multi_hot_labels_from_a_list_column_or_01_columns_and_float_targets(bert_dir, tmp_path):
    df = tagged_task(12)
    listed = build_store(df, bert_dir, tmp_path / "a", label_col="tags", label_delim=";", progress=False)
    cols = build_store(df, bert_dir, tmp_path / "b", label_col=["good", "music", "comedy"], progress=False)
    assert listed.task == cols.task == MULTI
    assert listed.classes == ["comedy", "good", "music"] and cols.classes == [
        "good",
        "music",
        "comedy",
    ]  # sorted/given
    want = df[["comedy", "good", "music"]].to_numpy()
    assert listed.labels.shape == (12, 3) and (np.asarray(listed.labels) == want).all()
    assert (np.asarray(cols.labels) == df[["good", "music", "comedy"]].to_numpy()).all()
    assert (want.sum(1) == 0).any(), "a text without any tag is kept, with no label set"
    reg = build_store(df, bert_dir, tmp_path / "c", label_col="score", task="regression", progress=False)
    assert reg.task == REGRESSION and reg.classes is None
    assert np.allclose(reg.labels, df.score.to_numpy(np.float32))
    dls = clas_dataloaders(reg, bert_dir, max_len=32, bs=4)
    assert task_of(dls) == Task(REGRESSION, ["score"]) and dls.one_batch()[1].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(label_col="tags", label_delim=";", classes=["good", "music"]), "unknown class 'comedy'"),
        (dict(label_col="score", task="regression"), "1 row(s) of column 'score' are not numbers (rows 3: 'n/a')"),
        (dict(label_col=["good", "music"]), "must hold True/False or 1/0"),
        (dict(label_col=["good", "music"], task="single_label"), "describe a multi_label task"),
        (dict(label_col="tags", task="multi_label"), "needs the label delimiter"),
    ],
)
def test_bad_labels_are_refused_with_the_rows_named(bert_dir, tmp_path, kwargs, error):
    df = tagged_task(12).astype({"score": object, "music": object})
    df.loc[3, "score"], df.loc[5, "music"] = "n/a", "maybe"
    with pytest.raises(UlmfitError, match=re.escape(error)):
        build_store(df, bert_dir, tmp_path / "s", progress=False, **kwargs)
    assert not (tmp_path / "s").exists()


def _fit(dls, bert_dir, epochs=4, **kwargs):
    set_seed(0)
    learn = classifier_learner(dls, bert_dir, precision="fp32", **kwargs)
    learn.unfreeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 3e-3)
    return learn


def _round_trip(learn, folder, texts):
    "Bundle, its ONNX graph and `pipeline()` give the learner's outputs; returns the learner's prediction table."
    from transformers import pipeline

    want = learn.predict_texts(texts)
    bundle = learn.export_bundle(folder)
    pd.testing.assert_frame_equal(load_classifier(bundle).predict_texts(texts), want, atol=1e-5)
    res = learn.export_onnx(bundle / "model.onnx", texts=texts)
    assert res["agreement"] == 1.0 and res["max_abs_diff"] < 1e-4
    pd.testing.assert_frame_equal(load_classifier(bundle, backend="onnx").predict_texts(texts), want, atol=1e-4)
    got = pipeline("text-classification", model=str(bundle), top_k=None)(texts[:2])
    return want, got


def test_a_multi_label_classifier_trains_decides_at_its_threshold_and_round_trips(bert_dir, tmp_path):
    df = tagged_task()
    dls = clas_dataloaders(df, bert_dir, label_col="tags", label_delim=";", max_len=32, bs=8)
    assert dls.one_batch()[1].shape == (8, 3)  # multi-hot targets
    learn = _fit(dls, bert_dir, class_weights="balanced")
    assert learn.loss_func.func.pos_weight.shape == (3,)
    assert [m.name for m in learn.metrics] == ["accuracy_multi", "f1_micro", "f1_macro"]
    losses = [v[0] for v in learn.recorder.values]
    assert losses[-1] < losses[0], "the validation loss decreases"
    report = learn.validation_report(tune_threshold=True)
    assert 0 < learn.threshold < 1 and report["threshold"] == learn.threshold
    assert set(report["per_class"]) == {"comedy", "good", "music"} and set(report["confusion"]["good"]) == {
        "tn", "fp", "fn", "tp"
    }  # fmt: skip
    learn.threshold = 0.3
    labels, decided, probs = learn.predict(df.text[0])  # fastai's predict decides at the threshold too
    assert list(decided.numpy()) == list((probs >= 0.3).numpy())
    texts = df.text[:6].tolist()
    want, got = _round_trip(learn, tmp_path / "b", texts)
    assert list(want.columns) == ["labels", "prob_comedy", "prob_good", "prob_music"]
    assert want.labels[0] == ";".join(c for c in ["comedy", "good", "music"] if want[f"prob_{c}"][0] >= 0.3)
    assert load_classifier(tmp_path / "b").threshold == 0.3
    pipe = {d["label"]: d["score"] for d in got[0]}  # pipeline applies a sigmoid (config problem_type)
    assert pipe == pytest.approx({c: want[f"prob_{c}"][0] for c in ["comedy", "good", "music"]}, abs=1e-5)


def test_a_regression_model_trains_and_round_trips(bert_dir, tmp_path):
    df = tagged_task()
    dls = clas_dataloaders(df, bert_dir, label_col="score", task="regression", max_len=32, bs=8)
    learn = _fit(dls, bert_dir)
    assert [m.name for m in learn.metrics] == ["rmse", "mae", "pearson", "spearman"]
    losses = [v[0] for v in learn.recorder.values]
    assert losses[-1] < losses[0]
    report = learn.validation_report()
    assert report["rmse"] == pytest.approx(learn.recorder.values[-1][1], rel=1e-4)
    want, got = _round_trip(learn, tmp_path / "b", df.text[:6].tolist())
    assert list(want.columns) == ["prediction"]
    assert got[0][0]["label"] == "score" and got[0][0]["score"] == pytest.approx(want.prediction[0], abs=1e-5)
    with pytest.raises(UlmfitError, match="class weights are for classification"):
        classifier_learner(dls, bert_dir, class_weights="balanced")


def test_class_weights_balanced_as_scikit_learn_or_from_a_file(tmp_path):
    task, y = Task(classes=["a", "b", "c"]), np.array([0, 0, 0, 0, 1, 1, 2])
    assert np.allclose(class_weights("balanced", task, y), compute_class_weight("balanced", classes=np.arange(3), y=y))
    (tmp_path / "w.json").write_text(json.dumps({"a": 1, "b": 2, "c": 0.5}))
    (tmp_path / "w.csv").write_text("class,weight\na,1\nb,2\nc,0.5\n")
    for f in ("w.json", "w.csv"):
        assert class_weights(str(tmp_path / f), task, y).tolist() == [1, 2, 0.5]
    with pytest.raises(UlmfitError, match="unknown d"):
        class_weights({"a": 1, "b": 1, "c": 1, "d": 1}, task, y)
    with pytest.raises(UlmfitError, match="no training row has class c"):
        class_weights("balanced", task, np.array([0, 1, 1]))
    multi = class_weights("balanced", Task(MULTI, ["a", "b"]), np.array([[1, 0], [1, 1], [0, 0], [1, 0]]))
    assert multi.tolist() == pytest.approx([1 / 3, 3.0])  # negatives over positives


def test_keep_best_ends_on_the_best_epoch_weights(bert_dir):
    dls = clas_dataloaders(keyword_task(), bert_dir, max_len=32, bs=8)
    keep = KeepBest("valid_loss", comp=np.greater)  # "best": the highest loss, the first epoch's, not the last
    set_seed(0)
    learn = classifier_learner(dls, bert_dir, precision="fp32")
    learn.unfreeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(4, 3e-3, cbs=keep)
    losses = [v[1] for v in learn.recorder.values]
    assert keep.best_epoch == int(np.argmax(losses)) < len(losses) - 1 and keep.values[0] == max(losses)
    assert learn.validate()[0] == pytest.approx(max(losses), rel=1e-5), "the model holds the kept epoch's weights"


def _cli(bert_dir, data, out, *extra) -> int:
    args = ["--model", str(bert_dir), "--data", str(data), "--out", str(out), "--max-len", "32", "--bs", "8"]
    return main(["train-clf", *args, "--schedule", "one-cycle", "--epochs", "2", "--lr", "3e-3", *extra])


def test_train_clf_and_predict_for_multi_label_and_regression(bert_dir, tmp_path, capsys):
    csv = tmp_path / "tags.csv"
    tagged_task(48).to_csv(csv, index=False)
    multi = ["--label-col", "tags", "--label-delim", ";", "--keep", "best", "--metric", "f1_micro"]
    assert _cli(bert_dir, csv, tmp_path / "m", *multi, "--class-weights", "balanced") == 0
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["task"] == "multi_label" and m["labels"] == ["comedy", "good", "music"] and m["keep"] == "best"
    assert 0 < m["threshold"] < 1 and m["report"]["threshold"] == m["threshold"] and "f1_macro" in m["report"]
    assert json.loads((tmp_path / "m" / "ulmfit_tx.json").read_text())["threshold"] == m["threshold"]
    card = (tmp_path / "m" / "README.md").read_text()  # the model card: task, labels, data, metrics, settings
    assert "- multi-label" in card and "any of `comedy`, `good`, `music`" in card and f"{csv}: " in card
    assert f"| f1_micro | {m['f1_micro']:.4f} |" in card and "- keep: best" in card
    assert main(["predict", "--model", str(tmp_path / "m"), "--data", str(csv), "--out", str(tmp_path / "p.csv")]) == 0
    pred = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(pred.columns) == ["text", "labels", "prob_comedy", "prob_good", "prob_music"] and len(pred) == 48

    assert main(["tokenize", "--model", str(bert_dir), "--data", str(csv), "--out", str(tmp_path / "s"),
                 "--label-col", "good,music,comedy"]) == 0  # fmt: skip
    assert _cli(bert_dir, tmp_path / "s", tmp_path / "c") == 0  # 0/1 columns, from the store
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["labels"] == ["good", "music", "comedy"]

    reg = ["--label-col", "score", "--task", "regression", "--keep", "best", "--metric", "rmse"]
    assert _cli(bert_dir, csv, tmp_path / "r", *reg) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["task"] == "regression" and m["rmse"] == pytest.approx(m["report"]["rmse"], rel=1e-4)
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "r"), "--text", "a funny film"]) == 0
    assert "prediction" in capsys.readouterr().out


def test_tokenize_stores_the_label_column_by_default(bert_dir, tmp_path, capsys):
    csv = tmp_path / "tags.csv"
    tagged_task(24).rename(columns={"music": "label"}).to_csv(csv, index=False)
    tok = ["tokenize", "--model", str(bert_dir), "--data", str(csv)]
    assert main([*tok, "--out", str(tmp_path / "a")]) == 0
    assert "single_label labels, classes [0, 1]" in capsys.readouterr().out
    assert main([*tok, "--out", str(tmp_path / "b"), "--no-labels"]) == 0
    assert _cli(bert_dir, tmp_path / "b", tmp_path / "c") == 2
    assert "ulmfit-tx tokenize --label-col" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "extra, error",
    [
        (["--label-col", "tags", "--label-delim", ";", "--classes", "good,music"], "unknown class 'comedy'"),
        (["--label-col", "rating", "--task", "regression"], "1 row(s) of column 'rating' are not numbers (rows 3"),
        (["--label-col", "text"], "the label column cannot be a text column"),
        (["--label-col", "tags", "--label-delim", ";", "--threshold", "1.5"], "--threshold must be between 0 and 1"),
        (["--label-col", "tags", "--label-delim", ";", "--metric", "rmse"], "--metric 'rmse' is not one of"),
        (["--label-col", "score", "--task", "regression", "--class-weights", "balanced"], "class weights are for"),
        (["--label-col", "score", "--task", "regression", "--threshold", "0.4"], "--threshold is the decision"),
    ],
)
def test_bad_task_options_end_in_one_line_exit_2_and_write_nothing(bert_dir, tmp_path, capsys, extra, error):
    csv, df = tmp_path / "tags.csv", tagged_task(24)
    df["rating"] = df.score.astype(str).where(df.index != 3, "n/a")
    df.to_csv(csv, index=False)
    assert _cli(bert_dir, csv, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert error in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()


def test_json_lines_are_read_in_chunks_with_lists_as_multi_label_classes(bert_dir, tmp_path):
    df = tagged_task(30)
    rows = df.assign(tags=df.tags.map(lambda s: s.split(";") if s else []))[["text", "tags", "score", "is_valid"]]
    rows.to_json(tmp_path / "t.jsonl.gz", orient="records", lines=True)
    store = build_store(tmp_path / "t.jsonl.gz", bert_dir, tmp_path / "s", label_col="tags", task="multi_label",
                        valid_col="is_valid", chunk_rows=7, progress=False)  # fmt: skip
    assert store.classes == ["comedy", "good", "music"] and len(store) == 30
    assert (np.asarray(store.labels) == df[["comedy", "good", "music"]].to_numpy()).all()
    assert (np.asarray(store.is_valid) == df.is_valid.to_numpy()).all()
    reg = build_store(tmp_path / "t.jsonl.gz", bert_dir, tmp_path / "r", label_col="score", task="regression",
                      progress=False)  # fmt: skip
    assert np.allclose(reg.labels, df.score)
    with pytest.raises(UlmfitError, match="missing column 'body'"):
        build_store(tmp_path / "t.jsonl.gz", bert_dir, tmp_path / "x", text_col="body", progress=False)


def test_hugging_face_datasets_are_read_in_batches_with_class_label_names(bert_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    df = tagged_task(40).assign(label=lambda d: d.good)
    ds = datasets.Dataset.from_pandas(df[["text", "label", "tags", "score", "is_valid"]], preserve_index=False)
    ds = ds.cast_column("label", datasets.ClassLabel(names=["bad", "good"]))  # ids 0/1 named
    store = build_store(ds, bert_dir, tmp_path / "s", label_col="label", valid_col="is_valid", chunk_rows=16,
                        progress=False)  # fmt: skip
    assert store.classes == ["bad", "good"] and (np.asarray(store.labels) == df.good).all()
    assert (np.asarray(store.is_valid) == df.is_valid).all()
    dls = clas_dataloaders(ds.to_iterable_dataset(), bert_dir, label_col="label", max_len=32, bs=8)  # streamed
    assert list(dls.vocab) == ["bad", "good"] and len(dls.train_ds) == 30 and len(dls.valid_ds) == 10

    lists = datasets.Dataset.from_dict(
        {"text": df.text.tolist(), "tags": [[int(t == "good"), *([2] if "comedy" in s else [])]
                                           for t, s in zip(df.tags.str.split(";").str[0], df.tags)]}
    ).cast_column("tags", datasets.List(datasets.ClassLabel(names=["music", "good", "comedy"])))  # fmt: skip
    splits = datasets.DatasetDict({"train": lists.select(range(30)), "test": lists.select(range(30, 40))})
    dls = clas_dataloaders(splits, bert_dir, label_col="tags", task="multi_label", max_len=32, bs=8)
    assert dls.one_batch()[1].shape[1] == 3 and len(dls.valid_ds) == 10  # the test split validates
    reg = clas_dataloaders(ds, bert_dir, label_col="score", task="regression", max_len=32, bs=8)
    assert task_of(reg).kind == REGRESSION
    with pytest.raises(UlmfitError, match="missing column 'body'"):
        clas_dataloaders(ds, bert_dir, text_col="body")
    with pytest.raises(UlmfitError, match="none is 'train'"):
        clas_dataloaders(datasets.DatasetDict({"dev": ds}), bert_dir)
    unlabelled = ds.map(lambda r: {"label": -1}).cast_column("label", datasets.ClassLabel(names=["bad", "good"]))
    with pytest.raises(UlmfitError, match="40 row.* no label"):  # -1: IMDb's unsupervised rows
        build_store(unlabelled, bert_dir, tmp_path / "u", label_col="label", progress=False)
