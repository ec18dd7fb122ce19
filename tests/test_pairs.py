"""Sentence pairs: two text columns encoded as the tokenizer's pair ([CLS] a [SEP] b [SEP], token types from the ids),
through the store, the learner, `predict`, the bundle, ONNX, `pipeline()` and the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.torch_core import set_seed

from ulmfit_tx import (
    HFTokenizer,
    TextPair,
    UlmfitError,
    build_store,
    clas_dataloaders,
    classifier_learner,
    load_classifier,
)
from ulmfit_tx.cli import main
from ulmfit_tx.pooling import pair_types
from ulmfit_tx.tokenize import find_tokenizer

FILLER = "the a movie film plot actor scene story it was and of to in this that".split()


def pair_task(n=96, seed=0) -> pd.DataFrame:
    """Pairs (`claim`, `answer`) of filler words with one keyword each: the label is the answer's keyword; the claim's
    keyword is drawn on its own, so a model must tell the second text from the first."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        texts = []
        for kw in (rng.choice(["wonderful", "terrible"]), "wonderful" if label == "pos" else "terrible"):
            words = list(rng.choice(FILLER, 6))
            words.insert(int(rng.integers(0, 6)), kw)
            texts.append(" ".join(words))
        rows.append((*texts, label, i >= n * 3 // 4))
    return pd.DataFrame(rows, columns=["claim", "answer", "label", "is_valid"])


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_pairs_are_encoded_as_the_tokenizer_encodes_them_cut_longest_first(tiny_models, arch):
    tfm = HFTokenizer(tiny_models[arch], max_len=24, pair=True)
    pairs = [("a good film", "it was fun"), ("the plot " * 20, "short one"), ("word " * 30, "other " * 30)]
    for (a, b), got in zip(pairs, tfm.encode_batch(pairs)):
        want = tfm.tok(a, b, truncation=True, max_length=24)
        assert got.tolist() == want["input_ids"]
        if "token_type_ids" in want and arch == "bert":  # the types the model reads from the ids alone
            ids = torch.as_tensor(got)[None]
            assert pair_types(ids, tfm.between[0], ids != tfm.pad_id)[0].tolist() == want["token_type_ids"]
    assert tfm.decode_ids(tfm.encode_batch(pairs[:1])[0]) == "a good film | it was fun"
    with pytest.raises(UlmfitError, match="reads pairs of texts"):
        tfm.encode_batch(["one text"])
    with pytest.raises(UlmfitError, match="not a pair of texts"):
        HFTokenizer(tiny_models[arch], pair=True, chunks=2)


def test_a_store_of_pairs_keeps_both_texts_and_where_the_second_starts(bert_dir, tmp_path):
    df = pair_task(20)
    store = build_store(df, bert_dir, tmp_path / "s", text_col=["claim", "answer"], label_col="label", progress=False)
    tfm = HFTokenizer(bert_dir, max_len=64, pair=True)
    assert store.pair and store.meta["source"]["text_col"] == ["claim", "answer"] and len(store) == 20
    for i in (0, 7):
        assert tfm.wrap(store.doc(i), first=store.first(i)).tolist() == tfm.encode_batch([df.iloc[i, :2]])[0].tolist()
    with pytest.raises(UlmfitError, match="holds pairs of texts: give the two text columns"):
        clas_dataloaders(tmp_path / "s", bert_dir)
    with pytest.raises(UlmfitError, match="missing column 'reply'"):
        build_store(df, bert_dir, tmp_path / "x", text_col=["claim", "reply"], progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("head", ["pooling", "native"])
def test_a_pair_classifier_learns_from_the_second_text_and_round_trips(bert_dir, tmp_path, head):
    from transformers import pipeline

    df = pair_task()
    dls = clas_dataloaders(df, bert_dir, text_col=["claim", "answer"], max_len=40, bs=8)
    sep = find_tokenizer(dls).between[0]
    assert ((dls.one_batch()[0] == sep).sum(1) == 2).all()  # [CLS] a [SEP] b [SEP] in every row
    set_seed(0)
    learn = classifier_learner(dls, bert_dir, head=head, precision="fp32")
    assert learn.model.type_sep == sep  # BERT has token types: they are given
    learn.unfreeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(6, 3e-3)
    losses, acc = [v[1] for v in learn.recorder.values], learn.recorder.values[-1][2]
    assert losses[-1] < losses[0] and acc > 0.75, (losses, acc)
    label, _, probs = learn.predict(TextPair("a wonderful film", "it was terrible"))
    assert label in ("neg", "pos") and probs.shape == (2,)
    pairs = df[["claim", "answer"]][:6]
    want = learn.predict_texts(pairs)
    assert want.equals(learn.predict_texts(list(pairs.itertuples(index=False))))
    bundle = learn.export_bundle(tmp_path / "b")
    assert json.loads((bundle / "ulmfit_tx.json").read_text())["pair"] is True
    assert "pairs of texts" in (bundle / "README.md").read_text()
    pd.testing.assert_frame_equal(load_classifier(bundle).predict_texts(pairs), want, atol=1e-5)
    assert learn.export_onnx(bundle / "model.onnx")["max_abs_diff"] < 1e-4
    pd.testing.assert_frame_equal(load_classifier(bundle, backend="onnx").predict_texts(pairs), want, atol=1e-4)
    if head == "pooling":  # served over HTTP: one pair, or several
        TestClient = pytest.importorskip("fastapi.testclient").TestClient

        from ulmfit_tx.serve import create_app

        with TestClient(create_app(bundle)) as client:
            one = client.post("/predict", json={"text": pairs.claim[0], "text_pair": pairs.answer[0]}).json()
            many = client.post("/predict", json={"pairs": pairs.values.tolist()}).json()
            assert client.post("/predict", json={"texts": ["one text"]}).status_code == 422
        assert one["predictions"][0]["label"] == want.label[0]
        assert [p["label"] for p in many["predictions"]] == want.label.tolist()
    pipe = pipeline("text-classification", model=str(bundle), top_k=None)  # the tokenizer's pair and token types
    got = pipe([{"text": a, "text_pair": b} for a, b in pairs.itertuples(index=False)])
    for row, scores in zip(want.itertuples(), got):
        assert {d["label"]: d["score"] for d in scores} == pytest.approx(
            {"neg": row.prob_neg, "pos": row.prob_pos}, abs=1e-5
        )


def test_train_clf_and_predict_read_two_text_columns(bert_dir, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    pair_task(48).to_csv(csv, index=False)
    args = ["--model", str(bert_dir), "--max-len", "40", "--bs", "8", "--schedule", "one-cycle", "--epochs", "1"]
    pair = ["--text-col", "claim,answer"]
    assert main(["train-clf", *args, "--data", str(csv), "--out", str(tmp_path / "m"), *pair]) == 0
    assert json.loads((tmp_path / "m" / "ulmfit_tx.json").read_text())["pair"] is True
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(tmp_path / "m"), "--data", str(csv), *pair, "--out", str(out)]) == 0
    pred = pd.read_csv(out)
    assert list(pred.columns) == ["claim", "answer", "label", "prob_neg", "prob_pos"] and len(pred) == 48
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "m"), "--text", "a film", "--text-pair", "wonderful"]) == 0
    assert "wonderful" in capsys.readouterr().out
    for argv, error in [
        (["train-clf", *args, "--data", str(csv), "--out", str(tmp_path / "x"), "--text-col", "claim,reply"],
         "missing column 'reply'"),
        (["predict", "--model", str(tmp_path / "m"), "--data", str(csv)], "reads pairs of texts: give --text-col"),
        (["predict", "--model", str(tmp_path / "m"), "--text", "a film"], "give a --text-pair for each --text"),
        (["train-clf", *args, "--data", str(csv), "--out", str(tmp_path / "x"), *pair, "--unlabelled", str(csv)],
         "pseudo-labels single texts"),
    ]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert error in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.checkpoint").exists()


def test_a_datablock_reads_pairs_from_two_columns(bert_dir):
    from fastai.data.block import CategoryBlock, ColReader, ColSplitter, DataBlock

    from ulmfit_tx import HFTextBlock

    dblock = DataBlock(
        blocks=(HFTextBlock(bert_dir, text_col=["claim", "answer"], max_len=40), CategoryBlock),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
    )
    df = pair_task(24)
    dls = dblock.dataloaders(df, bs=4, num_workers=0)
    x, y = dls.one_batch()
    assert ((x == find_tokenizer(dls).between[0]).sum(1) == 2).all()
    shown = dls.decode_batch((x, y))[0][0]  # what show_batch shows: the two texts apart
    assert shown.count(" | ") == 1 and shown.split(" | ")[1] in set(df.answer)
    dls.show_batch(max_n=2)
