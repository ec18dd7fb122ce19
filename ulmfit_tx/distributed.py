"""Training on several processes with torch.distributed, the fastai way: `with learn.distrib_ctx(): ...` under
`torchrun`. What fastai 2.8 gets wrong for us is fixed here: `ShardedDL` (a `DistributedDL`) broadcasts the
epoch's indices on the CPU too (gloo) and deals whole batches to the ranks, so length-sorted batches stay
homogeneous and every rank steps the same number of times; `ShardedTrainer` (in place of `DistributedTrainer`,
whose accelerate path leaves the model unwrapped on CPU) wraps the model with unused parameters allowed (frozen
groups, memory writers) and sums the validation metrics over the ranks; `rank0_only` is where outputs are written."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL
from fastai.torch_core import num_distrib, rank_distrib, to_detach
from fastcore.basics import noop
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "is_rank0",
    "barrier",
    "rank0_only",
    "rank0_first",
    "init_distributed",
    "ShardedDL",
    "ShardedTrainer",
    "sync_metric",
    "unwrap",
]


def is_rank0() -> bool:
    "True in a single process, and in the process of rank 0 of a distributed run."
    return rank_distrib() == 0


def barrier():
    "Wait for every process (a no-op in a single process)."
    if num_distrib() > 1 and dist.is_initialized():
        dist.barrier()


@contextmanager
def rank0_only():
    """Yield True on rank 0, where fastai then sees a single process (no gathering), False elsewhere; every rank
    waits for the others before and after. For what only one process may do: writing outputs, plots, exports."""
    barrier()
    saved = os.environ.get("WORLD_SIZE")
    try:
        if is_rank0() and saved is not None:
            os.environ["WORLD_SIZE"] = "1"
        yield is_rank0()
    finally:
        if saved is not None:
            os.environ["WORLD_SIZE"] = saved
        barrier()


@contextmanager
def rank0_first():
    "Rank 0 runs the block first (e.g. builds a cached token store), then the other ranks (which then find it)."
    if not is_rank0():
        barrier()
    try:
        yield
    finally:
        if is_rank0():
            barrier()


def init_distributed() -> bool:
    """Join the process group a launcher (`torchrun`, `accelerate launch`) describes in the environment: nccl on
    CUDA, gloo on the CPU. True when this is a run of several processes."""
    if num_distrib() <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


class ShardedDL(DistributedDL):
    """fastai's `DistributedDL`, sharded by whole batches: rank 0's epoch order (a length-sorted order for `SortedDL`)
    is broadcast (on the CPU with gloo), cut into the wrapped DataLoader's batches, and batch i goes to rank
    i mod world size. Training batches are padded with repeats so all ranks step together; validation batches are
    not padded (no duplicate rows in the metrics). Batches are not gathered: `ShardedTrainer` syncs the metrics."""

    def _broadcast(self, t, rank):
        t = torch.as_tensor(t, dtype=torch.long)
        cuda = dist.get_backend() == "nccl"
        if cuda:
            t = t.cuda()
        dist.broadcast(t, rank)
        return t.cpu().tolist()

    def _batches(self, n: int) -> int:
        "How many of `n` batches this rank gets."
        w = self.world_size
        return -(-n // w) if self.dl.drop_last or self.dl.shuffle else len(range(self.rank, n, w))

    def __len__(self):
        return self._batches(len(self.dl))

    def get_idxs(self):
        idxs = self._broadcast(list(self.dl.get_idxs()), 0)  # rank 0's order (every rank computes one)
        bs = self.dl.bs
        batches = [idxs[i : i + bs] for i in range(0, len(idxs), bs)]
        if self.dl.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if self.dl.drop_last or self.dl.shuffle:  # training: every rank the same number of steps
            batches += batches[: self._batches(len(batches)) * self.world_size - len(batches)]
        mine = batches[self.rank :: self.world_size]
        self.n = sum(map(len, mine))
        return [i for b in mine for i in b]

    def to_detach(self, b, cpu=True, gather=True):
        return to_detach(b, cpu, gather=False)


def sync_metric(met):
    """Make a fastai metric hold what all ranks accumulated: sums (`total`/`count` of `AvgLoss`/`AvgMetric`, or the
    attributes a metric names in `sum_attrs`) are all-reduced, `AccumMetric`'s predictions and targets gathered."""
    names = getattr(met, "sum_attrs", ("total", "count") if hasattr(met, "count") and hasattr(met, "total") else ())
    if names:
        vals = torch.tensor([float(getattr(met, n)) for n in names], dtype=torch.float64)
        dist.all_reduce(vals)
        for n, v in zip(names, vals.tolist()):
            setattr(met, n, v)
    elif hasattr(met, "preds") and hasattr(met, "targs"):
        for name in ("preds", "targs"):
            local = torch.cat(getattr(met, name)) if getattr(met, name) else torch.zeros(0)
            setattr(met, name, [_gather_rows(local)])


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    "All ranks' rows of `x` (their counts may differ), concatenated in rank order."
    n = torch.tensor([len(x)])
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    m = int(max(counts))
    padded = torch.zeros((m, *x.shape[1:]), dtype=x.dtype)
    padded[: len(x)] = x
    out = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(c)] for o, c in zip(out, counts)])


def unwrap(model: nn.Module) -> nn.Module:
    "The model inside DistributedDataParallel (or the model itself)."
    return getattr(model, "module", model)


class ShardedTrainer(Callback):
    """What fastai's `DistributedTrainer` does, for CPU (gloo) and CUDA (nccl) alike: the model in
    `DistributedDataParallel` for each fit (unused parameters allowed: frozen groups, memory writers; buffers not
    broadcast per step: ours never change, and BatchNorm statistics are made equal before validating), the
    DataLoaders sharded (`ShardedDL`; a memory encoder's `SegmentDL` is split by rows, so a document stays on one
    rank and is read in order), BatchNorm synced on GPUs, and validation metrics summed over the ranks."""

    order = 11

    def __init__(self, sync_bn: bool = True):  # Replace BatchNorm by SyncBatchNorm (GPUs only)
        self.sync_bn = sync_bn and torch.cuda.is_available()

    def before_fit(self):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if self.sync_bn else self.model
        cuda = next(model.parameters()).is_cuda
        self.learn.model = DistributedDataParallel(
            model,
            device_ids=[torch.cuda.current_device()] if cuda else None,
            find_unused_parameters=True,
            broadcast_buffers=False,
        )
        self.old_dls = list(self.dls)
        self.learn.dls.loaders = [self._wrap_dl(dl) for dl in self.dls]
        if rank_distrib():
            self.learn.logger = noop

    def _wrap_dl(self, dl):
        if isinstance(dl, DistributedDL) or getattr(dl, "sharded", False):
            return dl
        if hasattr(dl, "shard"):
            return dl.shard(rank_distrib(), num_distrib())
        return ShardedDL(dl, device=dl.device)

    def _same_buffers(self):
        "Rank 0's buffers (BatchNorm statistics) on every rank, so all ranks validate and keep the same model."
        for b in self.learn.model.buffers():
            dist.broadcast(b.data, 0)

    def before_train(self):
        self.learn.dl = self._wrap_dl(self.learn.dl)

    def before_validate(self):
        self._same_buffers()
        self.learn.dl = self._wrap_dl(self.learn.dl)

    def after_validate(self):
        for met in self.recorder._valid_mets:
            sync_metric(met)

    def after_fit(self):
        self._same_buffers()
        self.learn.model, self.learn.dls.loaders = unwrap(self.learn.model), self.old_dls
