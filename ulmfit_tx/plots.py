"""Training records and plots saved as PNG: loss curves over several fits, the confusion matrix (counted while the
fit validates, so no extra pass over the data), the learning-rate finder."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.callback.schedule import minimum, steep, valley  # noqa: E402

__all__ = ["LossHistory", "ConfusionCounts", "plot_losses", "plot_confusion_matrix", "plot_confusion", "plot_lr_find"]


class LossHistory(Callback):
    """Keeps training and validation losses, and each epoch's metrics, across several `fit` calls (fastai's
    Recorder keeps only the last), and the seconds spent training and validating. `learn.validate()` runs as a fit
    without training: its losses are not recorded."""

    order = 60  # after Recorder

    def __init__(self):
        self.train, self.valid, self.epochs, self.stages, self.trained = [], [], [], [], False
        self.train_seconds = self.valid_seconds = 0.0

    def before_fit(self):
        self.trained = False  # until this fit's first training batch

    def checkpoint_state(self) -> dict:
        return {k: getattr(self, k) for k in ("train", "valid", "epochs", "stages")}

    def restore_state(self, state: dict):
        self.__dict__.update({k: list(v) for k, v in state.items()})

    def before_train(self):
        self._t0 = time.perf_counter()

    def after_train(self):
        self.train_seconds += time.perf_counter() - self._t0

    def before_validate(self):
        self._t0 = time.perf_counter()

    def after_validate(self):
        self.valid_seconds += time.perf_counter() - self._t0

    def after_batch(self):
        if not self.training:
            return
        if not self.trained:
            self.stages.append(len(self.train))
            self.trained = True
        self.train.append(self.loss.item())

    def after_epoch(self):
        if not self.trained:
            return
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
    if history.valid:
        ax.plot(*zip(*history.valid), "o-", label="valid")
    for s in history.stages[1:]:
        ax.axvline(s, color="grey", ls=":", lw=1)
    ax.set(xlabel="batches", ylabel="loss", title="loss (dotted: start of each stage)")
    ax.legend()
    return _save(fig, path)


class ConfusionCounts(Callback):
    """Counts (true class, predicted class) pairs while the learner validates: after a fit, `counts` is the confusion
    matrix of its last validation, summed over the processes of a distributed run."""

    order = 60

    def __init__(self):
        self.counts = None

    def before_validate(self):
        n = len(self.dls.vocab)
        self.counts = torch.zeros(n, n, dtype=torch.long, device=next(self.learn.model.parameters()).device)

    def after_batch(self):
        if self.training or not self.yb:
            return  # (no targets: predictions of unlabelled texts)
        n = len(self.counts)
        pairs = self.yb[0].view(-1) * n + self.pred.argmax(-1).view(
            -1
        )  # counted where the model runs: no sync a batch
        self.counts += torch.bincount(pairs, minlength=n * n).view(n, n)

    def after_validate(self):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts)
        self.counts = self.counts.cpu()


def plot_confusion_matrix(counts, vocab, path, title: str = "Confusion matrix") -> Path:
    "Plot a confusion matrix (rows: actual, columns: predicted), as fastai's `ClassificationInterpretation` draws it."
    cm = np.asarray(counts)
    fig = plt.figure()
    plt.imshow(cm, interpolation="nearest", cmap="Blues")
    plt.title(title)
    ticks = np.arange(len(vocab))
    plt.xticks(ticks, list(vocab), rotation=90)
    plt.yticks(ticks, list(vocab), rotation=0)
    for i, j in np.ndindex(cm.shape):
        plt.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    plt.ylabel("Actual")
    plt.xlabel("Predicted")
    plt.grid(False)
    return _save(fig, path)


def plot_confusion(learn, path) -> Path:
    "The confusion matrix of `learn` on its validation set: one prediction pass (`ConfusionCounts` avoids even that)."
    counts = ConfusionCounts()
    learn.validate(cbs=counts)
    return plot_confusion_matrix(counts.counts, learn.dls.vocab, path)


def plot_lr_find(learn, path, suggest_funcs=None):
    "Run `lr_find`, save its plot, return the suggestions as a dict."
    funcs = suggest_funcs or (valley, steep, minimum)
    res = learn.lr_find(suggest_funcs=funcs, show_plot=True)
    _save(plt.gcf(), path)
    return {f.__name__: float(v) for f, v in zip(funcs, np.atleast_1d(res))}
