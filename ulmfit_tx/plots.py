"Training plots saved as PNG: loss curves over several fits, confusion matrix, learning-rate finder."
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.callback.schedule import minimum, steep, valley  # noqa: E402
from fastai.interpret import ClassificationInterpretation  # noqa: E402

__all__ = ["LossHistory", "plot_losses", "plot_confusion", "plot_lr_find"]


class LossHistory(Callback):
    """Keeps training and validation losses, and each epoch's metrics, across several `fit` calls (fastai's
    Recorder keeps only the last). `learn.validate()` runs as a fit without training: it is not recorded."""
    order = 60  # after Recorder

    def __init__(self): self.train, self.valid, self.epochs, self.stages, self.trained = [], [], [], [], False

    def before_fit(self): self.trained = False  # until this fit's first training batch

    def checkpoint_state(self) -> dict: return {k: getattr(self, k) for k in ("train", "valid", "epochs", "stages")}
    def restore_state(self, state: dict): self.__dict__.update({k: list(v) for k, v in state.items()})

    def after_batch(self):
        if not self.training: return
        if not self.trained: self.stages.append(len(self.train)); self.trained = True
        self.train.append(self.loss.item())

    def after_epoch(self):
        if not self.trained: return
        values = self.recorder.values[-1]
        self.valid.append((len(self.train), values[1]))
        names = [n for n in self.recorder.metric_names if n not in ("epoch", "time")]
        self.epochs.append({n: float(v) for n, v in zip(names, values)})


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_losses(history: LossHistory, path) -> Path:
    "Training loss per batch and validation loss per epoch, with a line where each fit (stage) starts."
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.train, label="train", alpha=0.8)
    if history.valid: ax.plot(*zip(*history.valid), "o-", label="valid")
    for s in history.stages[1:]: ax.axvline(s, color="grey", ls=":", lw=1)
    ax.set(xlabel="batches", ylabel="loss", title="loss (dotted: start of each stage)")
    ax.legend()
    return _save(fig, path)


def plot_confusion(learn, path) -> Path:
    "The confusion matrix of `learn` on its validation set."
    ClassificationInterpretation.from_learner(learn).plot_confusion_matrix()
    return _save(plt.gcf(), path)


def plot_lr_find(learn, path, suggest_funcs=None):
    "Run `lr_find`, save its plot, return the suggestions as a dict."
    funcs = suggest_funcs or (valley, steep, minimum)
    res = learn.lr_find(suggest_funcs=funcs, show_plot=True)
    _save(plt.gcf(), path)
    return {f.__name__: float(v) for f, v in zip(funcs, np.atleast_1d(res))}
