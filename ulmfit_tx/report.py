"""Where a fit reports its numbers besides the progress bar: fastai's `CSVLogger`, `TensorBoardCallback` and
`WandbCallback`, made to follow a run of several fits (ULMFiT's stages) as one: one CSV header, TensorBoard steps that
go on from stage to stage, one Weights & Biases run.

    learn.fit_ulmfit(2e-3, cbs=report_callbacks("csv,tensorboard", "runs/clf-logs"))
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger

from .distributed import is_rank0
from .errors import UlmfitError

__all__ = ["REPORTERS", "RunCSVLogger", "report_callbacks", "parse_report_to", "finish_reports"]

REPORTERS = ("csv", "tensorboard", "wandb")
EXTRA = "pip install 'ulmfit_tx[report]'"  # the optional packages of tensorboard and wandb


def parse_report_to(report_to) -> list[str]:
    '`report_to` ("csv,tensorboard", a list, or None / "none") as a list of reporter names, checked.'
    if report_to is None:
        return []
    names = [n.strip() for n in report_to.split(",")] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n and n != "none"]
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise UlmfitError(f"report_to: unknown {', '.join(map(repr, bad))}; choose from {', '.join(REPORTERS)}")
    return list(dict.fromkeys(names))


class RunCSVLogger(CSVLogger):
    """fastai's `CSVLogger` over all the fits of a run: the header once (a file that already has lines is appended to,
    as a resumed run does), and a `fit` column that numbers the fits (ULMFiT's stages)."""

    def __init__(self, fname="history.csv"):
        super().__init__(fname, append=True)
        self.fit_no = -1

    def before_fit(self):
        if hasattr(self, "gather_preds"):
            return
        self.fit_no += 1
        f = self.path / self.fname
        f.parent.mkdir(parents=True, exist_ok=True)
        fresh = not f.exists() or f.stat().st_size == 0
        self.file = f.open("a")
        if fresh:
            self.file.write(",".join(["fit", *self.recorder.metric_names]) + "\n")
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        self.file.write(",".join(str(t) for t in [self.fit_no, *log]) + "\n")
        self.file.flush()
        self.old_logger(log)


def _tensorboard(log_dir: Path) -> Callback:
    try:
        from fastai.callback.tensorboard import TensorBoardCallback
    except ImportError:
        raise UlmfitError(f"--report-to tensorboard needs the tensorboard package: {EXTRA}") from None

    class RunTensorBoard(TensorBoardCallback):
        """fastai's `TensorBoardCallback` whose steps go on from one fit to the next (ULMFiT's stages), logging the
        training batches only (fastai's logs the validation batches' smoothed training loss again at the same step)."""

        offset = 0

        @property
        def train_iter(self) -> int:
            return self.offset + self.learn.train_iter

        def after_batch(self):
            if self.training:
                super().after_batch()

        def after_fit(self):
            super().after_fit()
            self.offset += self.learn.train_iter

    return RunTensorBoard(log_dir=str(log_dir), trace_model=False, log_preds=False)


def _wandb(log_dir: Path, name: str | None, config: dict | None) -> Callback:
    try:
        import wandb
        from fastai.callback.wandb import WandbCallback
    except ImportError:
        raise UlmfitError(f"--report-to wandb needs the wandb package: {EXTRA}") from None
    log_dir.mkdir(parents=True, exist_ok=True)
    if wandb.run is None:  # one W&B run for the whole run (a resumed run continues it: its id is kept here)
        id_file = log_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ulmfit-tx"),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(log_dir),
            config=config or {},
        )

    class RunWandb(WandbCallback):
        """fastai's `WandbCallback` without its logging of the learner's arguments (fastai 2.8's `_format_config` fails
        on every plain value with fastcore 1.8); the W&B config is the run's settings (`wandb.init`)."""

        def before_fit(self):
            self.learn.gather_args = dict  # (an empty config, this fit only)
            try:
                super().before_fit()
            finally:
                del self.learn.gather_args

    return RunWandb(log=None, log_preds=False, log_model=False)


def report_callbacks(
    report_to,  # "csv,tensorboard,wandb" (any of them), a list of them, or None
    folder,  # Where they write: history.csv, tensorboard/, wandb/
    name: str | None = None,  # wandb: the run's name
    config: dict | None = None,  # wandb: the run's settings
) -> list[Callback]:
    """fastai callbacks that report each epoch (and, for TensorBoard and W&B, each batch's loss and learning rates):
    `csv` → `folder/history.csv`, `tensorboard` → `folder/tensorboard/`, `wandb` → a W&B run (`WANDB_MODE=offline`
    writes it under `folder/wandb/`; `WANDB_PROJECT` names the project). Only the process of rank 0 reports."""
    names, folder = parse_report_to(report_to), Path(folder)
    if not is_rank0():
        return []
    cbs = []
    for n in names:
        if n == "csv":
            cbs.append(RunCSVLogger(folder.absolute() / "history.csv"))
        elif n == "tensorboard":
            cbs.append(_tensorboard(folder / "tensorboard"))
        else:
            cbs.append(_wandb(folder, name, config))
    return cbs


def finish_reports(cbs: list, failed: bool = False):
    "End the W&B run of `cbs`, if they have one (its files are complete once this returns)."
    if any(type(cb).__name__ == "RunWandb" for cb in cbs):
        import wandb

        wandb.finish(exit_code=1 if failed else 0)
