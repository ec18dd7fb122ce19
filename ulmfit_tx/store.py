"""Tokenized text on disk: a token store. One flat array of token ids read through `numpy.memmap`, document
offsets, optional label ids and validation flags, and `meta.json`. Built streaming (the corpus is never held
whole), cached by source and tokenizer, and read without loading it: MLM blocks are index arithmetic over the
flat array, batch lengths come from the offsets."""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UlmfitError, check_texts, valid_mask
from .files import atomic_dir, file_digest, remove_stale, temp_prefix
from .io import DOCS, dataset_chunks, is_hf_dataset, iter_chunks, label_columns, text_columns
from .tasks import MULTI, REGRESSION, SINGLE, infer_task, label_values
from .tokenize import HFTokenizer

__all__ = [
    "FORMAT_VERSION",
    "TokenStore",
    "build_store",
    "tokenizer_fingerprint",
    "id_limit",
    "source_fingerprint",
    "default_cache",
    "cached_store",
    "as_store",
    "is_store",
]

FORMAT_VERSION = 1
FILES = {
    "ids": "ids.bin",
    "offsets": "offsets.bin",
    "labels": "labels.bin",
    "valid": "valid.bin",
    "firsts": "firsts.bin",
}
LABEL_DTYPES = {SINGLE: np.int32, REGRESSION: np.float32}  # (multi_label: a uint8 matrix, documents x classes)


def id_limit(tfm: HFTokenizer) -> int:
    "One more than the largest token id `tfm`'s tokenizer can give (its vocabulary with the added tokens)."
    return max(len(tfm.tok), max(tfm.tok.get_vocab().values()) + 1)


def tokenizer_fingerprint(tfm: HFTokenizer) -> str:
    "A hash of the Rust tokenizer that makes the stored ids (normalizer, pre-tokenizer, model, vocabulary)."
    return hashlib.sha256(tfm.backend.to_str().encode()).hexdigest()[:16]


def source_fingerprint(source) -> str:
    """A hash of what a store is built from: a file's path, size and modification time (every file of a folder),
    the values of a DataFrame or list of texts, or a Hugging Face dataset's fingerprint."""
    h = hashlib.sha256()
    if is_hf_dataset(source):  # datasets' own fingerprint of its contents and transforms (streamed: its description)
        parts = source.values() if isinstance(source, dict) else [source]
        h.update(repr([getattr(d, "_fingerprint", None) or repr(d) for d in parts]).encode())
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source).absolute()
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        df = source if isinstance(source, pd.DataFrame) else pd.DataFrame({"text": list(source)})
        h.update(pd.util.hash_pandas_object(df.astype(str), index=False).values.tobytes())
        h.update("\0".join(map(str, df.columns)).encode())
    return h.hexdigest()[:16]


def is_store(path) -> bool:
    "Whether `path` is a token store folder."
    p = Path(path)
    return p.is_dir() and (p / "meta.json").exists() and (p / FILES["offsets"]).exists()


class TokenStore:
    """A token store opened memory-mapped: `doc(i)` gives document i's token ids (no special tokens),
    `lengths()` its token counts, `labels`/`classes`/`is_valid` what the source had. A store of pairs of texts holds
    each pair as one document, the first text's ids then the second's, and `firsts`: the first text's length. Pickled
    as its path, so each DataLoader worker and each process opens its own map."""

    def __init__(self, path):
        self.path = Path(path)
        if not is_store(self.path):
            raise UlmfitError(f"{path}: not a token store (no meta.json and offsets.bin)")
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise UlmfitError(f"{path}/meta.json: unreadable ({e})") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise UlmfitError(
                f"{path}: token store format {self.meta.get('format')!r}, this ulmfit_tx reads {FORMAT_VERSION}; "
                "build it again"
            )
        self._open()

    def _map(self, name: str, dtype, n: int):
        f = self.path / FILES[name]
        want = n * np.dtype(dtype).itemsize
        if not f.exists() or f.stat().st_size != want:
            raise UlmfitError(
                f"{f}: missing or truncated ({f.stat().st_size if f.exists() else 0} bytes, expected {want}); "
                "build the store again"
            )
        if not n:
            return np.zeros(0, dtype)
        m = np.memmap(f, dtype=dtype, mode="r", shape=(n,))
        # reads jump around (shuffled blocks): no readahead, or every read maps ~128 kB of the file into memory
        if hasattr(mmap, "MADV_RANDOM") and getattr(m, "_mmap", None) is not None:
            m._mmap.madvise(mmap.MADV_RANDOM)
        return m

    def _release(self):
        """Every 256 document reads, unmap the pages of the id and offset files this process has touched: the kernel
        maps up to 64 kB around each read, which would otherwise grow the resident size by ~64 kB per random read
        (clean file pages, reclaimable, but counted). The data stay in the page cache; a later read maps them
        again."""
        self._reads += 1
        if self._reads % 256 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        for m in (self.ids, self.offsets):
            if getattr(m, "_mmap", None) is not None:
                m._mmap.madvise(mmap.MADV_DONTNEED)

    def _open(self):
        m = self.meta
        self.ids = self._map("ids", m["dtype"], m["n_tokens"])  # (n_tokens,) every document's ids, in order
        self.offsets = self._map("offsets", np.int64, m["n_docs"] + 1)  # (n_docs + 1,) where each document starts
        n, task = m["n_docs"], self.task
        if task == MULTI:  # (n_docs, n_classes) multi-hot
            self.labels = self._map("labels", np.uint8, n * len(m["classes"])).reshape(n, len(m["classes"]))
        else:  # (n_docs,) class ids, or regression targets
            self.labels = None if task is None else self._map("labels", LABEL_DTYPES[task], n)
        self.is_valid = self._map("valid", np.bool_, m["n_docs"]) if m["has_valid"] else None
        self.firsts = self._map("firsts", np.int32, n) if self.pair else None  # (n_docs,) a pair's first text's length
        self._reads = 0
        self.limit = None  # ids at or above it are refused by `doc` (set by `check_tokenizer`)

    def __len__(self) -> int:
        return self.meta["n_docs"]

    def __repr__(self):
        return f"TokenStore({str(self.path)!r}: {len(self):,} documents, {self.meta['n_tokens']:,} tokens)"

    @property
    def classes(self) -> list | None:
        "Class names in label-id order (None: no labels, or a regression target)."
        return self.meta["classes"]

    @property
    def task(self) -> str | None:
        "single_label, multi_label or regression: what the stored labels are (None: no labels)."
        return self.meta.get("task", SINGLE if self.meta["classes"] is not None else None)

    @property
    def pair(self) -> bool:
        "Whether each document is a pair of texts (see `first`)."
        return bool(self.meta.get("pair"))

    def doc(self, i: int) -> np.ndarray:
        "Token ids of document `i` (a view of the map)."
        self._release()
        d = self.ids[self.offsets[i] : self.offsets[i + 1]]
        if self.limit is not None and d.size and d.max() >= self.limit:
            raise UlmfitError(
                f"{self.path}: document {i} has the token id {int(d.max())}, beyond the tokenizer's {self.limit} ids: "
                f"the store is damaged (ulmfit-tx tokenize --verify {self.path} checks it); build it again"
            )
        return d

    def first(self, i: int) -> int | None:
        "How many of document `i`'s ids are its first text's (pairs; None: single texts): `HFTokenizer.wrap`'s split."
        return None if self.firsts is None else int(self.firsts[i])

    def lengths(self, idx=None) -> np.ndarray:
        "Token counts of the documents `idx` (all by default), from the offsets."
        if idx is None:
            return np.diff(self.offsets)
        idx = np.asarray(idx)
        return self.offsets[idx + 1] - self.offsets[idx]

    def check_tokenizer(self, tfm: HFTokenizer, where: str = "the model"):
        """Refuse a store whose ids come from another tokenizer than `tfm`'s: another fingerprint, or ids beyond its
        vocabulary (the recorded largest id); from then on `doc` refuses a document with such an id (damaged ids)."""
        limit, top = id_limit(tfm), self.meta.get("max_id", -1)
        if self.meta["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tfm) or top >= limit:
            raise UlmfitError(
                f"{self.path}: this token store was made with another tokenizer "
                f"({self.meta['tokenizer']['name']!r}, {self.meta['tokenizer']['vocab_size']} tokens"
                + (f", ids up to {top}" if top >= limit else "")
                + f") than {where}'s ({limit} ids); build the store with that model's tokenizer "
                "(ulmfit-tx tokenize --model ...)"
            )
        self.limit = limit

    def verify(self) -> dict:
        """Read every file back and check it: the checksums recorded when the store was built, offsets that rise from 0
        to the token count, the largest id as recorded, pairs' first lengths and labels within bounds. Raises an
        `UlmfitError` naming the first problem; returns what was checked."""
        m, bad = self.meta, lambda what: UlmfitError(f"{self.path}: {what}; the store is damaged: build it again")
        sums = m.get("checksums")
        for name, want in (sums or {}).items():
            if not (self.path / name).is_file():
                raise bad(f"{name} is missing")
            if file_digest(self.path / name) != want:
                raise bad(f"{name} does not match its checksum (changed since it was built)")
        off = self.offsets
        if len(off) and (off[0] != 0 or off[-1] != m["n_tokens"] or (np.diff(off) < 0).any()):
            raise bad("offsets.bin does not run from 0 to the token count")
        top = max((int(self.ids[i : i + 2**24].max()) for i in range(0, len(self.ids), 2**24)), default=-1)
        if "max_id" in m and top != m["max_id"]:
            raise bad(f"its largest token id is {top}, not the {m['max_id']} recorded")
        if self.limit is not None and top >= self.limit:
            raise bad(f"its largest token id {top} is beyond the tokenizer's {self.limit} ids")
        if self.firsts is not None and ((self.firsts < 0) | (self.firsts > self.lengths())).any():
            raise bad("firsts.bin holds first-text lengths longer than their documents")
        lab = self.labels
        if self.task == SINGLE and len(lab) and (lab.min() < 0 or lab.max() >= len(self.classes)):
            raise bad(f"labels.bin holds class ids outside 0..{len(self.classes) - 1}")
        if self.task == MULTI and (lab > 1).any():
            raise bad("labels.bin holds values other than 0 and 1")
        if self.task == REGRESSION and not np.isfinite(lab).all():
            raise bad("labels.bin holds values that are not numbers")
        return {"documents": len(self), "tokens": m["n_tokens"], "max_id": top, "checksums": sums is not None}

    def check_pair(self, tfm: HFTokenizer):
        "Refuse a store of pairs of texts read by a single-text tokenizer transform `tfm`, or the reverse."
        if self.pair != tfm.pair:
            raise UlmfitError(
                f"{self.path}: the token store holds {'pairs of texts' if self.pair else 'single texts'}: "
                + (
                    "give the two text columns it was built from"
                    if self.pair
                    else "build it from the two text columns"
                )
            )

    def __getstate__(self):
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()


class _Progress:
    "Documents tokenized and documents/s on one updating line (stderr) for builds that take more than a second."

    def __init__(self, what: str, show: bool):
        self.what, self.show, self.t0, self.last, self.n = what, show, time.time(), time.time(), 0

    def update(self, n: int, final: bool = False):
        "Count `n` more documents; the line appears once tokenizing has taken a second, then every half second."
        self.n += n
        now = time.time()
        if self.show and now - self.t0 > 1 and (final or now - self.last > 0.5):
            self.last = now
            print(
                f"\r{self.what}: {self.n:,} documents, {self.n / max(now - self.t0, 1e-9):,.0f} documents/s",
                end="\n" if final else "",
                file=sys.stderr,
                flush=True,
            )


def _label_order(names: list[str]) -> list:
    "Class names sorted as fastai's `Categorize` sorts them: as integers when every name is one."
    try:
        return sorted(int(n) for n in names) if all(str(int(n)) == n for n in names) else sorted(names)
    except ValueError:
        return sorted(names)


def build_store(
    source,  # Table file, IMDb-layout folder, .txt/.txt.gz corpus, DataFrame, list of texts, or a Hugging Face
    # `datasets.Dataset` / `IterableDataset` / `DatasetDict` (train split, then validation: `io.dataset_chunks`)
    tokenizer,  # An `HFTokenizer`, a fast tokenizer, or a model folder / hub name
    out,  # The store folder to write (written to a temporary folder, then renamed)
    text_col: str | list = "text",  # Column with the texts; two columns: pairs of texts (each pair a document)
    label_col: str | list | None = None,  # Label column (stored as ids into the sorted class names); several: 0/1
    # columns of a multi_label task, one per class; None: no labels
    valid_col: str | None = None,  # Boolean column marking validation rows, stored when the data has it
    task: str | None = None,  # single_label, multi_label or regression (default: `infer_task` from the label options)
    label_delim: str | None = None,  # multi_label from one column: the separator of its class names (e.g. ";")
    classes: list | None = None,  # The classes, in output order: a label outside them is refused (default: as found)
    docs: str = "lines",  # For a plain-text corpus: a document is a line, a file, or a WikiText article
    unk: str | None = None,  # For a plain-text corpus: write WikiText's `<unk>` as this token (the tokenizer's)
    max_docs: int | None = None,  # Read only the first `max_docs` documents
    chunk_rows: int = 1000,  # Documents read and tokenized at a time (bounds the build's memory)
    force: bool = False,  # Replace an existing `out`
    progress: bool = True,  # Show documents/s while tokenizing
) -> TokenStore:
    """Tokenize `source` into a token store at `out`, streaming: chunks of `chunk_rows` documents are read,
    encoded in one parallel call of the fast tokenizer and appended to the flat id file. Blank texts and
    missing labels are refused with the rows named; nothing is left at `out` on failure. Labels are stored by task:
    class ids, a multi-hot matrix (documents x classes) or float targets."""
    tcols, lcols = text_columns(text_col), label_columns(label_col)
    if set(tcols) & set(lcols):
        raise UlmfitError(f"the label column cannot be a text column ({sorted(set(tcols) & set(lcols))[0]!r})")
    task = infer_task(task, lcols, label_delim) if lcols else None
    tfm = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)
    dtype = np.uint16 if id_limit(tfm) <= 2**16 else np.uint32
    if is_hf_dataset(source):
        chunks = dataset_chunks(source, tcols, lcols or None, valid_col, chunk_rows)
        name = f"datasets.{type(source).__name__}"
    elif isinstance(source, (str, os.PathLike)):
        if docs not in DOCS:
            raise UlmfitError(f"docs must be lines, files or articles, not {docs!r}")
        chunks, name = iter_chunks(source, text_col, lcols or None, valid_col, docs, chunk_rows, unk=unk), str(source)
    else:
        df = source if isinstance(source, pd.DataFrame) else pd.DataFrame({tcols[0]: list(source)})
        chunks = (
            _df_chunk(df.iloc[i : i + chunk_rows], tcols, lcols, valid_col)
            for i in range(0, max(len(df), 1), chunk_rows)
        )
        name = f"DataFrame with {len(df):,} rows"
    bar = _Progress(f"tokenizing {Path(name).name if isinstance(source, (str, os.PathLike)) else name}", progress)
    found: dict[str, int] = {
        str(c): i for i, c in enumerate(classes or (lcols if task == MULTI and len(lcols) > 1 else []))
    }
    n_docs = n_tokens = 0
    max_id, has_valid = -1, False
    with atomic_dir(out, force) as tmp:
        with (
            open(tmp / FILES["ids"], "wb") as f_ids,
            open(tmp / FILES["offsets"], "wb") as f_off,
            open(tmp / FILES["labels"], "wb") as f_lab,
            open(tmp / "label_counts.bin", "wb") as f_cnt,
            open(tmp / FILES["valid"], "wb") as f_val,
            open(tmp / FILES["firsts"], "wb") as f_first,
        ):
            f_off.write(np.zeros(1, np.int64).tobytes())
            for chunk in chunks:
                if max_docs is not None and n_docs >= max_docs:
                    break
                if max_docs is not None:
                    chunk = chunk.iloc[: max_docs - n_docs]
                if len(chunk) == 0:
                    continue
                for col, shown in zip(("text", "text_pair"), tcols):
                    check_texts(chunk, col, name, shown=shown)
                if task is not None:
                    _write_labels(chunk, task, lcols, label_delim, name, classes, found, f_lab, f_cnt)
                ids = list(tfm.token_ids(chunk["text"].tolist(), chunk=len(chunk)))  # one call of the fast tokenizer
                if len(tcols) == 2:  # a pair: the first text's ids, then the second's
                    f_first.write(np.fromiter(map(len, ids), np.int32, len(ids)).tobytes())
                    ids = [a + b for a, b in zip(ids, tfm.token_ids(chunk["text_pair"].tolist(), chunk=len(chunk)))]
                lens = np.fromiter(map(len, ids), np.int64, len(ids))
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lens.sum()))
                max_id = max(max_id, int(flat.max()) if flat.size else -1)
                f_ids.write(flat.tobytes())
                f_off.write((n_tokens + np.cumsum(lens)).tobytes())
                if "is_valid" in chunk:
                    has_valid = True
                    f_val.write(valid_mask(chunk, "is_valid").to_numpy(bool).tobytes())
                n_docs, n_tokens = n_docs + len(chunk), n_tokens + int(lens.sum())
                bar.update(len(chunk))
        bar.update(0, final=True)
        if n_docs == 0:
            raise UlmfitError(f"{name}: no documents (a header but no rows, or only blank lines)")
        fixed = classes is not None or (task == MULTI and len(lcols) > 1)  # else sorted as fastai sorts
        order = _finish_labels(tmp, task, found, fixed, n_docs)
        (tmp / "label_counts.bin").unlink()
        if task is None:
            (tmp / FILES["labels"]).unlink()
        if not has_valid:
            (tmp / FILES["valid"]).unlink()
        if len(tcols) == 1:
            (tmp / FILES["firsts"]).unlink()
        meta = {
            "format": FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "task": task,
            "classes": order,
            "label_delim": label_delim,
            "has_valid": has_valid,
            "pair": len(tcols) == 2,
            "max_id": max_id,
            "checksums": {f.name: file_digest(f) for f in sorted(tmp.glob("*.bin"))},
            "tokenizer": {
                "fingerprint": tokenizer_fingerprint(tfm),
                "name": tfm.tok.name_or_path,
                "vocab_size": len(tfm.tok),
            },
            "source": {
                "name": name,
                "fingerprint": source_fingerprint(source),
                "text_col": tcols[0] if len(tcols) == 1 else tcols,
                "label_col": lcols[0] if len(lcols) == 1 else (lcols or None),
                "valid_col": valid_col,
                "docs": docs,
                "unk": unk,
            },
            "seconds": round(time.time() - bar.t0, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return TokenStore(out)


def _write_labels(chunk, task, lcols, delim, name, classes, found: dict, f_lab, f_cnt):
    """Append a chunk's labels while streaming: class ids in order of discovery (`found`, updated), for multi_label
    each row's ids with their count in `f_cnt`; regression targets as float32."""
    cols = ["label"] if len(lcols) == 1 else [f"label:{c}" for c in lcols]
    vals = label_values(chunk.rename(columns=dict(zip(cols, lcols))), task, lcols, delim, name, classes)
    if task == REGRESSION:
        f_lab.write(np.asarray(vals, np.float32).tobytes())
    elif task == SINGLE:
        f_lab.write(np.array([found.setdefault(v, len(found)) for v in vals], np.int32).tobytes())
    else:
        f_lab.write(np.array([found.setdefault(v, len(found)) for row in vals for v in row], np.int32).tobytes())
        f_cnt.write(np.array([len(row) for row in vals], np.int32).tobytes())


def _finish_labels(tmp: Path, task, found: dict, fixed: bool, n_docs: int) -> list | None:
    """Put the streamed class ids in output order (the given classes, the 0/1 columns' order, or sorted as fastai's
    `Categorize` sorts), multi_label rows as a multi-hot matrix; returns the class names in that order."""
    if task in (None, REGRESSION):
        return None
    order = list(found) if fixed else _label_order(list(found))
    remap = np.array([[str(o) for o in order].index(k) for k in found], np.int32)
    ids = np.fromfile(tmp / FILES["labels"], np.int32)
    if task == SINGLE:
        remap[ids].tofile(tmp / FILES["labels"])
    else:
        counts = np.fromfile(tmp / "label_counts.bin", np.int32)
        hot = np.zeros((n_docs, len(order)), np.uint8)
        hot[np.repeat(np.arange(n_docs), counts), remap[ids]] = 1
        hot.tofile(tmp / FILES["labels"])
    return order


def _df_chunk(df: pd.DataFrame, text_cols: list, label_cols: list, valid_col: str | None) -> pd.DataFrame:
    """A slice of a DataFrame with columns `text` (and `text_pair`, `label` or `label:<col>`, `is_valid`), as
    `iter_chunks` gives."""
    from .errors import check_columns

    check_columns(df, text_cols + label_cols)
    names = ["label"] if len(label_cols) == 1 else [f"label:{c}" for c in label_cols]
    cols = {
        **dict(zip(text_cols, ["text", "text_pair"])),
        **dict(zip(label_cols, names)),
        **({valid_col: "is_valid"} if valid_col and valid_col in df else {}),
    }
    return df[list(cols)].rename(columns=cols)


def default_cache() -> Path:
    "Where stores built from files are cached: `$ULMFIT_TX_CACHE`, else `~/.cache/ulmfit_tx/stores`."
    return Path(os.environ.get("ULMFIT_TX_CACHE") or Path.home() / ".cache" / "ulmfit_tx" / "stores")


def cached_store(source, tfm: HFTokenizer, cache=None, verbose: bool = True, **opts) -> TokenStore:
    """The store of the file or folder `source` tokenized by `tfm` with the reading options `opts` (see
    `build_store`), from `cache` (default `default_cache()`): reused when its source and tokenizer
    fingerprints match (tokenization is skipped, and it says so), built or rebuilt otherwise."""
    from .distributed import rank0_first

    with rank0_first():  # in a distributed run, rank 0 builds the entry and the others then read it
        return _cached_store(source, tfm, cache, verbose, **opts)


def _cached_store(source, tfm: HFTokenizer, cache, verbose: bool, **opts) -> TokenStore:
    from .distributed import is_rank0

    cache = Path(cache) if cache is not None else default_cache()
    key = json.dumps(
        {"source": str(Path(source).absolute()), "tokenizer": tokenizer_fingerprint(tfm), **opts}, sort_keys=True
    )
    entry = cache / hashlib.sha256(key.encode()).hexdigest()[:20]
    if is_store(entry):
        try:
            store = TokenStore(entry)
            if store.meta["source"]["fingerprint"] == source_fingerprint(source):
                if verbose and is_rank0():
                    print(
                        f"token store: {len(store):,} documents of {source} read from the cache {entry} "
                        "(tokenization skipped)",
                        file=sys.stderr,
                    )
                return store
            if verbose:
                print(f"token store: {source} changed since {entry} was built; tokenizing again", file=sys.stderr)
        except UlmfitError as e:
            if verbose:
                print(f"token store: rebuilding the unusable cache entry {entry} ({e})", file=sys.stderr)
    if not is_rank0():
        raise UlmfitError(f"{entry}: rank 0 did not build this token store")
    return build_store(source, tfm, entry, force=True, progress=verbose, **opts)


def as_store(
    source,  # A `TokenStore`, a store folder, a file/folder path, a DataFrame, a list of texts, or a HF dataset
    tfm: HFTokenizer,  # The tokenizer the ids must come from
    cache=None,  # Cache folder for stores built from files (None: `default_cache()`; False: a temporary store)
    verbose: bool = True,  # Say whether the cache was used
    **opts,  # Reading options of `build_store` (text_col, label_col, valid_col, docs, unk)
) -> TokenStore:
    """`source` as a token store made with `tfm`'s tokenizer: a given store is checked, a file or folder is
    tokenized into the cache (or found there), a DataFrame or list into a temporary store removed with it."""
    if isinstance(source, TokenStore) or (isinstance(source, (str, os.PathLike)) and is_store(source)):
        store = source if isinstance(source, TokenStore) else TokenStore(source)
        store.check_tokenizer(tfm)
        return store
    if isinstance(source, (str, os.PathLike)) and cache is not False:
        store = cached_store(source, tfm, cache, verbose, **opts)
        store.check_tokenizer(tfm)
        return store
    remove_stale(tempfile.gettempdir(), "ulmfit_tx_store", say=False)  # those of killed runs
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix("ulmfit_tx_store")))
    try:
        store = build_store(source, tfm, tmp / "store", progress=False, **opts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(store, shutil.rmtree, tmp, True)
    store.check_tokenizer(tfm)
    return store
