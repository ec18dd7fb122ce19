"Classification data: a TransformBlock over `HFTokenizer`, length-sorted batches with dynamic padding."
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import ColReader, ColSplitter, RandomSplitter
from fastai.text.data import SortedDL
from fastcore.basics import ifnone
from fasttransform import Transform

from .errors import UlmfitError, check_columns, check_labels, check_texts
from .io import read_data
from .tokenize import IDS_COL, HFTokenizer

__all__ = ["PadTokens", "cached_lengths", "TokenSortedDL", "HFTextBlock", "valid_mask", "clas_dataloaders"]


class PadTokens(Transform):
    "`before_batch`: pad the ids of each sample to the longest in the batch, on the tokenizer's padding side."

    def __init__(self,
        pad_id: int,             # Padding token id
        pad_first: bool = False, # Pad on the left (tokenizers with `padding_side='left'`)
        multiple_of: int = 1,    # Round the padded length up to a multiple (8 suits tensor cores)
    ):
        super().__init__()
        self.pad_id, self.pad_first, self.multiple_of = pad_id, pad_first, multiple_of

    def encodes(self, samples: list):
        lens = [len(s[0]) for s in samples]
        n = -(-max(lens) // self.multiple_of) * self.multiple_of
        out = []
        for s, l in zip(samples, lens):
            pad = s[0].new_full((n - l,), self.pad_id)
            out.append((torch.cat([pad, s[0]] if self.pad_first else [s[0], pad]), *s[1:]))
        return out


def cached_lengths(dataset) -> list[int] | None:
    "Token counts of the items of `dataset` read from ids already computed, or None if there are none."
    items = getattr(getattr(dataset, "tls", [dataset])[0], "items", None)
    if isinstance(items, pd.DataFrame): return items[IDS_COL].map(len).tolist() if IDS_COL in items else None
    if items is not None and len(items) and isinstance(items[0], np.ndarray): return [len(o) for o in items]
    return None


class TokenSortedDL(SortedDL):
    """fastai's `SortedDL` (validation sorted by length, training in shuffled chunks of similar length)
    taking the lengths from the cached ids instead of running the pipeline on every item."""

    def __init__(self, dataset, res=None, **kwargs):
        super().__init__(dataset, res=ifnone(res, cached_lengths(dataset)), **kwargs)


def HFTextBlock(
    tokenizer,                   # A fast tokenizer, or a model folder / hub name
    text_col: str = "text",      # DataFrame column with the texts
    max_len: int | None = None,  # Longest sequence, special tokens included
    truncate: str = "head",      # "head" or "head+tail" (keep the start and the end of long texts)
    head_frac: float = 0.25,     # With "head+tail": the share of tokens kept from the start
    multiple_of: int = 1,        # Pad batches to a multiple of this length
) -> TransformBlock:
    "A `TransformBlock` for texts in a DataFrame: tokenized once when the DataLoaders are built, padded per batch."
    tfm = HFTokenizer(tokenizer, max_len, truncate, head_frac, text_col)
    return TransformBlock(type_tfms=tfm, dl_type=TokenSortedDL,
                          dls_kwargs={"before_batch": PadTokens(tfm.pad_id, tfm.pad_first, multiple_of)})


_TRUE, _FALSE = {"true", "1", "yes", "valid"}, {"false", "0", "no", "train", ""}


def valid_mask(df: pd.DataFrame, valid_col: str) -> pd.Series:
    "The `valid_col` column as booleans (True/False, 1/0, yes/no), or an error naming the odd values."
    col = df[valid_col]
    if col.dtype == bool: return col
    s = col.astype(str).str.strip().str.lower()
    odd = ~s.isin(_TRUE | _FALSE)
    if odd.any(): raise UlmfitError(f"column {valid_col!r} must hold True/False, found {sorted(col[odd].astype(str).unique())[:5]}")
    return s.isin(_TRUE)


def _split(df: pd.DataFrame, valid_col: str | None, valid_pct: float, seed: int):
    """The DataFrame (with `valid_col` made boolean) and its splitter: by `valid_col` when the data has
    it (a name other than the default must exist), else at random."""
    if valid_col is None or (valid_col == "is_valid" and valid_col not in df):
        return df, RandomSplitter(valid_pct, seed=seed)
    check_columns(df, [valid_col])
    is_valid = valid_mask(df, valid_col)
    if is_valid.all() or not is_valid.any():
        raise UlmfitError(f"column {valid_col!r} leaves no {'training' if is_valid.all() else 'validation'} rows")
    return df.assign(**{valid_col: is_valid}), ColSplitter(valid_col)


def clas_dataloaders(
    source,                            # DataFrame, CSV/parquet file, or folder in the IMDb train/<label>/*.txt layout
    tokenizer,                         # A fast tokenizer, or a model folder / hub name
    text_col: str = "text",            # Column with the texts
    label_col: str = "label",          # Column with the labels (strings or ints)
    valid_col: str | None = "is_valid",# Boolean column marking validation rows; random split if the data has none
    valid_pct: float = 0.2,            # Validation share of a random split
    seed: int = 42,                    # Seed of a random split
    max_len: int | None = None,        # Longest sequence, special tokens included
    truncate: str = "head",            # "head" or "head+tail"
    bs: int = 32,                      # Batch size
    **kwargs,                          # Passed to `DataBlock.dataloaders` (e.g. `device`)
) -> DataLoaders:
    "Classification `DataLoaders`: texts tokenized once, length-sorted batches padded to their longest text."
    df = source if isinstance(source, pd.DataFrame) else read_data(source)
    check_texts(df, text_col)
    check_labels(df, label_col)
    df, splitter = _split(df.reset_index(drop=True), valid_col, valid_pct, seed)
    dblock = DataBlock(blocks=(HFTextBlock(tokenizer, text_col, max_len, truncate), CategoryBlock),
                       get_y=ColReader(label_col), splitter=splitter)
    return dblock.dataloaders(df, bs=bs, num_workers=0, **kwargs)
