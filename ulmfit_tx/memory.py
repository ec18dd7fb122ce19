"""fastai pieces for the memory encoders (memxl, compressive): a DataLoader that feeds consecutive
chunks of the same documents to the same batch rows, and the Callback that carries, resets and
charges the memories during training."""

from __future__ import annotations

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.data.core import TfmdDL
from fastai.text.data import TensorText
from fastai.torch_core import TensorBase, to_detach

from .batching import cached_lengths

__all__ = ["DocStarts", "SegmentDL", "MemoryCallback"]


class DocStarts(TensorBase):
    "Per item: whether it starts a new document (shown as nothing in `show_batch`)."

    def show(self, ctx=None, **kwargs):
        return ctx


class SegmentDL(TfmdDL):
    """fastai's `LMDataLoader` idea for memory encoders: every batch row reads one document at a time,
    `chunk_len` tokens per batch, in order, so the memory a row carries belongs to its document. Items
    are `(ids (chunk_len,), starts_document)`; a document's last chunk is padded, and a row with no
    document left reads padding. Rows are balanced once (seeded); each epoch reshuffles the order of
    the documents inside every row when `shuffle` is set."""

    has_resets = True  # `MemoryCallback` takes the `starts_document` flags out of the inputs

    def __init__(
        self,
        dataset,  # `Datasets` whose items are `(token ids,)` of whole documents
        chunk_len: int = 256,  # Tokens per row per batch (a multiple of the model's segment_len)
        pad_id: int = 0,  # Padding id
        bs: int = 16,  # Rows (at most the number of documents)
        seed: int = 0,  # Seed of the assignment of documents to rows
        rows: list | None = None,  # The documents of each row (default: balanced here); given by `shard`
        steps: int | None = None,  # Batches per epoch (default: the longest row's chunks)
        **kwargs,  # Passed to `TfmdDL`
    ):
        lens = cached_lengths(dataset)  # read from the ids computed once, not by running the pipeline per item
        if lens is None:
            lens = [len(dataset[i][0]) for i in range(len(dataset))]
        self.chunk_len, self.pad_id, self.seed = chunk_len, pad_id, seed
        self.chunks = [-(-int(n) // chunk_len) for n in lens]  # chunks of each document
        if rows is None:
            bs = max(1, min(bs, len(lens)))
            order = np.random.default_rng(seed).permutation(len(lens))
            rows, loads = [[] for _ in range(bs)], np.zeros(bs, dtype=int)
            for d in sorted(order, key=lambda d: -self.chunks[d]):  # longest first onto the lightest row
                r = int(loads.argmin())
                rows[r].append(int(d))
                loads[r] += self.chunks[d]
        self.rows, bs = [list(r) for r in rows], len(rows)
        self.steps = (
            steps if steps is not None else max((sum(self.chunks[d] for d in r) for r in self.rows), default=0)
        )
        super().__init__(dataset, bs=bs, n=self.steps * bs, **kwargs)
        self.plan()

    @property
    def n_inp(self) -> int:
        return self.dataset.n_inp + 1  # the flags are an input, taken out by `MemoryCallback`

    def plan(self):
        "The (document, chunk) each row reads at each step."
        self.schedule = [[(d, j) for d in row for j in range(self.chunks[d])] for row in self.rows]

    def shuffle_fn(self, idxs):
        for row in self.rows:
            self.rng.shuffle(row)
        self.plan()
        return idxs  # the order of the items is the reading order: never shuffled

    def new(self, dataset=None, cls=None, **kwargs):
        kwargs = {"chunk_len": self.chunk_len, "pad_id": self.pad_id, "seed": self.seed, **kwargs}
        return super().new(dataset=dataset, cls=cls, **kwargs)

    def shard(self, rank: int, world: int) -> "SegmentDL":
        """This DataLoader's part for process `rank` of `world`: rows rank, rank + world, ... (a document stays on one
        rank, read in order), with as many steps as the whole (the ranks step together)."""
        if len(self.rows) < world:
            raise ValueError(f"{len(self.rows)} batch rows cannot be shared by {world} processes: raise --bs")
        dl = self.new(rows=self.rows[rank::world], steps=self.steps, bs=len(self.rows[rank::world]))
        dl.sharded = True
        dl.to_detach = lambda b, cpu=True, gather=True: to_detach(
            b, cpu, gather=False
        )  # `ShardedTrainer` syncs metrics
        return dl

    def create_item(self, s):
        step, row = divmod(s or 0, self.bs)  # fastai asks for item None to learn the types
        if step >= self.steps:
            raise IndexError
        plan = self.schedule[row]
        out = torch.full((self.chunk_len,), self.pad_id, dtype=torch.long)
        if step >= len(plan):
            return (TensorText(out), DocStarts(torch.tensor(True)))
        d, j = plan[step]
        ids = self.dataset[d][0]
        piece = torch.as_tensor(ids[j * self.chunk_len : (j + 1) * self.chunk_len])
        out[: len(piece)] = piece
        return (TensorText(out), DocStarts(torch.tensor(j == 0)))


class MemoryCallback(Callback):
    """Resets memories at the start of training, validation and fit, and for batch rows that start a new document
    (flags from `SegmentDL`; every batch when the data have no flags); the memories are carried, detached, by the
    model between batches. Adds the model's auxiliary loss (Compressive Transformer) to the training loss."""

    order = -5  # before the mixed-precision callbacks, which read the loss

    @property
    def _model(self):
        return getattr(self.learn.model, "module", self.learn.model)  # inside DistributedDataParallel

    def _reset(self):
        if hasattr(self._model, "reset"):
            self._model.reset()

    def before_fit(self):
        self._reset()

    def before_train(self):
        self._reset()

    def before_validate(self):
        self._reset()

    def after_fit(self):
        self._reset()

    def before_batch(self):
        if not getattr(self.dl, "has_resets", False):
            return self._reset()  # unrelated batches: start afresh
        *xb, starts = self.learn.xb
        self.learn.xb = tuple(xb)
        if hasattr(self._model, "reset"):
            self._model.reset(starts.bool())

    def after_loss(self):
        aux = getattr(self._model, "aux_loss", None)
        if self.training and aux is not None:
            self.learn.loss_grad = self.learn.loss_grad + aux
