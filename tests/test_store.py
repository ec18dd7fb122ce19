"The token store: streaming build from every source kind, memory-mapped reading, the cache, refusals."

import json
import pickle

import numpy as np
import pandas as pd
import pytest
from fastai.learner import load_learner

from ulmfit_tx import HFTokenizer, TokenStore, UlmfitError, as_store, build_store, clas_dataloaders, mlm_dataloaders
from ulmfit_tx.cli import main
from ulmfit_tx.io import read_corpus, read_folder


@pytest.fixture(scope="module")
def tfm(bert_dir):
    return HFTokenizer(bert_dir)


def _docs(store):
    return [store.doc(i).tolist() for i in range(len(store))]


def test_csv_in_chunks_round_trips_ids_labels_and_flags(tfm, small_df, tmp_path):
    small_df.to_csv(tmp_path / "d.csv", index=False)
    store = build_store(tmp_path / "d.csv", tfm, tmp_path / "s", label_col="label", valid_col="is_valid", chunk_rows=7)
    assert len(store) == len(small_df) and store.ids.dtype == np.uint16 and isinstance(store.ids, np.memmap)
    assert _docs(store) == list(tfm.token_ids(small_df.text))  # same ids as one in-memory call, in order
    assert store.classes == ["neg", "pos"]
    assert [store.classes[i] for i in store.labels] == small_df.label.tolist()
    assert store.is_valid.tolist() == small_df.is_valid.tolist()
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["n_tokens"] == store.offsets[-1] == sum(map(len, _docs(store))) and meta["format"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # written to a temporary folder, renamed


def test_integer_labels_stay_integers_and_parquet_and_folders_stream(tfm, small_df, tmp_path):
    df = small_df.assign(label=(small_df.label == "pos").astype(int) * 10)
    df.to_parquet(tmp_path / "d.parquet", row_group_size=6)
    store = build_store(tmp_path / "d.parquet", tfm, tmp_path / "p", label_col="label", chunk_rows=5)
    assert store.classes == [0, 10] and _docs(store) == list(tfm.token_ids(df.text))
    for i, r in small_df.iterrows():
        d = tmp_path / "imdb" / ("test" if r.is_valid else "train") / r.label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.txt").write_text(r.text)
    folder = read_folder(tmp_path / "imdb")
    store = build_store(tmp_path / "imdb", tfm, tmp_path / "f", label_col="label", valid_col="is_valid", chunk_rows=4)
    assert _docs(store) == list(tfm.token_ids(folder.text)) and store.is_valid.tolist() == folder.is_valid.tolist()


def test_text_corpus_by_article_with_unknown_words(tfm, tmp_path):
    (tmp_path / "c.txt").write_text(" = A = \n\n one <unk> two \n three \n = B = \n four \n")
    store = build_store(tmp_path / "c.txt", tfm, tmp_path / "s", docs="articles", unk="[UNK]", chunk_rows=1)
    texts = [d.replace("<unk>", "[UNK]") for d in read_corpus(tmp_path / "c.txt", "articles")]
    assert len(store) == 2 and _docs(store) == list(tfm.token_ids(texts)) and tfm.tok.unk_token_id in store.doc(0)
    assert len(build_store(tmp_path / "c.txt", tfm, tmp_path / "l", docs="lines", max_docs=3)) == 3


def test_cache_skips_tokenization_rebuilds_stale_entries_and_refuses_other_tokenizers(
    tfm, tiny_models, small_df, tmp_path, capsys
):
    small_df.to_csv(tmp_path / "d.csv", index=False)
    first = as_store(tmp_path / "d.csv", tfm, tmp_path / "cache", label_col="label")
    again = as_store(tmp_path / "d.csv", tfm, tmp_path / "cache", label_col="label")
    assert again.path == first.path and "tokenization skipped" in capsys.readouterr().err
    small_df.head(10).to_csv(tmp_path / "d.csv", index=False)  # the source changes: the entry is stale
    assert len(as_store(tmp_path / "d.csv", tfm, tmp_path / "cache", label_col="label")) == 10
    assert "changed" in capsys.readouterr().err
    other = HFTokenizer(tiny_models["roberta"])
    assert as_store(tmp_path / "d.csv", other, tmp_path / "cache").path != first.path  # its own entry
    with pytest.raises(UlmfitError, match="made with another tokenizer"):
        as_store(first.path, other)


def test_truncated_or_foreign_stores_and_failed_builds_give_clear_errors(tfm, small_df, tmp_path):
    store = build_store(small_df, tfm, tmp_path / "s")
    assert len(pickle.loads(pickle.dumps(store))) == len(store)  # pickled as its path, reopened
    with open(tmp_path / "s" / "ids.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UlmfitError, match="ids.bin: missing or truncated"):
        TokenStore(tmp_path / "s")
    with pytest.raises(UlmfitError, match="not a token store"):
        TokenStore(tmp_path)
    bad = small_df.assign(text=small_df.text.where(small_df.index != 5, "  "))
    with pytest.raises(UlmfitError, match="1 row.*empty.*rows 5"):
        build_store(bad, tfm, tmp_path / "b", chunk_rows=4)
    assert not (tmp_path / "b").exists() and len(list(tmp_path.iterdir())) == 1  # nothing left behind
    renamed = bad.rename(columns={"text": "sentence", "label": "y"})  # errors name the user's columns
    with pytest.raises(UlmfitError, match="column 'sentence' are empty"):
        build_store(renamed, tfm, tmp_path / "b", text_col="sentence", label_col="y")
    renamed.to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(UlmfitError, match="column 'sentence' are empty"):
        build_store(tmp_path / "r.csv", tfm, tmp_path / "b", text_col="sentence", label_col="y")
    with pytest.raises(UlmfitError, match="no label in column 'y'"):
        build_store(
            renamed.assign(sentence="fine", y=[None] + list(renamed.y[1:])),
            tfm,
            tmp_path / "b",
            text_col="sentence",
            label_col="y",
        )
    with pytest.raises(UlmfitError, match="already exists"):
        build_store(small_df, tfm, tmp_path / "s")


def test_tokenize_command_makes_a_store_that_training_reads(tiny_models, small_df, tmp_path, capsys):
    small_df.to_csv(tmp_path / "d.csv", index=False)
    assert (
        main(
            [
                "tokenize",
                "--model",
                str(tiny_models["bert"]),
                "--data",
                str(tmp_path / "d.csv"),
                "--out",
                str(tmp_path / "store"),
                "--label-col",
                "label",
            ]
        )
        == 0
    )
    assert "40 documents" in capsys.readouterr().out
    dls = clas_dataloaders(tmp_path / "store", tiny_models["bert"], max_len=32, bs=8)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (32, 8) and list(dls.vocab) == ["neg", "pos"]
    lm = mlm_dataloaders(tmp_path / "store", tiny_models["bert"], max_len=32, bs=4, mode="docs")
    assert lm.one_batch()[0].shape[0] == 4
    assert (
        main(
            [
                "train-clf",
                "--model",
                str(tiny_models["roberta"]),
                "--data",
                str(tmp_path / "store"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert (
        main(
            [
                "train-clf",
                "--model",
                str(tiny_models["bert"]),
                "--data",
                str(tmp_path / "store"),
                "--out",
                str(tmp_path / "clf"),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--schedule",
                "one-cycle",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "clf"),
                "--data",
                str(tmp_path / "store"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )  # a store as prediction input: a row per document
    by_store = pd.read_csv(tmp_path / "p.csv")
    by_text = load_learner(tmp_path / "clf" / "export.pkl").predict_texts(small_df.text)
    assert by_store.doc.tolist() == list(range(40))
    assert by_store.prob_pos.values == pytest.approx(by_text.prob_pos.values, abs=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-len", "0"], "max-len must be positive"),
        (["--bs", "0"], "bs must be positive"),
        (["--epochs", "0"], "epochs must be positive"),
        (["--lr", "-1"], "lr must be positive"),
    ],
)
def test_numeric_options_out_of_range_are_refused_before_any_work(
    tiny_models, small_df, tmp_path, capsys, args, message
):
    small_df.to_csv(tmp_path / "d.csv", index=False)
    for cmd in ("train-clf", "finetune-lm"):
        assert (
            main(
                [
                    cmd,
                    "--model",
                    str(tiny_models["bert"]),
                    "--data",
                    str(tmp_path / "d.csv"),
                    "--out",
                    str(tmp_path / "o"),
                    *args,
                ]
            )
            == 2
        )
        assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
