"Chunk-and-pool: whole documents as chunks of max_len tokens, encoded one by one and pooled, in every path."

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.torch_core import set_seed

from ulmfit_tx import (
    HFTokenizer,
    UlmfitError,
    clas_dataloaders,
    classifier_learner,
    classifier_model,
    load_classifier,
)
from ulmfit_tx.batching import pad_batch
from ulmfit_tx.cli import main
from ulmfit_tx.pooling import masked_concat_pool

LONG = " ".join(["the film was long but the actors were good and the story moved me"] * 12)


def test_a_long_text_becomes_chunks_each_with_its_special_tokens(bert_dir):
    one, three = HFTokenizer(bert_dir, 16), HFTokenizer(bert_dir, 16, chunks=3)
    cls, sep = one.prefix[0], one.suffix[0]
    ids = three.encode_batch([LONG])[0]
    assert len(ids) == 48 and list(ids[::16]) == [cls] * 3 and list(ids[15::16]) == [sep] * 3  # 3 full chunks
    assert list(ids[1:15]) == list(one.encode_batch([LONG])[0][1:15])  # the first chunk is the one-chunk text
    short = "a good film"
    assert list(three.encode_batch([short])[0]) == list(one.encode_batch([short])[0])
    mid = three.encode_batch([" ".join(LONG.split()[:20])])[0]  # between one and two chunks: the last is shorter
    assert 16 < len(mid) < 32 and mid[16] == cls and mid[-1] == sep
    with pytest.raises(UlmfitError, match="chunks must be a positive integer"):
        HFTokenizer(bert_dir, 16, chunks=0)


def test_chunk_and_pool_pools_every_chunk_and_ignores_padding_chunks(bert_dir):
    torch.manual_seed(0)
    tfm = HFTokenizer(bert_dir, 16, chunks=3)
    model = classifier_model(bert_dir, tfm.tok, 2, chunk_len=16).eval()
    long, short = tfm.encode_batch([LONG, "a good film"])
    with torch.no_grad():
        both = model(pad_batch([long, short], tfm.pad_id))  # (2, 48): the short text has two chunks of padding
        alone = model(pad_batch([short], tfm.pad_id))
        chunks = torch.as_tensor(long).long().view(3, 16)  # by hand: each chunk through the encoder, pooled together
        h = model.hf(input_ids=chunks, attention_mask=torch.ones_like(chunks)).last_hidden_state.reshape(1, 48, -1)
        want = model.head.layers(masked_concat_pool(h, torch.ones(1, 48, dtype=torch.bool)))
    assert torch.allclose(both[0], want[0], atol=1e-5)
    assert torch.allclose(both[1], alone[0], atol=1e-5) and torch.isfinite(both).all()
    with pytest.raises(UlmfitError, match="chunk-and-pool needs the pooling head"):
        classifier_model(bert_dir, tfm.tok, 2, head="native", chunk_len=16)


@pytest.fixture(scope="module")
def chunked(bert_dir, sample_df):
    "A tiny BERT chunk-and-pool classifier (3 chunks of 24 tokens) trained briefly on 48 reviews."
    set_seed(0, reproducible=True)
    df = pd.concat([sample_df[~sample_df.is_valid].head(40), sample_df[sample_df.is_valid].head(8)])
    dls = clas_dataloaders(df, bert_dir, max_len=24, chunks=3, bs=8, cache=False)
    learn = classifier_learner(dls, bert_dir, precision="fp32")
    assert learn.model.chunk_len == 24
    x, y = dls.one_batch()
    assert x.shape[1] > 24 and x.shape[0] == 8  # whole reviews: more than one chunk
    with learn.no_bar(), learn.no_logging():
        learn.unfreeze()
        learn.fit_one_cycle(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()
    return learn


def test_chunked_classifier_round_trips_through_the_bundle_and_onnx(chunked, tmp_path):
    texts = [LONG, "Great.", " ".join(LONG.split()[:30])]
    want = chunked.predict_texts(texts)
    assert chunked.predict(LONG)[0] == want.label[0]
    chunked.export_bundle(tmp_path / "b")
    back = load_classifier(tmp_path / "b")
    assert back.model.chunk_len == 24 and back.tokenizer.chunks == 3
    np.testing.assert_allclose(back.predict_texts(texts).prob_neg, want.prob_neg, atol=1e-5)
    r = chunked.export_onnx(tmp_path / "b" / "model.onnx", texts=texts)
    assert r["max_abs_diff"] < 1e-4
    onnx = load_classifier(tmp_path / "b", backend="onnx")
    np.testing.assert_allclose(onnx.predict_texts(texts).prob_neg, want.prob_neg, atol=1e-4)
    short = onnx.predict_texts(texts[1:2]).prob_neg  # a batch of one chunk: the graph is not fixed to several
    np.testing.assert_allclose(short, want.prob_neg[1:2], atol=1e-4)


def test_model_and_data_of_other_chunking_are_refused(chunked, bert_dir, sample_df):
    dls = clas_dataloaders(sample_df.head(20), bert_dir, max_len=24, bs=8, cache=False)
    with pytest.raises(UlmfitError, match="the model reads chunks of 24 tokens but the data are chunks of None"):
        classifier_learner(dls, chunked.model)


def test_cli_trains_chunked_and_predicts_whole_documents(bert_dir, sample_df, tmp_path, capsys):
    pd.concat([sample_df[~sample_df.is_valid].head(24), sample_df[sample_df.is_valid].head(8)]).to_csv(
        tmp_path / "d.csv", index=False
    )
    out = tmp_path / "clf"
    args = ["train-clf", "--model", str(bert_dir), "--data", str(tmp_path / "d.csv"), "--out", str(out)]
    assert main(args + ["--max-len", "24", "--chunks", "3", "--bs", "8", "--precision", "fp32"]) == 0
    assert json.loads((out / "metrics.json").read_text())["chunks"] == 3
    assert json.loads((out / "ulmfit_tx.json").read_text())["chunks"] == 3
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--text", LONG]) == 0
    want = load_classifier(out).predict_texts([LONG])
    printed = capsys.readouterr().out.splitlines()[-1].split()  # text..., label, prob_neg, prob_pos
    assert printed[-3] == want.label[0] and abs(float(printed[-2]) - want.prob_neg[0]) < 1e-4
    assert main(args + ["--force", "--chunks", "0"]) == 2 and "chunks" in capsys.readouterr().err
