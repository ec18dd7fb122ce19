"""A training run as API: an output folder written atomically by rank 0 when the run finishes, a checkpoint beside
it (`OUT.checkpoint`) to resume an interrupted run, the fit in one process or under torchrun, the validation values
of the final weights and the run's statistics. The `ulmfit-tx` verbs are built on it; in Python:

    run = Run("runs/clf", resume=True)
    learn = classifier_learner(dls, "my-encoder", cbs=run.cbs)
    accuracy = run.fit(learn, ulmfit_stages())[-1]
    run.save_classifier(learn, {"accuracy": accuracy, **run.stats(learn, 5 * len(dls.train_ds))})
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

from fastai.learner import Learner
from fastai.torch_core import num_distrib, set_seed

from . import plots
from .checkpoint import CKPT, CheckpointCallback, KeepBest
from .distributed import is_rank0, rank0_only
from .errors import UlmfitError
from .export import write_bundle
from .files import AGAIN, DiskFull, atomic_dir, check_out_dir, disk_full
from .precision import precision_of
from .report import finish_reports, parse_report_to, report_callbacks
from .schedule import Stage, fit_stages

__all__ = ["Run", "checkpoint_folder", "write_json"]


def checkpoint_folder(out) -> Path:
    "Where the run writing `out` keeps its checkpoint: `OUT.checkpoint` beside it."
    return Path(str(out).rstrip("/") + ".checkpoint")


def write_json(path, obj) -> Path:
    "`obj` as indented JSON in `path` (numpy and torch scalars as floats)."
    Path(path).write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return Path(path)


class Run:
    "One training run that writes the folder `out`: resumable, atomically written, rank-0 safe under torchrun."

    def __init__(
        self,
        out,  # The output folder, written when the run finishes
        force: bool = False,  # Replace an existing `out`, and start over an interrupted run's checkpoint
        resume: bool = False,  # Continue the interrupted run from its checkpoint (`checkpoint_folder`)
        checkpoint_steps: int | None = None,  # Checkpoint every N training steps too (default: every epoch)
        keep_checkpoints: bool = False,  # Keep the checkpoint folder when the run finishes
        settings: dict | None = None,  # The run's settings: resuming with other settings is refused
        seed: int | None = 42,  # `set_seed(seed, reproducible=True)` once the run is set up; None: no seeding
        report_to=None,  # "csv,tensorboard,wandb" (any): fastai's loggers, kept in OUT/logs (`report_callbacks`)
    ):
        report_to = parse_report_to(report_to)  # (checked before anything is written)
        self.out, self.force, self.keep = check_out_dir(out, force), force, keep_checkpoints
        folder = checkpoint_folder(out)
        if not resume and (folder / CKPT).exists():
            if not force:
                raise UlmfitError(
                    f"{folder}: an interrupted run's checkpoint is there; pass --resume to continue it, "
                    "--force to start again without it, or delete it"
                )
            shutil.rmtree(folder)
        self.checkpoint = CheckpointCallback(
            folder, checkpoint_steps, settings or {}, resume=resume, defer_last=not keep_checkpoints
        )
        self.logs = folder / "logs"  # written while the run goes on (a resumed run appends), then kept in OUT/logs
        if not resume and is_rank0():
            shutil.rmtree(self.logs, ignore_errors=True)
        self.reports = report_callbacks(report_to, self.logs, Path(out).name, settings)
        self.history = plots.LossHistory()
        if seed is not None:
            set_seed(seed, reproducible=True)

    @property
    def cbs(self) -> list:
        """The callbacks the run's learner needs: `LossHistory` (losses and timings), the `CheckpointCallback` and the
        reporters of `report_to`."""
        return [self.history, self.checkpoint, *self.reports]

    def fit(self, learn: Learner, stages: list[Stage], keep_best: KeepBest | None = None) -> list:
        """`fit_stages` in one process, or under a distributed launcher (torchrun) on every process with fastai's
        `distrib_ctx` (data sharded by batches, metrics over all ranks' rows); with `keep_best`, the final stage ends
        on its best epoch's weights. Returns the validation values of the final weights (loss, then the metrics in the
        order of `learn.metrics`): the last (or best) epoch's, or a `validate`'s when no epoch ran (a resumed run
        whose checkpoint was taken after the last stage)."""
        with learn.distrib_ctx() if num_distrib() > 1 else nullcontext():
            fit_stages(learn, stages, final_cbs=keep_best)
            values = getattr(learn.recorder, "values", None)  # (set by the fit's first epoch)
            if keep_best is not None and keep_best.values is not None:
                values = [[None, *keep_best.values]]
            return list(values[-1][1:]) if values else learn.validate()

    def stats(self, learn: Learner, samples: int) -> dict:
        "Seconds spent training and validating, the training throughput over `samples` and the precision used."
        h = self.history
        return dict(
            train_time_s=h.train_seconds,
            valid_time_s=h.valid_seconds,
            train_samples_per_s=samples / h.train_seconds if h.train_seconds else None,
            precision=precision_of(learn),
        )

    def say(self, msg: str):
        "Print on the process of rank 0 only (the only one in a single-process run)."
        if is_rank0():
            print(msg)

    @contextmanager
    def outputs(self):
        """Around writing the run's outputs: yields a temporary folder that becomes `out` when the block succeeds (on
        rank 0; other ranks get None and write nothing). If writing fails, the checkpoint of the trained weights is
        written, so a resumed run writes the outputs without training again; if it succeeds, the checkpoint folder
        is removed unless `keep_checkpoints`."""
        try:
            with rank0_only() as main, atomic_dir(self.out, self.force) if main else nullcontext() as tmp:
                yield tmp
                if tmp is not None:
                    self._keep_logs(tmp)
        except DiskFull as e:
            finish_reports(self.reports, failed=True)
            raise disk_full(e.path, f"nothing was written; {self._save_for_resume()}", e.free) from None
        except BaseException:
            finish_reports(self.reports, failed=True)
            self.checkpoint.save_deferred()
            raise
        if not self.keep:
            self.checkpoint.remove()

    def _save_for_resume(self) -> str:
        """After the outputs did not fit: write the trained weights' checkpoint if it fits, and say how to resume."""
        try:
            self.checkpoint.save_deferred()
            then = "to write the outputs from it"
        except DiskFull:  # no room for the last epoch's checkpoint either: the one before it stays
            then = "to continue from it"
        if (self.checkpoint.folder / CKPT).exists():
            return (
                f"the checkpoint in {self.checkpoint.folder} is intact: free some space and rerun with --resume {then}"
            )
        return AGAIN

    def _keep_logs(self, tmp: Path):
        "The reporters' files (the W&B run ended first) copied into the output folder as `logs/`."
        finish_reports(self.reports)
        if self.reports and self.logs.is_dir():
            shutil.copytree(self.logs, tmp / "logs", symlinks=True)

    def save_pretrained(self, learn: Learner, metrics: dict, extra: dict | None = None) -> Path:
        """`out` as a model folder: `learn.write_pretrained` (weights and tokenizer), metrics.json and loss.png;
        `extra` maps subfolder names to other models of the learner written there too."""
        with self.outputs() as tmp:
            if tmp is not None:
                self._write_pretrained(learn, metrics, tmp, extra)
        return self.out

    def _write_pretrained(self, learn, metrics, tmp, extra):
        learn.write_pretrained(tmp)
        for name, model in (extra or {}).items():
            learn.write_pretrained(tmp / name, model)
        write_json(tmp / "metrics.json", metrics)
        plots.plot_losses(self.history, tmp / "loss.png")

    def save_classifier(self, learn: Learner, metrics: dict, hf: bool = False) -> Path:
        """`out` as a classifier: the bundle `predict` and `load_classifier` read, export.pkl for fastai's
        `load_learner`, metrics.json, loss.png, confusion_matrix.png (single-label: from `metrics["report"]`, see
        `learn.validation_report`, or a `ConfusionCounts` callback on `learn`), the model card, and with `hf` a
        Hugging Face folder `hf/`."""
        with self.outputs() as tmp:
            if tmp is not None:
                self._write_classifier(learn, metrics, tmp, hf)
        return self.out

    def _write_classifier(self, learn, metrics, tmp, hf):
        path, opt, dls = learn.path, learn.opt, learn.dls
        learn.path = tmp
        try:
            with learn.removed_cbs(
                self.reports
            ):  # (loggers hold files and runs: not part of the learner a user loads)
                learn.export("export.pkl")
        finally:  # (fastai's export takes the optimizer and data away while it writes, and leaves them so if it fails)
            learn.path, learn.opt, learn.dls = path, opt, dls
        write_bundle(learn.model, learn.tokenizer, learn.task, tmp, metrics)
        write_json(tmp / "metrics.json", metrics)
        plots.plot_losses(self.history, tmp / "loss.png")
        confusion = metrics.get("report", {}).get("confusion")
        counts = [cb.counts for cb in learn.cbs if isinstance(cb, plots.ConfusionCounts)]
        if isinstance(confusion, list) or counts:  # single-label: the matrix
            cm = confusion if isinstance(confusion, list) else counts[0]
            plots.plot_confusion_matrix(cm, learn.task.classes, tmp / "confusion_matrix.png")
        if hf:
            learn.write_pretrained(tmp / "hf")
