"""Training on several processes with torch.distributed, the fastai way (`with learn.distrib_ctx(): ...`)."""
from __future__ import annotations

from fastai.torch_core import rank_distrib

__all__ = ["is_rank0"]


def is_rank0() -> bool:
    "True in a single process, and in the process of rank 0 of a distributed run."
    return rank_distrib() == 0
