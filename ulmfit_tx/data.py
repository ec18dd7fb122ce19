"""Classification data: documents read from a token store (or a `TransformBlock` over `HFTokenizer` for a
DataBlock), length-sorted batches with dynamic padding."""

from __future__ import annotations

import numpy as np
import torch
from fastai.data.block import TransformBlock
from fastai.data.core import DataLoaders, Datasets
from fastai.text.data import TensorText
from fasttransform import Transform

from .batching import PadTokens, TokenSortedDL, random_split
from .errors import UlmfitError, check_classes
from .io import text_columns
from .store import TokenStore, as_store
from .tasks import MULTI, SINGLE, Task
from .tokenize import HFTokenizer

__all__ = ["StoreText", "StoreLabel", "HFTextBlock", "store_splits", "store_task", "clas_dataloaders"]


class StoreText(Transform):
    """Item: the index of a document in a token store -> its model input (`TensorText`, truncated with special
    tokens as `tfm` does). Texts and ids (`predict`, `test_dl`) pass through to `HFTokenizer`. The store is
    not pickled: an exported learner reads texts."""

    def __init__(
        self,
        store: TokenStore,  # The token store
        tfm: HFTokenizer,  # The tokenizer transform that made it (gives max_len, truncation, special tokens)
    ):
        super().__init__()
        self.store, self.tfm = store, tfm

    def encodes(self, i: int | np.integer):
        return TensorText(
            torch.as_tensor(self.tfm.wrap(self.store.doc(i), first=self.store.first(i)), dtype=torch.long)
        )

    def lengths(self, idx) -> np.ndarray:
        "Model input lengths of the documents `idx`, from the store's offsets."
        return np.minimum(self.store.lengths(np.asarray(idx, dtype=np.int64)) + self.tfm.n_special, self.tfm.max_len)

    def __getstate__(self):
        return {**self.__dict__, "store": None}


class StoreLabel(Transform):
    """Item: the index of a document in a token store -> its label as fastai's target transforms take it: a class name
    (`Categorize`), a list of class names (`MultiCategorize`) or a number (`RegressionSetup`). Not pickled with the
    store."""

    def __init__(self, store: TokenStore):
        super().__init__()
        self.store, self.task = store, store.task

    def encodes(self, i: int | np.integer):
        y = self.store.labels[i]
        if self.task == SINGLE:
            return self.store.classes[y]
        if self.task == MULTI:
            return [self.store.classes[j] for j in np.flatnonzero(y)]
        return float(y)

    def __getstate__(self):
        return {**self.__dict__, "store": None}


def store_task(store: TokenStore) -> Task:
    "The task of a store's labels (regression: named for its label column), or an error when it has none."
    if store.task is None:
        raise UlmfitError(
            f"{store.path}: the token store has no labels; build it again with them: "
            "ulmfit-tx tokenize --label-col COLUMN (or pass the data file itself)"
        )
    if store.task == SINGLE:
        check_classes(store.classes, store.meta["source"].get("label_col") or "label", store.meta["source"]["name"])
    return Task(store.task, store.classes or [store.meta["source"].get("label_col") or "target"])


def HFTextBlock(
    tokenizer,  # A fast tokenizer, or a model folder / hub name
    text_col: str | list = "text",  # DataFrame column with the texts; two: the columns of pairs of texts
    max_len: int | None = None,  # Longest sequence, special tokens included
    truncate: str = "head",  # "head" or "head+tail" (keep the start and the end of long texts)
    head_frac: float = 0.25,  # With "head+tail": the share of tokens kept from the start
    multiple_of: int = 1,  # Pad batches to a multiple of this length
    chunks: int = 1,  # Chunk-and-pool: up to this many chunks of `max_len` tokens a text (1: one sequence)
) -> TransformBlock:
    "A `TransformBlock` for texts in a DataFrame: tokenized once when the DataLoaders are built, padded per batch."
    cols = text_columns(text_col)
    tfm = HFTokenizer(
        tokenizer, max_len, truncate, head_frac, cols if len(cols) == 2 else cols[0], chunks, len(cols) == 2
    )
    return TransformBlock(
        type_tfms=tfm,
        dl_type=TokenSortedDL,
        dls_kwargs={"before_batch": PadTokens(tfm.pad_id, tfm.pad_first, multiple_of)},
    )


def store_splits(store: TokenStore, valid_col: str | None = "is_valid", valid_pct: float = 0.2, seed: int = 42):
    """Training and validation document indices: by the store's validation flags when it has them (and
    `valid_col` is not None), else a seeded random split (a `valid_col` other than the default must exist)."""
    if valid_col is not None and store.is_valid is not None:
        v = np.asarray(store.is_valid)
        if v.all() or not v.any():
            raise UlmfitError(f"column {valid_col!r} leaves no {'training' if v.all() else 'validation'} rows")
        return np.flatnonzero(~v).tolist(), np.flatnonzero(v).tolist()
    if valid_col not in (None, "is_valid"):
        raise UlmfitError(f"{store.meta['source']['name']}: missing column {valid_col!r} (validation flags)")
    return tuple(i.tolist() for i in random_split(len(store), valid_pct, seed))


def clas_dataloaders(
    source,  # DataFrame, CSV/parquet file, folder in the IMDb train/<label>/*.txt layout, token store, or a Hugging
    # Face `datasets.Dataset` / `IterableDataset` / `DatasetDict` (its train and validation splits)
    tokenizer,  # A fast tokenizer, or a model folder / hub name
    text_col: str
    | list = "text",  # Column with the texts; two columns: pairs of texts, encoded as the tokenizer's pair
    label_col: str | list = "label",  # Column with the labels; several: 0/1 columns of a multi_label task
    valid_col: str | None = "is_valid",  # Boolean column marking validation rows; random split if the data has none
    valid_pct: float = 0.2,  # Validation share of a random split
    seed: int = 42,  # Seed of a random split
    max_len: int | None = None,  # Longest sequence, special tokens included
    truncate: str = "head",  # "head" or "head+tail"
    chunks: int = 1,  # Chunk-and-pool: up to this many chunks of `max_len` tokens a text (1: one sequence)
    task: str | None = None,  # single_label, multi_label or regression (default: multi_label for several label
    # columns or a `label_delim`, else single_label)
    label_delim: str | None = None,  # multi_label from one column: the separator of its class names (e.g. ";")
    classes: list | None = None,  # The classes in output order; a label outside them is refused (default: as found)
    bs: int = 32,  # Batch size
    cache=None,  # Token store cache for a file source (None: the default cache; False: none)
    **kwargs,  # Passed to `Datasets.dataloaders` (e.g. `device`)
) -> DataLoaders:
    """Classification `DataLoaders` over a token store: the texts are tokenized once (into the cache for a
    file, reused on the next run), items are document indices, batches are length-sorted and padded to their
    longest text. The targets follow the task: class ids, multi-hot vectors or numbers."""
    tfm = HFTokenizer(tokenizer, max_len, truncate, chunks=chunks, pair=len(text_columns(text_col)) == 2)
    opts = dict(task=task, label_delim=label_delim, classes=classes) if task or label_delim or classes else {}
    store = as_store(source, tfm, cache, text_col=text_col, label_col=label_col, valid_col=valid_col, **opts)
    store.check_pair(tfm)
    dsets = Datasets(
        range(len(store)),
        tfms=[[StoreText(store, tfm), tfm], [StoreLabel(store), *store_task(store).target_tfms()]],
        splits=store_splits(store, valid_col, valid_pct, seed),
    )
    return dsets.dataloaders(
        bs=bs, num_workers=0, dl_type=TokenSortedDL, before_batch=PadTokens(tfm.pad_id, tfm.pad_first), **kwargs
    )
