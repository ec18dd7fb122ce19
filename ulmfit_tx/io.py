"""Reading text tables, folders and plain-text corpora (whole, or streamed in chunks for the token store),
and where a model comes from (a local folder or a hub name)."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from .errors import UlmfitError, check_columns

__all__ = [
    "read_table",
    "read_folder",
    "read_data",
    "iter_corpus",
    "read_corpus",
    "mark_unknown",
    "iter_chunks",
    "is_hf_dataset",
    "dataset_chunks",
    "label_columns",
    "text_columns",
    "has_column",
    "model_source",
]

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq", ".tsv", ".tsv.gz", ".jsonl", ".jsonl.gz")
JSONL = (".jsonl", ".jsonl.gz")  # one JSON object a line; a list value is a multi-label row's classes
TEXT_SUFFIXES = (".txt", ".txt.gz")  # plain-text corpora


def read_table(path) -> pd.DataFrame:
    "Read a CSV (optionally gzipped), TSV, parquet or JSON-lines file into a DataFrame, keeping empty strings as text."
    path = Path(path)
    if not path.exists():
        raise UlmfitError(f"{path}: no such file")
    if path.is_dir():
        raise UlmfitError(f"{path}: is a folder, expected a CSV, parquet or JSON-lines file")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        elif name.endswith(JSONL):
            df = pd.read_json(path, lines=True, dtype=False)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            df = _fields_checked(pd.read_csv(path, sep=_sep(name), keep_default_na=False), path)
        else:
            raise UlmfitError(f"{path}: unknown file type; expected one of {', '.join(TABLE_SUFFIXES)}")
    except UlmfitError:
        raise
    except pd.errors.EmptyDataError:
        raise UlmfitError(f"{path}: the file is empty") from None
    except Exception as e:
        raise UlmfitError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if len(df) == 0:
        raise UlmfitError(f"{path}: the file has a header but no rows")
    return df


def _class_files(path: Path, valid_names=("test", "valid")) -> list[tuple[Path, str, bool]]:
    "(file, label, is_valid) of every `.txt` of a folder in the IMDb layout (or of `<label>/` sub-folders), sorted."

    def under(root, valid):
        return [
            (f, d.name, valid)
            for d in sorted(p for p in root.iterdir() if p.is_dir())
            for f in sorted(d.glob("*.txt"))
        ]

    if not (path / "train").is_dir():
        return under(path, False)
    return under(path / "train", False) + [
        x for v in valid_names if (path / v).is_dir() for x in under(path / v, True)
    ]


def read_folder(path, valid_names=("test", "valid")) -> pd.DataFrame:
    """Read a folder of `.txt` files laid out as IMDb's `train/pos`, `train/neg` (and `test/...`):
    one row per file with columns `text`, `label` (the sub-folder's name) and `is_valid`
    (True under `test/` or `valid/`). A folder of `<label>/` sub-folders alone gives `text, label`."""
    path = Path(path)
    if not path.is_dir():
        raise UlmfitError(f"{path}: no such folder")
    files = _class_files(path, valid_names)
    if not files:
        raise UlmfitError(f"{path}: no .txt files under <label>/ sub-folders (or train/<label>/)")
    df = pd.DataFrame(
        {
            "text": [f.read_text(encoding="utf-8", errors="replace") for f, _, _ in files],
            "label": [lab for _, lab, _ in files],
            "is_valid": [v for _, _, v in files],
        }
    )
    return df if (path / "train").is_dir() else df.drop(columns="is_valid")


def _is_class_folder(p: Path) -> bool:
    "IMDb's layout (`train/<label>/`), or `<label>/*.txt` sub-folders with no text files beside them."
    if (p / "train").is_dir():
        return True
    return not any(p.glob("*.txt*")) and any(d.is_dir() and any(d.glob("*.txt")) for d in p.iterdir())


def read_data(path) -> pd.DataFrame:
    "A table file, or a folder in the IMDb `train/<label>/*.txt` layout."
    return read_folder(path) if Path(path).is_dir() else read_table(path)


_HEADING = re.compile(r"^ ?= [^=].* = ?$")  # a WikiText article title: " = Title = "
DOCS = ("lines", "files", "articles")  # what a document of a plain-text corpus is


def _text_lines(path: Path) -> Iterator[str]:
    "The lines of a UTF-8 text file (gzipped or not), read one at a time."
    try:
        with (
            gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")
        ) as f:
            yield from f
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UlmfitError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}: {e})") from None


def _file_docs(path: Path, docs: str) -> Iterator[str]:
    "The documents of one text file: non-empty lines, the whole file, or WikiText articles (' = Title = ' lines)."
    doc = []
    for line in _text_lines(path):
        line = line.strip()
        if docs == "lines":
            if line:
                yield line
            continue
        if docs == "articles" and _HEADING.match(line) and doc:
            yield " ".join(doc)
            doc = []
        if line:
            doc.append(line)
    if doc:
        yield " ".join(doc)


def _corpus_files(p: Path) -> list[Path]:
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise UlmfitError(f"{p}: no .txt or .txt.gz files in the folder")
    return files


def iter_corpus(
    path,  # A .txt/.txt.gz file, a folder of them, or a CSV/parquet file with `text_col`
    docs: str = "lines",  # "lines": each non-empty line is a document; "files": each file; "articles": WikiText titles
    text_col: str | list = "text",  # Column of a CSV/parquet corpus (two: both texts of each pair are documents)
) -> Iterator[str]:
    "The non-blank documents of a corpus, streamed (a table is read in chunks, a text file line by line)."
    if docs not in DOCS:
        raise UlmfitError(f"docs must be lines, files or articles, not {docs!r}")
    p = Path(path)
    if not p.exists():
        raise UlmfitError(f"{path}: no such file or folder")
    if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES):
        for chunk in iter_chunks(p, text_col):
            texts = chunk.text if "text_pair" not in chunk else pd.concat([chunk.text, chunk.text_pair]).sort_index()
            yield from (t for t in texts.astype(str) if t.strip())
    else:
        for f in _corpus_files(p):
            yield from _file_docs(f, docs)


def read_corpus(path, docs: str = "lines", text_col: str | list = "text") -> list[str]:
    "The documents of a corpus (see `iter_corpus`) as a list, checked to hold some text."
    out = list(iter_corpus(path, docs, text_col))
    if not out:
        raise UlmfitError(f"{path}: the corpus has no text")
    return out


def mark_unknown(docs, unk: str):
    """WikiText writes unknown words as `<unk>`: write them as the tokenizer's own unknown token `unk` (lazily for an
    iterator)."""
    if docs is None or unk == "<unk>":
        return docs
    if isinstance(docs, list):
        return [d.replace("<unk>", unk) for d in docs]
    return (d.replace("<unk>", unk) for d in docs)


def _table_columns(path: Path) -> list[str]:
    """The column names of a table file (its header and first row are read); duplicate names and a first row with more
    fields are refused."""
    name = path.name.lower()
    if not name.endswith(TABLE_SUFFIXES):
        raise UlmfitError(f"{path}: unknown file type; expected one of {', '.join(TABLE_SUFFIXES)}")
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            cols = pd.Index(pq.ParquetFile(path).schema_arrow.names)
        elif name.endswith(JSONL):
            cols = next(pd.read_json(path, lines=True, dtype=False, chunksize=1)).columns
        else:
            cols = _fields_checked(
                pd.read_csv(path, sep=_sep(name), nrows=1, dtype=str, keep_default_na=False), path
            ).columns
    except UlmfitError:
        raise
    except pd.errors.EmptyDataError:
        raise UlmfitError(f"{path}: the file is empty") from None
    except Exception as e:
        raise UlmfitError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    exact = name.endswith((".parquet", ".pq", *JSONL))  # (pandas renames a CSV's duplicate x to x.1)
    dup = cols[cols.duplicated()] if exact else cols[cols.str.contains(r"\.\d+$")]
    dup = [c for c in dup if exact or c.rsplit(".", 1)[0] in cols]
    if len(dup):
        raise UlmfitError(f"{path}: duplicate column names ({', '.join(map(str, dup))})")
    return list(cols)


def _sep(name: str) -> str:
    return "\t" if name.endswith((".tsv", ".tsv.gz")) else ","


def _fields_checked(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """`df` as read from CSV/TSV `path`, refused if its first row had more fields than the header: pandas then makes
    the extra leading fields an index (or drops them) without a word. Usually a text with an unquoted separator in
    it."""
    if isinstance(df.index, pd.RangeIndex):
        return df
    sep = "tab" if _sep(path.name.lower()) == "\t" else "comma"
    raise UlmfitError(
        f"{path}: the first row has more fields than the header's {len(df.columns)} column(s); "
        f'a text with a {sep} in it must be quoted ("...")'
    )


def _table_chunks(path: Path, cols: list[str], rows: int) -> Iterator[pd.DataFrame]:
    """`cols` of a table file, `rows` at a time: CSV/TSV as strings with pandas' chunked reader, parquet by record
    batch, JSON lines with pandas' chunked reader (values as strings, a missing one empty, lists kept)."""
    name = path.name.lower()
    try:
        if name.endswith(JSONL):
            start = 0
            for df in pd.read_json(path, lines=True, dtype=False, chunksize=rows):
                df = df.reindex(columns=cols).map(_json_value)
                df.index = range(start, start + len(df))
                start += len(df)
                yield df
        elif name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            start = 0
            for batch in pq.ParquetFile(path).iter_batches(rows, columns=cols):
                df = batch.to_pandas()
                df.index += start
                start += len(df)
                yield df
        else:
            yield from pd.read_csv(
                path, sep=_sep(name), usecols=cols, dtype=str, keep_default_na=False, chunksize=rows
            )
    except UlmfitError:
        raise
    except Exception as e:
        raise UlmfitError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _json_value(v):
    "A JSON-lines value as the CSV reader gives it: a string ('' when missing), or a list (multi-label classes)."
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def _folder_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    "`text, label, is_valid` rows of an IMDb-layout folder, `rows` files at a time."
    files = _class_files(path)
    if not files:
        raise UlmfitError(f"{path}: no .txt files under <label>/ sub-folders (or train/<label>/)")
    for i in range(0, len(files), rows):
        part = files[i : i + rows]
        yield pd.DataFrame(
            {
                "text": [f.read_text(encoding="utf-8", errors="replace") for f, _, _ in part],
                "label": [lab for _, lab, _ in part],
                "is_valid": [v for _, _, v in part],
            },
            index=range(i, i + len(part)),
        )


def iter_chunks(
    path,  # A table file, an IMDb-layout folder, or a .txt/.txt.gz corpus (file or folder)
    text_col: str | list = "text",  # Column with the texts; two: the columns of pairs of texts
    label_col: str | list | None = None,  # Column(s) with the labels (read as strings), or None
    valid_col: str | None = None,  # Boolean column marking validation rows, read if the data has it
    docs: str = "lines",  # For a plain-text corpus: what a document is (see `iter_corpus`)
    rows: int = 20_000,  # Rows per chunk
    check: bool = True,  # Raise if `text_col` or `label_col` is missing
    unk: str | None = None,  # For a plain-text corpus: write WikiText's `<unk>` as this token
) -> Iterator[pd.DataFrame]:
    """The data of `path` as DataFrames of at most `rows` rows with columns `text` (and `text_pair` for pairs, `label`,
    or `label:<col>` for several label columns, and `is_valid` when read), indexed by row number: the file is never
    read whole. A folder in the IMDb layout gives `text, label, is_valid` (True under test/ or valid/); a plain-text
    corpus gives `text`."""
    p = Path(path)
    if not p.exists():
        raise UlmfitError(f"{path}: no such file or folder")
    if p.is_dir() and _is_class_folder(p):
        yield from _folder_chunks(p, rows)
        return
    if p.is_dir() or p.name.lower().endswith(TEXT_SUFFIXES):
        batch, start = [], 0
        for d in mark_unknown((d for f in _corpus_files(p) for d in _file_docs(f, docs)), unk or "<unk>"):
            batch.append(d)
            if len(batch) == rows:
                yield pd.DataFrame({"text": batch}, index=range(start, start + rows))
                start += rows
                batch = []
        if batch:
            yield pd.DataFrame({"text": batch}, index=range(start, start + len(batch)))
        return
    have = _table_columns(p)
    tcols, lcols = text_columns(text_col), label_columns(label_col)
    cols = tcols + lcols
    if any(c not in have for c in cols):
        if not check:
            return
        raise UlmfitError(
            f"{path}: missing column {', '.join(repr(c) for c in cols if c not in have)}; "
            f"the columns are {', '.join(map(repr, have))}"
        )
    if valid_col in have:
        cols.append(valid_col)
    names = {
        **dict(zip(tcols, ["text", "text_pair"])),
        **dict(zip(lcols, ["label"] if len(lcols) == 1 else [f"label:{c}" for c in lcols])),
    }
    names[valid_col] = "is_valid"
    for chunk in _table_chunks(p, cols, rows):
        yield chunk[cols].rename(columns=names)


def is_hf_dataset(source) -> bool:
    "Whether `source` is a Hugging Face `datasets` object: `Dataset`, `IterableDataset`, or a dict of splits of them."
    return type(source).__module__.split(".")[0] == "datasets"


VALID_SPLITS = ("validation", "valid", "test")  # the split of a DatasetDict read as validation rows, the first found


def _class_names(feature) -> list | None:
    "The names of a `ClassLabel` feature, or of a list of them (multi-label ids); None for any other feature."
    inner = getattr(feature, "feature", None)  # a List / Sequence of ClassLabel
    return getattr(feature, "names", None) or getattr(inner, "names", None)


def dataset_chunks(
    ds,  # A `datasets.Dataset`, `IterableDataset`, or a `DatasetDict` with a train split (and a validation split)
    text_col: str | list = "text",  # Column with the texts; two: the columns of pairs of texts
    label_col: str | list | None = None,  # Column(s) with the labels, or None
    valid_col: str | None = None,  # Boolean column marking validation rows, read if the data has it
    rows: int = 20_000,  # Rows per chunk
) -> Iterator[pd.DataFrame]:
    """A Hugging Face dataset as `iter_chunks` gives a file: DataFrames of at most `rows` rows with the columns renamed
    (`text`, `text_pair`, `label` or `label:<col>`, `is_valid`), read `rows` at a time (an `IterableDataset` streams).
    `ClassLabel` ids become their names (a list of them, a multi-label row's classes). A `DatasetDict` gives its
    `train` split, then its `validation` (or `valid`, `test`) split flagged as validation rows."""
    if isinstance(ds, dict):
        if "train" not in ds:
            raise UlmfitError(f"the dataset's splits are {', '.join(map(repr, ds))}: none is 'train'")
        valid = next((k for k in VALID_SPLITS if k in ds), None)
        parts = [(ds["train"], False)] + ([(ds[valid], True)] if valid else [])
    else:
        parts = [(ds, None)]
    tcols, lcols = text_columns(text_col), label_columns(label_col)
    names = {
        **dict(zip(tcols, ["text", "text_pair"])),
        **dict(zip(lcols, ["label"] if len(lcols) == 1 else [f"label:{c}" for c in lcols])),
        **({valid_col: "is_valid"} if valid_col else {}),
    }
    start = 0
    for part, is_valid in parts:
        have = part.column_names
        if have is not None:  # (an IterableDataset whose features are unknown tells them with its first rows)
            missing = [c for c in tcols + lcols if c not in have]
            if missing:
                raise UlmfitError(
                    f"{type(part).__name__}: missing column {', '.join(map(repr, missing))}; "
                    f"the columns are {', '.join(map(repr, have))}"
                )
        cols = [c for c in names if have is None or c in have]
        features = part.features or {}
        for batch in part.select_columns(cols).iter(batch_size=rows):
            df = pd.DataFrame(batch)
            check_columns(df, tcols + lcols, type(part).__name__)
            for c in lcols:  # ClassLabel ids as names; -1 (no label, as in IMDb's unsupervised split) as missing
                if (classes := _class_names(features.get(c))) is not None:
                    name = lambda i: classes[i] if 0 <= i < len(classes) else None  # noqa: E731
                    df[c] = [[name(i) for i in v] if isinstance(v, list) else name(v) for v in df[c]]
            df = df.rename(columns=names).set_axis(range(start, start + len(df)))
            if is_valid is not None:
                df["is_valid"] = is_valid
            start += len(df)
            yield df


def label_columns(label_col) -> list:
    "The label column(s) as a list: [] for None, [name] for one name, the names of a list."
    if label_col is None:
        return []
    return [label_col] if isinstance(label_col, str) else list(label_col)


def text_columns(text_col) -> list:
    "The text column(s) as a list: [name], or the two names of a pair of texts (the first, then the second)."
    cols = [text_col] if isinstance(text_col, str) else list(text_col)
    if len(cols) not in (1, 2) or not all(isinstance(c, str) and c for c in cols):
        raise UlmfitError(f"text_col: one column, or two for pairs of texts, not {text_col!r}")
    if len(set(cols)) < len(cols):
        raise UlmfitError(f"text_col: the two texts of a pair come from two columns, not {cols[0]!r} twice")
    return cols


def has_column(path, name: str) -> bool:
    "Whether the data at `path` have a column `name`: a table file's header, or `label` of an IMDb-layout folder."
    p = Path(path)
    if p.is_dir():
        return name == "label" and _is_class_folder(p)
    return p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES) and name in _table_columns(p)


def model_source(src) -> str:
    "Check that `src` is a Hugging Face model folder, or else pass it on as a hub name."
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UlmfitError(f"{src}: is a file; expected a model folder (config.json, weights, tokenizer)")
        if not (p / "config.json").exists():
            raise UlmfitError(
                f"{src}: not a Hugging Face model folder (no config.json); "
                "give a folder written by save_pretrained, or a hub name"
            )
        return str(p)
    if str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise UlmfitError(f"{src}: no such model folder")
    return str(src)
