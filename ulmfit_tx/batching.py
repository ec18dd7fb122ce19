"""Batching shared by every data path: padding token ids per batch, length-sorted DataLoaders that read lengths
without running the pipeline, and a seeded random split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from fastai.text.data import SortedDL
from fastcore.basics import ifnone
from fasttransform import Transform

from .tokenize import IDS_COL

__all__ = ["PadTokens", "pad_batch", "cached_lengths", "TokenSortedDL", "random_split"]


class PadTokens(Transform):
    "`before_batch`: pad the ids of each sample to the longest in the batch, on the tokenizer's padding side."

    def __init__(
        self,
        pad_id: int,  # Padding token id
        pad_first: bool = False,  # Pad on the left (tokenizers with `padding_side='left'`)
        multiple_of: int = 1,  # Round the padded length up to a multiple (8 suits tensor cores)
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


def pad_batch(ids: list, pad_id: int, pad_first: bool = False) -> torch.Tensor:
    "Token id sequences as one batch (B, L) of int64, padded as `PadTokens` pads them."
    return torch.stack(
        [x for (x,) in PadTokens(pad_id, pad_first).encodes([(torch.as_tensor(o).long(),) for o in ids])]
    )


def cached_lengths(dataset) -> list[int] | None:
    """Token counts of the items of `dataset` read from ids already computed (or a token store), or None if there are
    none."""
    if hasattr(dataset, "item_lengths"):
        return dataset.item_lengths  # a view of a token store (mlm.py)
    tl = getattr(dataset, "tls", [dataset])[0]
    items = getattr(tl, "items", None)
    # a transform that knows its items' lengths without running them (`data.StoreText` reads a token store's offsets)
    store_tfm = [t for t in getattr(getattr(tl, "tfms", None), "fs", []) if callable(getattr(t, "lengths", None))]
    if store_tfm and items is not None:
        return store_tfm[0].lengths(list(items)).tolist()
    if isinstance(items, pd.DataFrame):
        return items[IDS_COL].map(len).tolist() if IDS_COL in items else None
    if items is not None and len(items) and isinstance(items[0], np.ndarray):
        return [len(o) for o in items]
    return None


class TokenSortedDL(SortedDL):
    """fastai's `SortedDL` (validation sorted by length, training in shuffled chunks of similar length)
    taking the lengths from the cached ids instead of running the pipeline on every item."""

    def __init__(self, dataset, res=None, **kwargs):
        super().__init__(dataset, res=ifnone(res, cached_lengths(dataset)), **kwargs)


def random_split(n: int, valid_pct: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    "Sorted training and validation indices of `n` items, `int(valid_pct * n)` (at least 1) held out at random."
    perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)  # 4 bytes a document for corpora of millions
    np.random.default_rng(seed).shuffle(perm)
    cut = max(1, int(valid_pct * n))
    return np.sort(perm[cut:]), np.sort(perm[:cut])
