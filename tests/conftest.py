"Tiny offline models: BERT, RoBERTa, ALBERT and DistilBERT folders with tokenizers trained here."

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AlbertConfig, AutoModelForMaskedLM, BertConfig, DistilBertConfig, RobertaConfig
from transformers.utils import logging as hf_logging

from ulmfit_tx.train_tokenizer import train_tokenizer

hf_logging.set_verbosity_error()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["ULMFIT_TX_CACHE"] = tempfile.mkdtemp(
    prefix="ulmfit_tx_test_cache-"
)  # token stores of this run (and its subprocesses)
atexit.register(shutil.rmtree, os.environ["ULMFIT_TX_CACHE"], ignore_errors=True)  # removed when pytest exits
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "imdb_sample.csv"
ARCHS = ["bert", "roberta", "albert", "distilbert"]
TOKENIZER_KIND = {"bert": "wordpiece", "roberta": "bpe", "albert": "unigram", "distilbert": "wordpiece"}
N_LAYERS = 2


def tiny_config(arch: str, tok):
    "A 2-layer, 32-wide config of `arch` for `tok`."
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    if arch == "bert":
        return BertConfig(
            hidden_size=32,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    if arch == "roberta":
        return RobertaConfig(
            hidden_size=32,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=130,
            type_vocab_size=1,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            **common,
        )
    if arch == "albert":
        return AlbertConfig(
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    return DistilBertConfig(dim=32, n_layers=N_LAYERS, n_heads=2, hidden_dim=64, max_position_embeddings=128, **common)


@pytest.fixture(scope="session")
def sample_df():
    return pd.read_csv(SAMPLE, keep_default_na=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, sample_df):
    "arch -> folder holding a tiny randomly initialised MLM model and its tokenizer (save_pretrained layout)."
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_models")
    texts = sample_df.text.tolist()[:300]
    toks = {k: train_tokenizer(texts, k, 600) for k in set(TOKENIZER_KIND.values())}
    out = {}
    for arch in ARCHS:
        tok = toks[TOKENIZER_KIND[arch]]
        d = root / arch
        AutoModelForMaskedLM.from_config(tiny_config(arch, tok)).save_pretrained(d)
        tok.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def bert_dir(tiny_models):
    return tiny_models["bert"]


def reviews_csv(folder: Path, sample_df, n_train: int, n_valid: int) -> Path:
    "The first `n_train` training and `n_valid` validation sample reviews, as `folder/d.csv`."
    df = pd.concat([sample_df[~sample_df.is_valid].head(n_train), sample_df[sample_df.is_valid].head(n_valid)])
    df.to_csv(folder / "d.csv", index=False)
    return folder / "d.csv"


@pytest.fixture()
def small_df(sample_df):
    "40 reviews: 32 training rows and 8 validation rows, both classes balanced in each."
    train = sample_df[~sample_df.is_valid].groupby("label").head(16)
    valid = sample_df[sample_df.is_valid].groupby("label").head(4)
    return pd.concat([train, valid]).reset_index(drop=True)


OWN_ARCHS = ["scratch", "memxl", "compressive"]
SEGMENT = 16  # segment length of the tiny memory encoders


@pytest.fixture(scope="session")
def own_models(tmp_path_factory, sample_df):
    "arch -> folder holding a tiny ulmfit_tx encoder (scratch, memxl, compressive) with a WordPiece tokenizer."
    from ulmfit_tx.pretrain import new_config

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("own_models")
    tok = train_tokenizer(sample_df.text.tolist()[:300], "wordpiece", 600)
    out = {}
    for arch in OWN_ARCHS:
        config = new_config(
            arch,
            tok,
            max_len=SEGMENT if arch != "scratch" else 128,
            layers=N_LAYERS,
            hidden=32,
            heads=2,
            **({"lmem_len": 4} if arch == "memxl" else {}),
        )
        tok.model_max_length = config.max_position_embeddings
        AutoModelForMaskedLM.from_config(config).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out
