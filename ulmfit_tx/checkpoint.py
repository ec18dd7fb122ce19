"""Checkpoints and resume: a Callback that writes, atomically, the weights, the optimizer state, the ULMFiT stage,
epoch and step, the random states and the data order (the states the epoch's shuffle started from), every epoch
or every N steps, and on SIGTERM or SIGINT. With it, `fit_stages` (and so `fit_ulmfit`) continues an interrupted
run from the same stage and schedule position, on the same batches, as if it had never stopped."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastcore.foundation import L

from .errors import UlmfitError
from .files import AGAIN, DiskFull, atomic_file, disk_full

__all__ = ["Position", "CheckpointCallback", "Interrupted", "KeepBest", "rng_states", "set_rng_states"]

CKPT, STATE = "checkpoint.pt", "state.json"


class Interrupted(KeyboardInterrupt):
    "SIGTERM or SIGINT arrived: a checkpoint was written and training stopped."


@dataclass(frozen=True)
class Position:
    "Where a run stands: ULMFiT stage, epoch within the stage, training step within the epoch."

    stage: int = 0
    epoch: int = 0
    step: int = 0


def rng_states(dl=None) -> dict:
    "The random states training reads: torch (CPU and CUDA), numpy's and Python's global ones, and `dl`'s own."
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "dl": dl.rng.getstate() if dl is not None and hasattr(dl, "rng") else None,
    }


def set_rng_states(s: dict, dl=None):
    "Put back what `rng_states` returned."
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate(s["python"])
    if dl is not None and s["dl"] is not None:
        dl.rng.setstate(s["dl"])


class _SkipBatches:
    """The training DataLoader of a resumed epoch: the same batches (same shuffle), the first `n` drawn but not
    returned, then `after_skip` (the random states of the checkpoint) before the next is made. Its length is the
    whole epoch's, so fastai's schedule position (`pct_train`) stays as in the interrupted run."""

    def __init__(self, dl, n: int, after_skip):
        self.dl, self.n, self.after_skip = dl, n, after_skip

    def __len__(self):
        return len(self.dl)

    def __getattr__(self, name):
        return getattr(self.dl, name)

    def __iter__(self):
        it = iter(self.dl)
        for _ in range(self.n):
            next(it)
        self.after_skip()
        yield from it


def _to_plain(o):
    """Optimizer and callback states with numpy scalars and arrays made plain, so `torch.load(weights_only=True)` reads
    them."""
    if isinstance(o, dict):
        return {k: _to_plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_to_plain(v) for v in o)
    if isinstance(o, L):
        return [_to_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return torch.from_numpy(o)
    if isinstance(o, np.generic):
        return o.item()
    return o


class CheckpointCallback(Callback):
    """Writes `folder/checkpoint.pt` (torch.save of tensors and plain values, read back with `weights_only=True`) and
    `folder/state.json` after every epoch, every `every_steps` training steps, and when SIGTERM/SIGINT arrive (then
    raises `Interrupted`). With `resume=True` it loads the folder's checkpoint, checked against `settings`, and
    `fit_stages` continues from it. Callbacks with `checkpoint_state()`/`restore_state(s)` (e.g. `LossHistory`) are
    saved and restored with it. Only the process of rank 0 writes. With `defer_last`, the checkpoint of the run's
    last epoch is held until `save_deferred()` (the CLI calls it only when writing its outputs fails): a run that
    finishes does not need it, and writing the weights and optimizer state takes a second (MiniLM: 270 MB)."""

    order = 100  # after the step, the scheduler and the recorder

    def __init__(
        self,
        folder,  # Where the checkpoint lives (e.g. the output folder + ".checkpoint")
        every_steps: int | None = None,  # Also write every this many training steps (None: every epoch only)
        settings: dict | None = None,  # What the run was started with: a checkpoint of other settings is refused
        resume: bool = False,  # Load the folder's checkpoint to continue from it
        defer_last: bool = False,  # Hold the last epoch's checkpoint (of the last stage) until `save_deferred()`
    ):
        if every_steps is not None and every_steps < 1:
            raise UlmfitError(f"checkpoint steps must be positive, not {every_steps}")
        self.folder, self.every_steps, self.settings, self.defer_last = (
            Path(folder),
            every_steps,
            settings or {},
            defer_last,
        )
        self.stage, self.last_stage, self.deferred = (
            0,
            True,
            None,
        )  # `fit_stages` sets the stage and whether it is the last
        self.handlers, self.interrupt = {}, None  # signal handlers replaced while fitting; a signal seen
        self.loaded = self._load() if resume else None
        self.position = Position(**self.loaded["position"]) if self.loaded else Position()

    def _load(self) -> dict:
        path = self.folder / CKPT
        if not path.exists():
            raise UlmfitError(f"{self.folder}: no checkpoint to resume from (run without --resume)")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UlmfitError(
                f"{path}: unreadable checkpoint, perhaps truncated ({type(e).__name__}); delete it to start again"
            ) from None
        diff = sorted(
            k for k in set(ck["settings"]) | set(self.settings) if ck["settings"].get(k) != self.settings.get(k)
        )
        if diff:
            shown = ", ".join(f"{k}: {ck['settings'].get(k)!r} then, {self.settings.get(k)!r} now" for k in diff[:4])
            raise UlmfitError(
                f"{path}: the checkpoint is of a run with other settings ({shown}); "
                "resume with the same settings, or delete it to start again"
            )
        return ck

    def restore(self, learn):
        "Load the checkpoint's weights, optimizer state and callback states into `learn` (its optimizer exists)."
        ck = self.loaded
        learn.model.load_state_dict(ck["model"])
        if learn.opt is None:
            learn.create_opt()
        learn.opt.load_state_dict({"state": ck["opt"]["state"], "hypers": L(ck["opt"]["hypers"])})
        for cb in learn.cbs:
            if hasattr(cb, "restore_state") and type(cb).__name__ in ck["callbacks"]:
                cb.restore_state(ck["callbacks"][type(cb).__name__])

    # --- events ---------------------------------------------------------------------------------------------------
    def before_fit(self):
        self.trained = False  # `learn.validate()` runs the fit events too: nothing to save then
        if not self.handlers and self._main_thread():  # kept across the stages of `fit_stages`
            self.interrupt = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.handlers[sig] = signal.signal(sig, lambda s, f: setattr(self, "interrupt", s))

    def before_train(self):
        if self.interrupt is not None:  # came during a validation or between stages: the epoch's checkpoint is written
            raise Interrupted(f"signal {self.interrupt}: checkpoint written to {self.folder}")
        self.step, self.trained = 0, True
        pos = self.position
        resuming = self.loaded is not None and (self.stage, self.epoch) == (pos.stage, pos.epoch)
        if resuming:
            set_rng_states(self.loaded["start_rng"], self.dl)
        self.start_rng = rng_states(self.dl)  # the data order of this epoch
        if resuming and pos.step:
            self.step = pos.step
            self.learn.train_iter += pos.step
            self.learn.pct_train += pos.step / (len(self.dl) * self.n_epoch)
            rng, train_dl = self.loaded["rng"], self.dls.train
            self.learn.dl = _SkipBatches(self.dl, pos.step, lambda: set_rng_states(rng, train_dl))
        elif resuming:
            set_rng_states(self.loaded["rng"], self.dl)
        if resuming:
            self.loaded = None  # the rest of the run goes on from here

    def after_batch(self):
        if not self.training:
            return
        self.step += 1
        if self.interrupt is not None:
            self.save(Position(self.stage, self.epoch, self.step))
            raise Interrupted(f"signal {self.interrupt}: checkpoint written to {self.folder}")
        if self.every_steps and self.step % self.every_steps == 0 and self.step < len(self.dl):
            self.save(Position(self.stage, self.epoch, self.step))

    def after_epoch(self):
        if not self.trained:
            return
        done = self.epoch + 1 == self.n_epoch
        if done and self.last_stage and self.defer_last:
            self.deferred = Position(self.stage + 1, 0, 0)
        else:
            self.save(
                Position(self.stage + 1, 0, 0) if done else Position(self.stage, self.epoch + 1, 0), epoch_end=True
            )

    def after_fit(self):
        if self.last_stage:
            self.release_signals()  # between stages a signal must still be caught (and checkpointed)

    def release_signals(self):
        "Give SIGTERM and SIGINT back to the handlers they had before the fit (`fit_stages` calls it when it ends)."
        for sig, h in self.handlers.items():
            signal.signal(sig, h)
        self.handlers = {}

    # --- writing --------------------------------------------------------------------------------------------------
    def _main_thread(self) -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()

    def save(self, pos: Position, epoch_end: bool = False):
        "Write the checkpoint for `pos` atomically (rank 0 only; the other ranks hold the same weights)."
        from .distributed import is_rank0

        if not is_rank0():
            return
        now = rng_states(self.dls.train)
        model = getattr(self.learn.model, "module", self.learn.model)  # inside DistributedDataParallel
        ck = {
            "position": pos.__dict__,
            "settings": self.settings,
            "model": model.state_dict(),
            "opt": _to_plain(self.learn.opt.state_dict()),
            "rng": now,
            "start_rng": now if epoch_end else self.start_rng,
            "callbacks": {
                type(cb).__name__: _to_plain(cb.checkpoint_state())
                for cb in self.learn.cbs
                if hasattr(cb, "checkpoint_state")
            },
        }
        had = (self.folder / CKPT).exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.folder / CKPT) as tmp, open(tmp, "wb") as f:
                torch.save(ck, f)  # (through a Python file, a full disk raises ENOSPC rather than a zip writer error)
            with atomic_file(self.folder / STATE) as tmp:
                tmp.write_text(json.dumps({"position": pos.__dict__}) + "\n")
        except DiskFull as e:
            if not had:  # (an empty folder; one with logs stays)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
            hint = "the previous checkpoint is intact: free some space and rerun with --resume to continue from it"
            raise disk_full(e.path, hint if had else f"no checkpoint was written: {AGAIN}", e.free) from None

    def save_deferred(self):
        "Write the checkpoint that `defer_last` held back (the run's trained weights), if there is one."
        if self.deferred is not None:
            self.save(self.deferred, epoch_end=True)
        self.deferred = None

    def remove(self):
        "Delete the checkpoint folder (a finished run's, unless the user keeps it)."
        from .distributed import is_rank0

        if is_rank0():
            shutil.rmtree(self.folder, ignore_errors=True)


class KeepBest(SaveModelCallback):
    """fastai's `SaveModelCallback` with the best weights kept in memory (a CPU copy) instead of a file in the
    learner's folder: after the fit the model holds the weights of its best epoch by `monitor`; `values` are that
    epoch's validation loss and metrics, `best_epoch` its index."""

    def __init__(
        self,
        monitor: str = "valid_loss",  # The validation value to watch (`learn.recorder.metric_names`)
        comp=None,  # np.less or np.greater (default: np.less for losses and errors, else np.greater)
    ):
        super().__init__(monitor=monitor, comp=comp)
        self.state = self.values = self.best_epoch = None
        self.restored = False  # whether the fit ended on an earlier epoch's weights than its last

    def before_fit(self):
        self.state = self.values = self.best_epoch = None
        self.restored = False
        super().before_fit()

    def after_epoch(self):
        if self.run:  # (not inside lr_find or get_preds)
            super().after_epoch()

    def _save(self, name):
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.learn.model.state_dict().items()}
        self.values, self.best_epoch = list(self.recorder.values[-1][1:]), self.epoch

    def after_fit(self, **kwargs):
        if self.state is not None:
            self.learn.model.load_state_dict(self.state)
            self.restored = self.best_epoch != self.epoch
        self.state = None
