"""Training schedules as stages of `fit_one_cycle`: ULMFiT's gradual unfreezing with discriminative learning rates,
MLM fine-tuning with a head warm-up, and Marge's decoder warm-up; resumable with a `CheckpointCallback`. The `fit_*`
functions are also `Learner` methods (`learn.fit_ulmfit(...)`), fastai style."""

from __future__ import annotations

from dataclasses import dataclass

import fastai.callback.schedule  # noqa: F401 (patches fit_one_cycle onto Learner)
import numpy as np
from fastai.learner import Learner
from fastcore.basics import patch
from fastcore.foundation import L

from .checkpoint import CheckpointCallback, Position
from .errors import UlmfitError

__all__ = [
    "LAYER_DIV",
    "ulmfit_lrs",
    "Stage",
    "ulmfit_stages",
    "fit_stages",
    "fit_ulmfit",
    "mlm_stages",
    "fit_mlm",
    "marge_stages",
    "fit_marge",
]


# Default discriminative factor between consecutive parameter groups. ULMFiT's 2.6 suits AWD-LSTM's 5 groups; a
# transformer has one group per layer (8 for MiniLM-L6), where 2.6 leaves the embeddings at lr/800 and the lower
# layers nearly frozen (docs/findings.md).
LAYER_DIV = 1.2


def ulmfit_lrs(learn: Learner, lr: float, div: float = LAYER_DIV) -> np.ndarray:
    "One learning rate per parameter group: `lr` for the last, divided by `div` for each group below it."
    if div <= 0:
        raise UlmfitError(f"div must be positive (1: the same rate for every group), not {div}")
    if learn.opt is None:
        learn.create_opt()
    n = len(learn.opt.param_lists)
    return lr / div ** np.arange(n - 1, -1, -1)


@dataclass(frozen=True)
class Stage:
    "One `fit_one_cycle` of a schedule: how many groups train (None: all), epochs, rate, discriminative factor."

    depth: int | None  # Parameter groups trained, counted from the top (`freeze_to(-depth)`); None: `unfreeze()`
    epochs: int  # Epochs of this stage's one-cycle schedule
    lr: float  # Learning rate (of the last group when `div` is set)
    div: float | None = None  # Discriminative factor between groups (`ulmfit_lrs`); None: one rate for every group


def ulmfit_stages(
    lr: float = 2e-3, epochs=(1, 1, 1, 2), depths=(1, 2, 3, None), div: float = LAYER_DIV, stage_div: float = 2.0
) -> list[Stage]:
    "ULMFiT's gradual unfreezing as stages: depths from the top, each stage's rate the previous one's / `stage_div`."
    epochs = [epochs] * len(depths) if isinstance(epochs, int) else list(epochs)
    if len(epochs) != len(depths):
        raise UlmfitError(f"{len(epochs)} epoch counts for {len(depths)} stages")
    return [Stage(n, e, lr / stage_div**i, div) for i, (n, e) in enumerate(zip(depths, epochs))]


def fit_stages(learn: Learner, stages: list[Stage], final_cbs=None, **kwargs) -> Learner:
    """Run `stages` one after the other (freeze to the stage's depth, then `fit_one_cycle`; `final_cbs`: callbacks of
    the last stage's fit only, e.g. `KeepBest`). With a `CheckpointCallback` that loaded a checkpoint (`resume=True`),
    the stages already done are skipped and the interrupted one continues from its epoch and step with the saved
    weights, optimizer and random states."""
    ckpt = next((cb for cb in learn.cbs if isinstance(cb, CheckpointCallback)), None)
    start = ckpt.position if ckpt is not None and ckpt.loaded is not None else Position()
    user_cbs = kwargs.pop("cbs", None)
    try:
        for i, st in enumerate(stages):
            if i < start.stage:
                continue
            if st.depth is None:
                learn.unfreeze()
            else:
                learn.freeze_to(-st.depth)
            if ckpt is not None:
                ckpt.stage, ckpt.last_stage = i, i == len(stages) - 1
                if i == start.stage and ckpt.loaded is not None:
                    ckpt.restore(learn)
            lr = st.lr if st.div is None else ulmfit_lrs(learn, st.lr, st.div)
            cbs = user_cbs if i < len(stages) - 1 else L(user_cbs) + L(final_cbs)
            learn.fit_one_cycle(st.epochs, lr, start_epoch=start.epoch if i == start.stage else 0, cbs=cbs, **kwargs)
    finally:
        if ckpt is not None:
            ckpt.release_signals()  # also when a stage raised
    if ckpt is not None and ckpt.loaded is not None:  # the checkpoint was taken after the last stage
        learn.unfreeze() if stages[-1].depth is None else learn.freeze_to(-stages[-1].depth)
        ckpt.restore(learn)
        ckpt.loaded = None
    return learn


def fit_ulmfit(
    learn: Learner,
    lr: float = 2e-3,  # Learning rate of the last group in the first stage
    epochs=(1, 1, 1, 2),  # Epochs of each stage (an int: the same for every stage)
    depths=(1, 2, 3, None),  # Groups trained in each stage, from the top; None: all (`unfreeze`)
    div: float = LAYER_DIV,  # Discriminative factor between consecutive groups (ULMFiT's AWD-LSTM used 2.6)
    stage_div: float = 2.0,  # Each stage's `lr` is the previous one's divided by this
    **kwargs,  # Passed to `fit_one_cycle` (e.g. `moms`, `cbs`)
) -> Learner:
    """ULMFiT's gradual unfreezing: train the last group, then the last two, then three, then all,
    each with `fit_one_cycle` and discriminative learning rates. The same as running, per stage,
    `learn.freeze_to(-n); learn.fit_one_cycle(e, ulmfit_lrs(learn, lr))`. Resumable with a `CheckpointCallback`."""
    return fit_stages(learn, ulmfit_stages(lr, epochs, depths, div, stage_div), **kwargs)


def mlm_stages(
    lr: float = 1e-4, epochs: int = 1, warmup_epochs: int = 1, warmup_lr: float | None = None, div: float | None = None
) -> list[Stage]:
    """MLM fine-tuning as stages: the MLM head with the word embeddings tied to it first, on the frozen encoder layers
    (`warmup_epochs` at `warmup_lr`, default `10 * lr`: fastai's language-model recipe trains a new head before
    unfreezing; 0 skips it), then every layer for `epochs` at `lr`, or with ULMFiT's discriminative rates when `div`
    is set (`lr` for the head and embeddings, each encoder layer below `div` times lower). (docs/findings.md: why the
    warm-up)."""
    if warmup_epochs < 0:
        raise UlmfitError(f"warmup_epochs must be 0 or more, not {warmup_epochs}")
    warm = [Stage(1, warmup_epochs, 10 * lr if warmup_lr is None else warmup_lr)] if warmup_epochs else []
    return warm + [Stage(None, epochs, lr, div)]


def fit_mlm(
    learn: Learner,
    lr: float = 1e-4,  # Learning rate of the stage that trains every layer (its top group with `div`)
    epochs: int = 1,  # Its epochs
    warmup_epochs: int = 1,  # Epochs training the MLM head and embeddings alone first (0: none)
    warmup_lr: float | None = None,  # Their learning rate (default 10 * lr)
    div: float | None = None,  # Discriminative factor between layer groups in that stage (None: one rate)
    **kwargs,  # Passed to `fit_one_cycle`
) -> Learner:
    "`mlm_stages` with `fit_stages` (one `fit_one_cycle` per stage; resumable with a `CheckpointCallback`)."
    return fit_stages(learn, mlm_stages(lr, epochs, warmup_epochs, warmup_lr, div), **kwargs)


def marge_stages(
    lr: float = 3e-3, warmup_epochs: int = 1, epochs: int = 1, div: float = 3.0, encoder_div: float = 10.0
) -> list[Stage]:
    """Marge's schedule: the decoder alone on the frozen encoder (`warmup_epochs` at `lr`), then every layer for
    `epochs`, the decoder at `lr / div` and the encoder `encoder_div` times lower (1: the same rate; suits an encoder
    trained from nothing). Without the warm-up, a new decoder that cannot yet use its evidence sends the retriever
    noise, and its neighbours degrade (docs/marge.md)."""
    return ([Stage(1, warmup_epochs, lr)] if warmup_epochs else []) + [Stage(None, epochs, lr / div, encoder_div)]


def fit_marge(
    learn: Learner,
    lr: float = 3e-3,  # Learning rate of the warm-up
    warmup_epochs: int = 1,  # Epochs training the decoder alone (0: none)
    epochs: int = 1,  # Epochs training everything
    div: float = 3.0,  # The second stage's decoder rate is `lr / div`
    encoder_div: float = 10.0,  # ...and its encoder's rate `encoder_div` times lower still (1 for a fresh encoder)
    **kwargs,  # Passed to `fit_one_cycle`
) -> Learner:
    "`marge_stages` with `fit_stages` (one `fit_one_cycle` per stage; resumable with a `CheckpointCallback`)."
    return fit_stages(learn, marge_stages(lr, warmup_epochs, epochs, div, encoder_div), **kwargs)


for _f in (fit_stages, fit_ulmfit, fit_mlm, fit_marge):
    patch(_f)  # learn.fit_ulmfit(...) as fastai's learn.fit_one_cycle
