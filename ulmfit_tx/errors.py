"The error users see for bad input, and the checks that raise it."

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "UlmfitError",
    "check_columns",
    "check_texts",
    "check_label_values",
    "check_labels",
    "check_classes",
    "valid_mask",
    "binary_values",
    "check_max_len",
    "check_positive",
]


class UlmfitError(ValueError):
    """Bad input named in one line: the CLI prints it without a traceback. Its text stays that line when raised in a
    fastai callback (fastai rewrites `args` with the event's name)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.line = str(args[0]) if args else ""

    def __str__(self) -> str:
        return self.line


def _rows(idx, n_show: int = 5) -> str:
    "A short list of row labels, e.g. `3, 17, 40 and 12 more`."
    idx = list(idx)
    shown = ", ".join(map(str, idx[:n_show]))
    return shown + (f" and {len(idx) - n_show} more" if len(idx) > n_show else "")


def check_columns(df: pd.DataFrame, cols, what: str = "data"):
    "Raise if any of `cols` is missing from `df`, naming the columns it has."
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UlmfitError(
            f"{what}: missing column {', '.join(map(repr, missing))}; "
            f"the columns are {', '.join(map(repr, map(str, df.columns)))}"
        )


def check_texts(df: pd.DataFrame, text_col: str, what: str = "data", shown: str | None = None):
    "Raise if `df` has no rows, or if any `text_col` value is not a string or is blank (named `shown` if given)."
    check_columns(df, [text_col], what)
    if len(df) == 0:
        raise UlmfitError(f"{what}: no rows")
    col, shown = df[text_col], shown or text_col
    not_str = col.map(lambda o: not isinstance(o, str))
    if not_str.any():
        raise UlmfitError(
            f"{what}: {int(not_str.sum())} row(s) of column {shown!r} are not text (rows {_rows(df.index[not_str])})"
        )
    blank = col.str.strip().eq("")
    if blank.any():
        raise UlmfitError(
            f"{what}: {int(blank.sum())} row(s) of column {shown!r} are empty (rows {_rows(df.index[blank])})"
        )


def check_label_values(df: pd.DataFrame, label_col: str, what: str = "data", shown: str | None = None):
    "Raise if any row has no label (missing, NaN or blank); the column is named `shown` if given."
    check_columns(df, [label_col], what)
    na = df[label_col].isna() | df[label_col].astype(str).str.strip().isin(["", "nan", "NaN", "None", "<NA>"])
    if na.any():
        raise UlmfitError(
            f"{what}: {int(na.sum())} row(s) have no label in column {shown or label_col!r} "
            f"(rows {_rows(df.index[na])})"
        )


def check_labels(df: pd.DataFrame, label_col: str, what: str = "data"):
    "Raise if labels are missing or there is only one class."
    check_label_values(df, label_col, what)
    check_classes(df[label_col].unique(), label_col, what)


def check_classes(classes, label_col: str = "label", what: str = "data"):
    "Raise if there are fewer than two classes."
    if len(classes) < 2:
        raise UlmfitError(
            f"{what}: column {label_col!r} has a single class ({list(classes)[0]!r}); a classifier needs at least two"
        )


_TRUE, _FALSE = {"true", "1", "1.0", "yes"}, {"false", "0", "0.0", "no"}


def binary_values(col: pd.Series, name: str, what: str = "data", true=(), false=()) -> np.ndarray:
    "A column of True/False (1/0, yes/no; also the words in `true`, `false`) as booleans, or an error naming odd rows."
    if col.dtype == bool:
        return col.to_numpy()
    s = col.astype(str).str.strip().str.lower()
    yes, no = _TRUE | set(true), _FALSE | set(false)
    odd = ~s.isin(yes | no)
    if odd.any():
        raise UlmfitError(
            f"{what}: column {name!r} must hold True/False or 1/0, found "
            f"{sorted(col[odd].astype(str).unique())[:5]} (rows {_rows(col.index[odd])})"
        )
    return s.isin(yes).to_numpy()


def valid_mask(df: pd.DataFrame, valid_col: str) -> pd.Series:
    "The `valid_col` column as booleans (True/False, 1/0, yes/no, valid/train; empty is False), or an error."
    return pd.Series(binary_values(df[valid_col], valid_col, true=("valid",), false=("train", "")), index=df.index)


def check_positive(**values):
    "Raise for the first of `name=value` that is not a positive number (None is allowed: a default applies)."
    for name, v in values.items():
        if v is not None and not v > 0:
            raise UlmfitError(f"{name.replace('_', '-')} must be positive, not {v}")


def check_max_len(max_len: int, limit: int, model: str = "the model"):
    "Raise if `max_len` exceeds the positions `model` has."
    if max_len > limit:
        raise UlmfitError(f"max_len {max_len} is larger than {model} supports ({limit} positions)")
    if max_len < 8:
        raise UlmfitError(f"max_len {max_len} is too small (at least 8)")
