import pytest
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import ColReader, ColSplitter

from ulmfit_tx import HFTextBlock, PadTokens, UlmfitError, clas_dataloaders, find_tokenizer, read_folder


def test_batches_are_padded_to_their_longest_text_not_max_len(bert_dir, small_df):
    dls = clas_dataloaders(small_df, bert_dir, max_len=128, bs=4)
    pad = find_tokenizer(dls).pad_id
    ids = [dls.valid_ds[i][0] for i in range(len(dls.valid_ds))]
    batches = list(dls.valid)
    lengths = sorted(map(len, ids), reverse=True)
    for i, (x, y) in enumerate(batches):
        want = lengths[i * 4 : (i + 1) * 4]
        assert x.shape == (len(want), max(want))  # longest in the batch, sorted by length
        assert ((x != pad).sum(1).tolist()) == want  # real tokens first, padding after (right padding)
    assert batches[0][0].shape[1] >= batches[-1][0].shape[1]


def test_training_batches_group_similar_lengths(bert_dir, sample_df):
    dls = clas_dataloaders(sample_df.iloc[:400], bert_dir, max_len=128, bs=16)
    pad = find_tokenizer(dls).pad_id
    waste = [(x == pad).float().mean().item() for x, _ in dls.train]
    assert sum(waste) / len(waste) < 0.1  # little padding thanks to sorted chunks


def test_left_padding():
    pad = PadTokens(pad_id=0, pad_first=True)
    out = pad([(torch.tensor([5, 6, 7]), 1), (torch.tensor([8]), 0)])
    assert out[1][0].tolist() == [0, 0, 8] and out[0][0].tolist() == [5, 6, 7] and out[1][1] == 0
    assert PadTokens(0, multiple_of=8)([(torch.tensor([1, 2, 3]),)])[0][0].shape == (8,)


def test_valid_column_random_split_and_int_labels(bert_dir, small_df):
    dls = clas_dataloaders(small_df, bert_dir, max_len=32, bs=8)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (32, 8)
    assert list(dls.vocab) == ["neg", "pos"]
    df = small_df.drop(columns="is_valid").assign(label=(small_df.label == "pos").astype(int))
    dls = clas_dataloaders(df, bert_dir, max_len=32, bs=8, valid_pct=0.25)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (30, 10) and list(dls.vocab) == [0, 1]
    strings = small_df.assign(is_valid=small_df.is_valid.map({True: "True", False: "False"}))
    assert len(clas_dataloaders(strings, bert_dir, max_len=32).valid_ds) == 8


def test_datablock_api_with_hf_text_block(bert_dir, small_df):
    dblock = DataBlock(
        blocks=(HFTextBlock(bert_dir, max_len=32), CategoryBlock),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
    )
    dls = dblock.dataloaders(small_df, bs=8, num_workers=0)
    x, y = dls.one_batch()
    assert x.shape[0] == 8 and x.shape[1] <= 32 and y.shape == (8,)
    dls.show_batch(max_n=2)


def test_imdb_folder_layout(tmp_path):
    for split, label, i in [("train", "pos", 0), ("train", "neg", 1), ("test", "pos", 2), ("test", "neg", 3)]:
        (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / split / label / f"{i}_7.txt").write_text(f"review {i}")
    df = read_folder(tmp_path)
    assert sorted(df.label) == ["neg", "neg", "pos", "pos"] and df.is_valid.sum() == 2
    assert set(df[df.is_valid].text) == {"review 2", "review 3"}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.drop(columns="text"), "missing column 'text'"),
        (lambda d: d.drop(columns="label"), "missing column 'label'"),
        (lambda d: d.assign(text=[""] * 2 + list(d.text[2:])), "2 row.*empty.*rows 0, 1"),
        (lambda d: d.assign(text=[3.5] + list(d.text[1:])), "1 row.*not text.*rows 0"),
        (lambda d: d.assign(label="pos"), "single class"),
        (lambda d: d.assign(is_valid=False), "no validation rows"),
        (lambda d: d.assign(is_valid="maybe"), "True/False"),
        (lambda d: d.iloc[:0], "no rows"),
    ],
)
def test_bad_input_errors(bert_dir, small_df, change, message):
    with pytest.raises(UlmfitError, match=message):
        clas_dataloaders(change(small_df), bert_dir, max_len=32)


def test_explicit_valid_column_must_exist(bert_dir, small_df):
    with pytest.raises(UlmfitError, match="missing column 'split'"):
        clas_dataloaders(small_df, bert_dir, valid_col="split", max_len=32)


def test_texts_are_tokenized_once_when_dataloaders_are_built(bert_dir, small_df, monkeypatch):
    from ulmfit_tx import HFTokenizer

    calls = []

    class Counting:  # the Rust tokenizer, counting the texts it encodes
        def __init__(self, backend):
            self.backend = backend

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def encode_batch_fast(self, texts, **kwargs):
            calls.append(len(texts))
            return self.backend.encode_batch_fast(texts, **kwargs)

    init = HFTokenizer._init_backend
    monkeypatch.setattr(
        HFTokenizer, "_init_backend", lambda self: init(self) or setattr(self, "backend", Counting(self.backend))
    )
    dls = clas_dataloaders(small_df, bert_dir, max_len=32, bs=8)
    assert calls == [len(small_df)]  # one batched call over every row
    for _ in range(2):
        list(dls.train), list(dls.valid)  # two epochs: no tokenization at all
    assert calls == [len(small_df)]
