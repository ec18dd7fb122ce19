import pickle

import numpy as np
import pytest
import torch
from fastai.text.data import TensorText
from transformers import AutoTokenizer

from ulmfit_tx import HFTokenizer, UlmfitError, load_tokenizer
from ulmfit_tx.tokenize import IDS_COL, word_start_table


@pytest.mark.parametrize("arch", ["bert", "roberta", "albert"])
def test_special_tokens_wrap_each_text(tiny_models, arch):
    tfm = HFTokenizer(tiny_models[arch], max_len=16)
    ids = tfm.encode_batch(["a short review", "another one that is long " * 20])
    tok = tfm.tok
    for x in ids:
        assert x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id
    assert len(ids[1]) == 16 and len(ids[0]) < 16


def test_head_and_head_tail_truncation(bert_dir):
    text = " ".join(f"w{i}" for i in range(200))
    full = next(HFTokenizer(bert_dir, max_len=512).token_ids([text]))
    head = HFTokenizer(bert_dir, max_len=42).encode_batch([text])[0]
    ht = HFTokenizer(bert_dir, max_len=42, truncate="head+tail", head_frac=0.25).encode_batch([text])[0]
    assert list(head[1:-1]) == full[:40]
    assert list(ht[1:11]) == full[:10] and list(ht[11:-1]) == full[-30:]
    with pytest.raises(UlmfitError, match="truncate"):
        HFTokenizer(bert_dir, truncate="tail")


def test_setups_tokenizes_dataframe_once_and_encodes_rows_and_strings(bert_dir, small_df):
    tfm = HFTokenizer(bert_dir, max_len=32, text_col="text")

    class Items:
        items = small_df

    dsets = Items()
    tfm.setups(dsets)
    assert IDS_COL in dsets.items and IDS_COL not in small_df  # the user's frame is not modified
    row = dsets.items.iloc[0]
    from_row, from_str = tfm(row), tfm(row.text)
    assert isinstance(from_row, TensorText) and torch.equal(from_row, from_str)
    assert torch.equal(tfm(np.asarray(row[IDS_COL])), from_row)


def test_decode_drops_padding_and_markers(bert_dir):
    tfm = HFTokenizer(bert_dir, max_len=32)
    ids = torch.tensor(list(tfm.encode_batch(["the movie was good"])[0]) + [tfm.pad_id] * 3)
    assert tfm.decode_ids(ids) == "the movie was good"
    assert str(tfm.decode(TensorText(ids))) == "the movie was good"


def test_pickle_keeps_tokenizer_files_not_objects(bert_dir):
    tfm = HFTokenizer(bert_dir, max_len=24, truncate="head+tail")
    state = tfm.__getstate__()
    assert "tok" not in state and "tokenizer.json" in state["tok_files"]
    back = pickle.loads(pickle.dumps(tfm))
    text = "a review that goes on and on " * 10
    assert [list(x) for x in back.encode_batch([text])] == [list(x) for x in tfm.encode_batch([text])]


@pytest.mark.parametrize("arch", ["bert", "roberta", "albert"])
def test_word_start_table_marks_the_first_piece_of_each_word(tiny_models, arch):
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    enc = tok("the unbelievably overwhelming acting", add_special_tokens=False)
    words = enc.word_ids()
    assert len(words) > 4  # some words are split into several pieces
    starts = word_start_table(tok)[torch.tensor(enc["input_ids"])].tolist()
    assert starts == [i == 0 or words[i] != words[i - 1] for i in range(len(words))]


def test_tokenizer_errors(tmp_path, bert_dir):
    with pytest.raises(UlmfitError, match="no such model folder"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UlmfitError, match="no config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UlmfitError, match="1 text.*not strings"):
        HFTokenizer(bert_dir).encode_batch(["ok", 3.0])
