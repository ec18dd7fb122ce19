"""ULMFiT's stage 1 from nothing: read a plain-text corpus, train a tokenizer on it, build a new
encoder of any supported architecture, and train it with the MLM objective. The result is a Hugging
Face model folder that the rest of the pipeline (finetune-lm, train-clf, fill-mask) reads as any other."""

from __future__ import annotations

import os

from transformers import (
    AlbertConfig,
    AutoModelForMaskedLM,
    BertConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from .archs import max_positions
from .encoders import MEMORY_MODEL_TYPES, CompressiveConfig, MemXLConfig, ScratchConfig
from .errors import UlmfitError
from .io import iter_corpus, mark_unknown
from .learner import MLMLearner, mlm_learner
from .mlm import mlm_dataloaders
from .models import MaskedLM, MemoryMaskedLM
from .train_tokenizer import train_tokenizer, unk_token

__all__ = ["PRETRAIN_ARCHS", "new_config", "pretrain_learner"]

# arch: (tokenizer kind, config class)
PRETRAIN_ARCHS = {
    "bert": ("wordpiece", BertConfig),
    "roberta": ("bpe", RobertaConfig),
    "albert": ("unigram", AlbertConfig),
    "scratch": ("wordpiece", ScratchConfig),
    "memxl": ("wordpiece", MemXLConfig),
    "compressive": ("wordpiece", CompressiveConfig),
}
# dropout inside the encoder (ours; BERT, RoBERTa, ALBERT): off while pretraining, kept for fine-tuning
DROPOUT_FIELDS = (
    "hidden_dropout",
    "attn_dropout",
    "attn_layer_dropout",
    "ff_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


def new_config(
    arch: str,  # One of PRETRAIN_ARCHS
    tok: PreTrainedTokenizerFast,  # The tokenizer trained for it
    max_len: int = 128,  # Block length (memory encoders: segment length)
    layers: int = 4,  # Encoder layers
    hidden: int = 256,  # Hidden size
    heads: int = 4,  # Attention heads
    **kwargs,  # Further config fields (e.g. mem_len, lmem_len, cmem_ratio)
) -> PreTrainedConfig:
    "A config of `arch` sized for `tok`, with feed-forward width 4 x hidden."
    if arch not in PRETRAIN_ARCHS:
        raise UlmfitError(f"arch must be one of {', '.join(PRETRAIN_ARCHS)}, not {arch!r}")
    cls = PRETRAIN_ARCHS[arch][1]
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        pad_token_id=tok.pad_token_id,
    )
    if hidden % heads:
        raise UlmfitError(f"--hidden {hidden} must be a multiple of --heads {heads}")
    if cls.model_type in MEMORY_MODEL_TYPES:
        extra = dict(segment_len=max_len, mem_len=max_len)
        if cls is CompressiveConfig:
            extra["cmem_len"] = max_len // 4
    elif cls is RobertaConfig:
        extra = dict(
            max_position_embeddings=max_len + 2,
            type_vocab_size=1,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        )
    elif cls is AlbertConfig:
        extra = dict(max_position_embeddings=max_len, embedding_size=min(128, hidden))
    else:
        extra = dict(max_position_embeddings=max_len)
    return cls(**{**common, **extra, **kwargs})


def pretrain_learner(
    texts,  # Training documents: a list, or a corpus path (.txt/.txt.gz file or folder, CSV/parquet)
    arch: str = "scratch",  # One of PRETRAIN_ARCHS
    valid_texts=None,  # Held-out documents, in the same forms (default: 5% of `texts`)
    vocab_size: int = 8000,  # Tokenizer vocabulary, special tokens included
    max_len: int = 128,  # Block length; memory encoders: segment length (rows read 2 segments a batch)
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,  # Encoder size
    bs: int = 32,  # Batch size
    seed: int = 42,  # Seed of the split and of the masking
    dropout: float | None = 0.0,  # Dropout while pretraining (short runs learn faster without); None: the config's
    config_kwargs: dict | None = None,  # Further config fields
    docs: str = "lines",  # For a .txt corpus: a document is a line, a file, or a WikiText article
    text_col: str = "text",  # Column of a CSV/parquet corpus
    cache=None,  # Token store cache for a corpus path (None: the default cache; False: none)
    **kwargs,  # Passed to `mlm_learner` (e.g. `cbs`, `precision`)
) -> MLMLearner:
    """A tokenizer trained on `texts`, a new `arch` encoder and an `MLMLearner` over them, ready for
    `fit_one_cycle`. Memory encoders read whole documents in order (`mode="segments"`). The model is built
    with `dropout`, but its config keeps the architecture's default dropout: that is what a saved folder
    gives the fine-tuning stages."""
    kind, _ = PRETRAIN_ARCHS.get(arch, (None, None))
    if kind is None:
        raise UlmfitError(f"arch must be one of {', '.join(PRETRAIN_ARCHS)}, not {arch!r}")
    unk = unk_token(kind)
    if not isinstance(valid_texts, (str, os.PathLike)):
        valid_texts = mark_unknown(valid_texts, unk)
    if isinstance(texts, (str, os.PathLike)):  # streamed twice: to train the tokenizer, then into the token store
        tok = train_tokenizer(mark_unknown(iter_corpus(texts, docs, text_col), unk), kind, vocab_size)
    else:
        texts = mark_unknown(list(texts), unk)
        tok = train_tokenizer(texts, kind, vocab_size)
    config = new_config(arch, tok, max_len, layers, hidden, heads, **(config_kwargs or {}))
    memory = config.model_type in MEMORY_MODEL_TYPES
    tok.model_max_length = max_positions(config)
    dls = mlm_dataloaders(
        texts,
        tok,
        max_len=2 * max_len if memory else max_len,
        mode="segments" if memory else "blocks",
        valid_texts=valid_texts,
        valid_pct=0.05,
        bs=bs,
        seed=seed,
        docs=docs,
        text_col=text_col,
        cache=cache,
    )
    defaults = {f: getattr(config, f) for f in DROPOUT_FIELDS if hasattr(config, f)}
    if dropout is not None:
        config.update(dict.fromkeys(defaults, dropout))
    hf = AutoModelForMaskedLM.from_config(config)
    hf.config.update(defaults)  # the modules keep `dropout`
    model = (MemoryMaskedLM if memory else MaskedLM)(hf, tok.pad_token_id)
    return mlm_learner(dls, model, **kwargs)
