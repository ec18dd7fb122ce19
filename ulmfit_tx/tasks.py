"""What a classifier predicts: one class per text (`single_label`), any set of classes (`multi_label`) or a number
(`regression`). Each task's labels as read from a table, its fastai target transforms, loss, metrics and decision
threshold, its prediction table, class weights, and the validation report written to metrics.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.data.transforms import Categorize, MultiCategorize, OneHotEncode, RegressionSetup
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, MSELossFlat
from fastai.metrics import (
    PearsonCorrCoef,
    SpearmanCorrCoef,
    accuracy,
    accuracy_multi,
    mae,
    skm_to_fastai,
)
from sklearn import metrics as skm

from .errors import UlmfitError, binary_values

__all__ = [
    "SINGLE",
    "MULTI",
    "REGRESSION",
    "TASKS",
    "PROBLEM_TYPES",
    "Task",
    "RegressionTarget",
    "task_of",
    "infer_task",
    "label_values",
    "class_weights",
    "choose_threshold",
    "ValidationOutputs",
    "validation_report",
]

SINGLE, MULTI, REGRESSION = "single_label", "multi_label", "regression"
TASKS = (SINGLE, MULTI, REGRESSION)
PROBLEM_TYPES = {SINGLE: "single_label_classification", MULTI: "multi_label_classification", REGRESSION: "regression"}
LOWER_IS_BETTER = ("valid_loss", "rmse", "mae")


def _f1(average: str, multi: bool = False):
    "F1 over the validation set as a fastai metric, named f1_<average>."
    if multi:
        return skm_to_fastai(skm.f1_score, thresh=0.5, flatten=False, average=average, name=f"f1_{average}",
                             zero_division=0)  # fmt: skip
    return skm_to_fastai(skm.f1_score, average=average, name=f"f1_{average}", zero_division=0)


def _named(metric, name: str):
    metric._name = name
    return metric


class RegressionTarget(RegressionSetup):
    "fastai's `RegressionSetup` (float targets, one output) that also knows the target's name (the bundle's label)."

    def __init__(self, name: str = "target"):
        super().__init__(c=1)
        self.target = name


@dataclass
class Task:
    "A classification task: its kind, its class names in output order (regression: the target's name), threshold."

    kind: str = SINGLE  # single_label, multi_label or regression
    classes: list = field(default_factory=list)  # Output names: class names, or [target name] for regression
    threshold: float = 0.5  # multi_label: a class is predicted when its probability is at least this

    def __post_init__(self):
        if self.kind not in TASKS:
            raise UlmfitError(f"task must be one of {', '.join(TASKS)}, not {self.kind!r}")
        if not 0 < self.threshold < 1:
            raise UlmfitError(f"threshold must be between 0 and 1, not {self.threshold}")

    @property
    def n_out(self) -> int:
        return 1 if self.kind == REGRESSION else len(self.classes)

    @property
    def problem_type(self) -> str:
        "Hugging Face's name for it (`config.problem_type`: `pipeline()` picks softmax, sigmoid or none from it)."
        return PROBLEM_TYPES[self.kind]

    def target_tfms(self) -> list:
        "fastai's transforms from a label (class name, list of class names, or number) to the training target."
        if self.kind == SINGLE:
            return [Categorize(vocab=self.classes, sort=False)]
        if self.kind == MULTI:
            return [MultiCategorize(vocab=self.classes), OneHotEncode(len(self.classes))]
        return [RegressionTarget(str(self.classes[0]) if self.classes else "target")]

    def loss_func(self, weights: torch.Tensor | None = None):
        "The loss (fastai's flat losses), with class weights (multi_label: positive-class weights) if given."
        if self.kind == SINGLE:
            return CrossEntropyLossFlat(weight=weights)
        if self.kind == MULTI:
            return BCEWithLogitsLossFlat(pos_weight=weights, thresh=self.threshold)
        if weights is not None:
            raise UlmfitError("class weights are for classification; a regression target has no classes")
        return MSELossFlat()

    def metrics(self, f1: bool = True) -> list:
        "The fastai metrics shown every epoch (and that `--metric` can monitor); single_label without `f1`: accuracy."
        if self.kind == SINGLE:
            return [accuracy, _f1("macro")] if f1 else [accuracy]
        if self.kind == MULTI:
            return [accuracy_multi, _f1("micro", True), _f1("macro", True)]
        rmse = skm_to_fastai(skm.root_mean_squared_error, is_class=False, name="rmse")
        return [rmse, mae, _named(PearsonCorrCoef(), "pearson"), _named(SpearmanCorrCoef(), "spearman")]

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        "Logits (N, n_out) -> probabilities (softmax, sigmoid) or the regression value."
        if self.kind == SINGLE:
            return logits.float().softmax(-1)
        return logits.float().sigmoid() if self.kind == MULTI else logits.float()

    def table(self, out: np.ndarray, delim: str = ";") -> pd.DataFrame:
        """Predictions as a table from activated outputs (N, n_out): `label` and `prob_<class>` (single_label);
        `labels` (the classes at or above the threshold, joined by `delim`) and `prob_<class>` (multi_label);
        `prediction` (regression)."""
        if self.kind == REGRESSION:
            return pd.DataFrame({"prediction": out[:, 0]})
        names = np.array([str(c) for c in self.classes], dtype=object)
        probs = {f"prob_{c}": out[:, i] for i, c in enumerate(self.classes)}
        if self.kind == SINGLE:
            return pd.DataFrame({"label": np.array(list(self.classes), dtype=object)[out.argmax(1)], **probs})
        return pd.DataFrame({"labels": [delim.join(names[row >= self.threshold]) for row in out], **probs})

    def meta(self) -> dict:
        "What a bundle records of the task."
        return {"task": self.kind, "threshold": self.threshold}


def task_of(dls, threshold: float | None = None) -> Task:
    "The task of classification DataLoaders, read from their target transforms (`clas_dataloaders`, `HFTextBlock`)."
    tfms = list(dls.train_ds.tls[-1].tfms) if hasattr(dls.train_ds, "tls") else []
    if any(isinstance(t, OneHotEncode) for t in tfms):
        vocab = next(t.vocab for t in tfms if isinstance(t, MultiCategorize))
        return Task(MULTI, list(vocab), 0.5 if threshold is None else threshold)
    reg = [t for t in tfms if isinstance(t, RegressionSetup)]
    if reg:
        return Task(REGRESSION, [getattr(reg[0], "target", "target")])
    return Task(SINGLE, list(dls.vocab))


def infer_task(task: str | None, label_cols: list, delim: str | None) -> str:
    "The task the label options describe: multi_label for several 0/1 columns or a delimited list, else single_label."
    if task is None:
        return MULTI if len(label_cols) > 1 or delim else SINGLE
    if task not in TASKS:
        raise UlmfitError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if task != MULTI and (len(label_cols) > 1 or delim):
        raise UlmfitError(
            f"several label columns or a label delimiter describe a multi_label task, not {task}; "
            "give one label column (or task='multi_label')"
        )
    return task


def label_values(
    df: pd.DataFrame,  # A chunk of the data, label columns as read (strings)
    task: str,  # single_label, multi_label or regression
    label_cols: list,  # The label column(s) of `df`
    delim: str | None = None,  # multi_label from one column: the separator of its class names
    what: str = "data",  # The data's name, for errors
    classes: list | None = None,  # The allowed classes (a label outside them is refused); None: any
) -> list:
    """Each row's label, checked: a class name (single_label), a list of class names (multi_label: split on `delim`,
    or the names of the 0/1 columns that are 1; an empty list is allowed) or a float (regression)."""
    from .errors import _rows, check_label_values

    if task == MULTI and len(label_cols) > 1:
        hot = np.stack([binary_values(df[c], c, what) for c in label_cols], 1)  # (N, C)
        return [[c for c, h in zip(label_cols, row) if h] for row in hot]
    (col,) = label_cols
    if task == REGRESSION:
        check_label_values(df, col, what)
        y = pd.to_numeric(df[col], errors="coerce")
        bad = y.isna() | ~np.isfinite(y.fillna(0))
        if bad.any():
            raise UlmfitError(
                f"{what}: {int(bad.sum())} row(s) of column {col!r} are not numbers (rows {_rows(df.index[bad])}: "
                f"{', '.join(map(repr, df[col][bad].astype(str).head(3)))}); a regression target must be one"
            )
        return y.astype(float).tolist()
    if task == MULTI:
        listed = df[col].map(lambda v: isinstance(v, (list, tuple, np.ndarray)))
        if delim is None and not listed.all():
            raise UlmfitError(
                "a multi_label task from one column needs the label delimiter (--label-delim), or lists (JSON lines)"
            )
        vals = [
            [str(s).strip() for s in v if str(s).strip()]
            if is_list
            else [s.strip() for s in str(v).split(delim) if s.strip()]
            for v, is_list in zip(df[col], listed)
        ]
    else:
        check_label_values(df, col, what)
        vals = [str(v) for v in df[col]]
    if classes is not None:
        known = {str(c) for c in classes}
        flat = [(i, x) for i, v in zip(df.index, vals) for x in (v if task == MULTI else [v])]
        unknown = [(i, x) for i, x in flat if x not in known]
        if unknown:
            names = sorted({x for _, x in unknown})
            raise UlmfitError(
                f"{what}: unknown class {', '.join(map(repr, names[:5]))} in column {col!r} "
                f"(rows {_rows(i for i, _ in unknown)}); the classes are {', '.join(map(repr, known))}"
            )
    return vals


def class_weights(
    spec,  # "balanced" (scikit-learn's compute_class_weight), a {class: weight} dict, or a JSON/CSV file of them
    task: Task,  # The task whose classes the weights are for
    targets: np.ndarray,  # Training targets: class indices (N,) for single_label, multi-hot (N, C) for multi_label
) -> torch.Tensor:
    """Class weights for the loss: single_label `CrossEntropyLossFlat(weight=)`, multi_label `pos_weight` (balanced:
    negatives over positives of each class)."""
    if task.kind == REGRESSION:
        raise UlmfitError("class weights are for classification; a regression target has no classes")
    n = len(task.classes)
    if isinstance(spec, str) and spec == "balanced":
        if task.kind == MULTI:
            pos = np.asarray(targets, dtype=float).sum(0)
            if (pos == 0).any():
                missing = [str(task.classes[i]) for i in np.flatnonzero(pos == 0)]
                raise UlmfitError(f"balanced class weights: no training row has class {', '.join(missing[:5])}")
            return torch.tensor((len(targets) - pos) / pos, dtype=torch.float32)
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(targets)
        if len(present) < n:
            missing = [str(task.classes[i]) for i in sorted(set(range(n)) - set(present.tolist()))]
            raise UlmfitError(f"balanced class weights: no training row has class {', '.join(missing[:5])}")
        return torch.tensor(compute_class_weight("balanced", classes=np.arange(n), y=targets), dtype=torch.float32)
    table = spec if isinstance(spec, dict) else _read_weights(spec)
    names = [str(c) for c in task.classes]
    odd = sorted(set(map(str, table)) - set(names))
    if odd or set(names) - set(map(str, table)):
        raise UlmfitError(
            f"class weights must give each class a weight: the classes are {', '.join(names)}"
            + (f"; unknown {', '.join(odd[:5])}" if odd else "")
        )
    w = {str(k): v for k, v in table.items()}
    try:
        out = torch.tensor([float(w[c]) for c in names], dtype=torch.float32)
    except (TypeError, ValueError):
        raise UlmfitError("class weights must be numbers") from None
    if not (out > 0).all():
        raise UlmfitError("class weights must be positive")
    return out


def _read_weights(path) -> dict:
    "A {class: weight} table from a JSON object or a two-column CSV (class, weight)."
    p = Path(path)
    if not p.is_file():
        raise UlmfitError(f"{path}: no such file (class weights: 'balanced', or a JSON/CSV file of class, weight)")
    try:
        if p.suffix.lower() == ".json":
            table = json.loads(p.read_text())
            if not isinstance(table, dict):
                raise ValueError("not a JSON object")
            return table
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        if df.shape[1] != 2:
            raise ValueError(f"{df.shape[1]} columns, expected 2 (class, weight)")
        return dict(zip(df.iloc[:, 0], df.iloc[:, 1]))
    except (ValueError, OSError) as e:
        raise UlmfitError(f"{path}: cannot be read as class weights ({e})") from None


def choose_threshold(probs: np.ndarray, targets: np.ndarray) -> float:
    "The multi_label decision threshold (0.05 to 0.95 by 0.05) with the best micro F1 on (N, C) probabilities."
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    f1 = [skm.f1_score(targets, probs >= t, average="micro", zero_division=0) for t in grid]
    return float(grid[int(np.argmax(f1))])


class ValidationOutputs(Callback):
    """Keeps the activated outputs (probabilities, or regression values) and the targets of the learner's latest
    validation, all ranks' rows in a distributed run: the report and the threshold need no second pass."""

    order = 60

    def before_validate(self):
        self._out, self._y = [], []

    def after_batch(self):
        if not self.training and self.yb:
            self._out.append(self.pred.detach().float())
            self._y.append(self.yb[0].detach())

    def after_validate(self):
        out = torch.cat(self._out).cpu() if self._out else torch.zeros(0)
        y = torch.cat(self._y).cpu() if self._y else torch.zeros(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from .distributed import _gather_rows

            out, y = _gather_rows(out), _gather_rows(y)
        act = getattr(self.learn.loss_func, "activation", lambda x: x)
        self.outputs, self.targets = act(out).float().numpy(), y.numpy()
        self._out = self._y = []

    def __getstate__(self):  # (an exported learner does not carry the validation rows' outputs and targets)
        return {k: v for k, v in self.__dict__.items() if k not in ("outputs", "targets", "_out", "_y")}


def validation_report(task: Task, out: np.ndarray, targets: np.ndarray) -> dict:
    """What metrics.json reports of the final weights on the validation rows: per-class precision, recall, F1 and
    support, macro and micro F1, and the confusion counts (single_label: the matrix; multi_label: each class's true
    and false positives and negatives at the threshold); regression: RMSE, MAE, Pearson and Spearman."""
    if task.kind == REGRESSION:
        from scipy import stats

        y, p = np.asarray(targets, float).ravel(), np.asarray(out, float).ravel()
        return {
            "rmse": float(np.sqrt(np.mean((p - y) ** 2))),
            "mae": float(np.mean(np.abs(p - y))),
            "pearson": float(stats.pearsonr(p, y)[0]) if len(y) > 1 and y.std() > 0 and p.std() > 0 else None,
            "spearman": float(stats.spearmanr(p, y)[0]) if len(y) > 1 and y.std() > 0 and p.std() > 0 else None,
        }
    names = [str(c) for c in task.classes]
    if task.kind == SINGLE:
        y, pred = np.asarray(targets).ravel(), out.argmax(1)
        labels = np.arange(len(names))
        conf = skm.confusion_matrix(y, pred, labels=labels)
        extra = {"accuracy": float((y == pred).mean()), "confusion": conf.tolist()}
    else:
        y, pred = np.asarray(targets).astype(int), (out >= task.threshold).astype(int)
        labels = None
        conf = skm.multilabel_confusion_matrix(y, pred)  # (C, 2, 2): [[tn, fp], [fn, tp]]
        extra = {
            "threshold": task.threshold,
            "accuracy_multi": float((y == pred).mean()),
            "exact_match": float((y == pred).all(1).mean()),
            "confusion": {n: dict(zip(("tn", "fp", "fn", "tp"), map(int, c.ravel()))) for n, c in zip(names, conf)},
        }
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        **extra,
        "f1_macro": float(f.mean()),
        "f1_micro": float(skm.f1_score(y, pred, average="micro", labels=labels, zero_division=0)),
        "per_class": {
            n: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
            for n, a, b, c, d in zip(names, p, r, f, s)
        },
    }
