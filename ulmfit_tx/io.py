"Reading text tables and folders, and writing output folders atomically."
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .errors import UlmfitError

__all__ = ["read_table", "read_folder", "read_data", "atomic_dir", "check_out_dir"]

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq", ".tsv", ".tsv.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")  # plain-text corpora


def read_table(path) -> pd.DataFrame:
    "Read a CSV (optionally gzipped), TSV or parquet file into a DataFrame, keeping empty strings as text."
    path = Path(path)
    if not path.exists(): raise UlmfitError(f"{path}: no such file")
    if path.is_dir(): raise UlmfitError(f"{path}: is a folder, expected a CSV or parquet file")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")): df = pd.read_parquet(path)
        elif name.endswith((".tsv", ".tsv.gz")): df = pd.read_csv(path, sep="\t", keep_default_na=False)
        elif name.endswith((".csv", ".csv.gz")): df = pd.read_csv(path, keep_default_na=False)
        else: raise UlmfitError(f"{path}: unknown file type; expected one of {', '.join(TABLE_SUFFIXES)}")
    except UlmfitError: raise
    except pd.errors.EmptyDataError: raise UlmfitError(f"{path}: the file is empty") from None
    except Exception as e: raise UlmfitError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if len(df) == 0: raise UlmfitError(f"{path}: the file has a header but no rows")
    return df


def _read_class_folders(path: Path) -> pd.DataFrame:
    "Rows `text, label` from `path/<label>/*.txt`."
    rows = [(f.read_text(encoding="utf-8", errors="replace"), d.name)
            for d in sorted(p for p in path.iterdir() if p.is_dir())
            for f in sorted(d.glob("*.txt"))]
    return pd.DataFrame(rows, columns=["text", "label"])


def read_folder(path, valid_names=("test", "valid")) -> pd.DataFrame:
    """Read a folder of `.txt` files laid out as IMDb's `train/pos`, `train/neg` (and `test/...`):
    one row per file with columns `text`, `label` (the sub-folder's name) and `is_valid`
    (True under `test/` or `valid/`). A folder of `<label>/` sub-folders alone gives `text, label`."""
    path = Path(path)
    if not path.is_dir(): raise UlmfitError(f"{path}: no such folder")
    if (path / "train").is_dir():
        parts = [_read_class_folders(path / "train").assign(is_valid=False)]
        parts += [_read_class_folders(path / v).assign(is_valid=True) for v in valid_names if (path / v).is_dir()]
        df = pd.concat(parts, ignore_index=True)
    else: df = _read_class_folders(path)
    if len(df) == 0: raise UlmfitError(f"{path}: no .txt files under <label>/ sub-folders (or train/<label>/)")
    return df


def read_data(path) -> pd.DataFrame:
    "A table file, or a folder in the IMDb `train/<label>/*.txt` layout."
    return read_folder(path) if Path(path).is_dir() else read_table(path)


def check_out_dir(out, force: bool = False) -> Path:
    "Refuse an existing output folder unless `force`, before any work starts."
    out = Path(out)
    if out.exists() and not force:
        raise UlmfitError(f"{out}: already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir(): raise UlmfitError(f"{out}: exists and is not a folder")
    return out


@contextmanager
def atomic_dir(out, force: bool = False):
    """Yield a temporary folder beside `out`; when the block succeeds it becomes `out` (replacing an
    existing one only with `force`). On failure it is removed and `out` is left as it was."""
    out = check_out_dir(out, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else: os.replace(tmp, out)
    finally:
        if tmp.exists(): shutil.rmtree(tmp, ignore_errors=True)
