"A fastai Transform over a Hugging Face fast tokenizer: encode once, truncate, decode for display."

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from fastai.text.data import TensorText
from fastai.torch_core import TitledStr
from fasttransform import Transform
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import UlmfitError
from .io import model_source

__all__ = ["IDS_COL", "TextPair", "load_tokenizer", "HFTokenizer", "find_tokenizer", "word_start_table"]

IDS_COL = "input_ids"  # the DataFrame column where `HFTokenizer.setups` caches token ids


def load_tokenizer(src) -> PreTrainedTokenizerBase:
    "Load the fast tokenizer of a model folder or hub name; it must have a padding token."
    if isinstance(src, PreTrainedTokenizerBase):
        tok = src
    else:
        src = model_source(src)
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:
            raise UlmfitError(f"{src}: no usable tokenizer ({type(e).__name__}: {e})") from None
    if not tok.is_fast:
        raise UlmfitError(f"{src}: ulmfit_tx needs a fast (Rust) tokenizer, got {type(tok).__name__}")
    if tok.pad_token_id is None:
        raise UlmfitError(f"{src}: the tokenizer has no padding token")
    return tok


class TextPair(NamedTuple):
    "Two texts a pair classifier reads together (e.g. `learn.predict(TextPair(premise, hypothesis))`)."

    text: str
    text_pair: str


def _find(seq: list[int], part: list[int], start: int = 0) -> int:
    "Where `part` first occurs in `seq` at or after `start` (-1: nowhere)."
    return next((i for i in range(start, len(seq) - len(part) + 1) if seq[i : i + len(part)] == part), -1)


def _special_wrap(backend: Tokenizer, pair: bool = False) -> list[list[int]]:
    """The special-token ids the tokenizer puts around a single text ([before, after], e.g. [CLS] ... [SEP]), or with
    `pair` around and between two texts ([before, between, after], e.g. [CLS] a [SEP] b [SEP])."""
    a, b = (backend.encode(t, add_special_tokens=False).ids for t in ("hello world", "good day"))
    full = backend.encode("hello world", "good day" if pair else None, add_special_tokens=True).ids
    i = _find(full, a)
    j = _find(full, b, i + len(a)) if pair and i >= 0 else len(full)
    if i < 0 or j < 0:
        what = "a pair of texts" if pair else "a text"
        raise UlmfitError(f"cannot tell which special tokens this tokenizer adds around {what}")
    if not pair:
        return [full[:i], full[i + len(a) :]]
    if j == i + len(a):
        raise UlmfitError("this tokenizer puts no separator between the texts of a pair: it cannot encode pairs")
    return [full[:i], full[i + len(a) : j], full[j + len(b) :]]


def word_start_table(tok: PreTrainedTokenizerBase) -> torch.Tensor:
    """A bool per vocabulary id: True where the token starts a word. Reads the subword convention of
    the tokenizer: WordPiece `##` continuations, byte-level BPE `Ġ` or SentencePiece `▁` word starts."""
    vocab = tok.get_vocab()
    backend = tok.backend_tokenizer
    prefix = getattr(backend.model, "continuing_subword_prefix", None)
    pre = repr(backend.pre_tokenizer) + repr(backend.decoder)
    if prefix:
        starts = lambda t: not t.startswith(prefix)
    elif "ByteLevel" in pre:
        starts = lambda t: t.startswith("Ġ")
    elif "Metaspace" in pre:
        starts = lambda t: t.startswith("▁")
    else:
        raise UlmfitError("whole-word masking: cannot tell word starts for this tokenizer; use whole_word=False")
    table = torch.ones(max(len(tok), max(vocab.values()) + 1), dtype=torch.bool)
    special = set(tok.all_special_ids)
    for t, i in vocab.items():
        if i not in special:
            table[i] = starts(t)
    return table


class HFTokenizer(Transform):
    """Encode texts with a Hugging Face fast tokenizer into `TensorText` ids (special tokens added,
    truncated to `max_len`), and decode ids back to text for `show_batch` and `show_results`.
    With `text_col`, `setups` tokenizes a whole DataFrame once, in one batched call, and caches the
    ids in its `input_ids` column, so batches never re-tokenize. With `pair`, an item is two texts
    (`TextPair`, or two columns), encoded as the tokenizer's pair (e.g. [CLS] a [SEP] b [SEP])."""

    input_types = (pd.Series, str, list, np.ndarray, TextPair)
    chunks, pair = 1, False  # (transforms pickled before chunk-and-pool and pairs)
    train_setup = False  # `setups` gets the whole dataset (all splits are tokenized once), not the training subset

    def __init__(
        self,
        tokenizer,  # A fast tokenizer, or a model folder / hub name to load one from
        max_len: int | None = None,  # Longest sequence, special tokens included (None: tokenizer's limit, at most 512)
        truncate: str = "head",  # "head" keeps the start of long texts, "head+tail" the start and the end
        head_frac: float = 0.25,  # With "head+tail": the share of the kept tokens taken from the start
        text_col: str | list | None = None,  # DataFrame column read by `setups` and for rows without cached ids
        # (pairs: the two columns)
        chunks: int = 1,  # Up to this many chunks of `max_len` tokens a text (chunk-and-pool classifiers); 1: one
        pair: bool = False,  # Items are pairs of texts, encoded together (truncated longest first)
    ):
        if truncate not in ("head", "head+tail"):
            raise UlmfitError(f"truncate must be 'head' or 'head+tail', not {truncate!r}")
        if not isinstance(chunks, int) or chunks < 1:
            raise UlmfitError(f"chunks must be a positive integer, not {chunks!r}")
        if pair and chunks > 1:
            raise UlmfitError("chunk-and-pool (chunks > 1) reads one long text, not a pair of texts")
        self.tok = load_tokenizer(tokenizer)
        if chunks > 1 and self.tok.padding_side == "left":
            raise UlmfitError("chunks > 1 needs a tokenizer that pads on the right (padding_side='right')")
        self.max_len = max_len or min(self.tok.model_max_length, 512)
        self.truncate, self.head_frac, self.text_col, self.chunks = truncate, head_frac, text_col, chunks
        self.pair = pair
        self._init_backend()

    def _init_backend(self):
        "A private copy of the Rust tokenizer with its own padding and truncation switched off."
        self.backend = Tokenizer.from_str(self.tok.backend_tokenizer.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()
        specials = _special_wrap(self.backend, self.pair)  # (a pair transform reads pairs only)
        self.prefix, self.suffix = specials[0], specials[-1]
        self.between = specials[1] if self.pair else []  # ids between a pair's texts

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    @property
    def pad_first(self) -> bool:
        return self.tok.padding_side == "left"

    @property
    def n_special(self) -> int:
        "Special tokens an input (of one sequence) holds: [CLS] ... [SEP] gives 2, a BERT pair 3."
        return len(self.prefix) + len(self.between) + len(self.suffix)

    def wrap(self, ids, truncate: bool = True, first: int | None = None) -> np.ndarray:
        """One text's ids (without special tokens) as model input: truncated to fit `max_len` (`chunks` times), special
        tokens around. With `chunks` > 1 a long text becomes consecutive chunks of `max_len` tokens, each with its
        special tokens, the last one shorter: the layout `SequenceClassifier(chunk_len=max_len)` reads. With `first`
        (pairs), `ids` are two texts' ids, the first text's `first` ids then the second's: see `wrap_pair`."""
        if first is not None:
            return self.wrap_pair(ids[:first], ids[first:])
        ids = np.asarray(ids, dtype=np.int32)
        n = self.max_len - len(self.prefix) - len(self.suffix)  # text tokens a chunk holds
        keep = n * self.chunks
        if truncate and len(ids) > keep:
            head = keep if self.truncate == "head" else round(keep * self.head_frac)
            ids = np.concatenate([ids[:head], ids[len(ids) - (keep - head) :]])
        pre, suf = np.asarray(self.prefix, np.int32), np.asarray(self.suffix, np.int32)
        if self.chunks == 1 or len(ids) <= n:
            return np.concatenate([pre, ids, suf])
        return np.concatenate([np.concatenate([pre, ids[i : i + n], suf]) for i in range(0, len(ids), n)])

    def wrap_pair(self, a, b) -> np.ndarray:
        """Two texts' ids as the tokenizer's pair (e.g. [CLS] a [SEP] b [SEP]), cut to `max_len` longest first: the
        longer text loses tokens from its end until both fit, or until it is as short as the other."""
        n = self.max_len - self.n_special  # text tokens both together
        la, lb = len(a), len(b)
        if la + lb > n:
            short = min(la, lb, n // 2)
            la, lb = (short, n - short) if la <= lb else (n - short, short)
        parts = (self.prefix, a[:la], self.between, b[:lb], self.suffix)
        return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])

    def token_ids(self, texts, chunk: int = 4096) -> Iterator[list[int]]:
        """Token ids of each text, without special tokens or truncation, encoded in parallel `chunk` texts
        at a time (so memory holds one chunk of the tokenizer's encodings, not all of them)."""
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise UlmfitError(f"{len(bad)} text(s) are not strings (positions {bad[:5]})")
        for i in range(0, len(texts), chunk):
            yield from (e.ids for e in self.backend.encode_batch_fast(texts[i : i + chunk], add_special_tokens=False))

    def encode_batch(self, texts) -> list[np.ndarray]:
        """Model inputs of many texts (pairs: of many `TextPair`s or (text, text) tuples, or a two-column DataFrame):
        special tokens added, truncated to `max_len`."""
        if not self.pair:
            if isinstance(texts, pd.DataFrame):
                if texts.shape[1] != 1:
                    raise UlmfitError(f"this model reads one text a row, not {texts.shape[1]} columns")
                texts = texts.iloc[:, 0]
            return [self.wrap(ids) for ids in self.token_ids(texts)]
        pairs = list(texts.itertuples(index=False) if isinstance(texts, pd.DataFrame) else texts)
        if any(isinstance(p, str) or len(p) != 2 for p in pairs):
            raise UlmfitError("this model reads pairs of texts: give (text, text_pair) pairs, not single texts")
        firsts, seconds = (self.token_ids(side) for side in zip(*pairs)) if pairs else ([], [])
        return [self.wrap_pair(a, b) for a, b in zip(firsts, seconds)]

    def setups(self, dsets):
        "Tokenize the DataFrame behind `dsets` once and cache the ids in its `input_ids` column."
        items = getattr(dsets, "items", None)
        if self.text_col is None or not isinstance(items, pd.DataFrame) or IDS_COL in items:
            return
        dsets.items = items.assign(**{IDS_COL: self.encode_batch(items[self.text_col])})

    def encodes(self, o: pd.Series):
        if IDS_COL in o.index:
            return TensorText(torch.as_tensor(o[IDS_COL], dtype=torch.long))
        return self(TextPair(*o[self.text_col]) if self.pair else o[self.text_col])

    def encodes(self, o: str | TextPair):  # noqa: F811 (fastai dispatches `encodes` on the type of `o`)
        return TensorText(torch.as_tensor(self.encode_batch([o])[0], dtype=torch.long))

    def encodes(self, o: list | np.ndarray):  # noqa: F811
        return TensorText(torch.as_tensor(np.asarray(o), dtype=torch.long))

    def decode_ids(self, ids) -> str:
        "Text of `ids` without padding and sequence markers (a [MASK] stays visible); a pair's texts joined by ' | '."
        ids = torch.as_tensor(ids).tolist()
        cut = _find(ids, self.between, len(self.prefix)) if self.pair else -1
        if cut < 0:
            return self._decode(ids)
        return f"{self._decode(ids[:cut])} | {self._decode(ids[cut + len(self.between) :])}"

    def _decode(self, ids: list[int]) -> str:
        drop = {self.pad_id, *self.prefix, *self.between, *self.suffix}
        return self.tok.decode([i for i in ids if i not in drop]).strip()

    def decodes(self, o: TensorText):
        return TitledStr(self.decode_ids(o))

    def __getstate__(self):
        "Pickle the tokenizer as its `save_pretrained` files, not as transformers objects."
        state = {k: v for k, v in self.__dict__.items() if k not in ("tok", "backend")}
        tmp = tempfile.mkdtemp()
        try:
            self.tok.save_pretrained(tmp)
            state["tok_files"] = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        finally:
            shutil.rmtree(tmp)
        return state

    def __setstate__(self, state):
        files = state.pop("tok_files")
        self.__dict__.update(state)
        tmp = tempfile.mkdtemp()
        try:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.tok = AutoTokenizer.from_pretrained(tmp)
        finally:
            shutil.rmtree(tmp)
        self._init_backend()


def find_tokenizer(dls) -> HFTokenizer:
    "The `HFTokenizer` in the input pipeline of `dls` (DataLoaders or Datasets)."
    ds = getattr(dls, "valid_ds", dls)
    if isinstance(getattr(ds, "tfm", None), HFTokenizer):
        return ds.tfm  # a view of a token store
    for tl in getattr(ds, "tls", [ds]):
        for t in getattr(getattr(tl, "tfms", None), "fs", []):
            if isinstance(t, HFTokenizer):
                return t
    raise UlmfitError("these DataLoaders have no HFTokenizer; build them with ulmfit_tx's data functions")
