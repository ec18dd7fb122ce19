"""Writing outputs safely: files and folders written under a temporary name and renamed into place, temporary names
that a later run recognises (and removes when the process that made them is gone), and a full disk reported in one
line that names the path."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UlmfitError

__all__ = [
    "DiskFull",
    "disk_full",
    "is_disk_full",
    "disk_errors",
    "temp_prefix",
    "remove_stale",
    "file_digest",
    "atomic_file",
    "atomic_dir",
    "check_out_dir",
]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded")
_LOW = 1 << 20  # bytes: a write that failed on a filesystem with less than this free ran out of space


class DiskFull(UlmfitError):
    "No space was left where a file or folder was being written (`path`); nothing at its path was replaced."

    path: Path | None = None
    free: int | None = None  # bytes free there when the write failed


def disk_full(path, then: str, free: int | None = None) -> DiskFull:
    """The `DiskFull` error of `path`: the space left there (`free`, measured now if not given), then `then` (what
    became of the user's files, what to do)."""
    free = _free(path) if free is None else free
    e = DiskFull(f"{path}: no space left on device ({_size(free)} free there); {then}")
    e.path, e.free = Path(path), free
    return e


def _free(path: Path) -> int | None:
    "Bytes free on the filesystem of `path` (its nearest existing folder), or None if that cannot be read."
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(e: BaseException, path=None) -> bool:
    """Whether `e` (or an exception it came from) is a full disk: ENOSPC/EDQUOT however the writer reports it
    (numpy, torch's zip writer and safetensors wrap it), or, with `path`, a failed write on an almost full disk."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if any(t in str(e).lower() for t in _NO_SPACE_TEXT):
            return True
        free = _free(path) if path is not None and isinstance(e, (OSError, RuntimeError)) else None
        if free is not None and free < _LOW:
            return True
        e = e.__cause__ or e.__context__
    return False


def _size(n: int | None) -> str:
    if n is None:
        return "unknown space"
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


AGAIN = "free some space (or write elsewhere) and run the command again"


@contextmanager
def disk_errors(path, then: str = f"nothing there was replaced: {AGAIN}"):
    """Around writing `path`: a full disk raised in the block becomes one `DiskFull` error naming `path`, the space
    left and `then` (the other errors pass through)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not is_disk_full(e, path):
            raise
        raise disk_full(path, then) from None


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """The start of a temporary name for `name` (`.NAME.KIND-HOST-PID-`): `remove_stale` knows it, and removes it once
    the process that made it on this host is gone (killed before it could clean up)."""
    return f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(folder, name: str, say: bool = True) -> list[Path]:
    """Remove the temporary files and folders for `name` in `folder` (`temp_prefix`) that processes of this host which
    no longer run left behind; returns them. Those of live processes, and of other hosts, are kept."""
    host, gone = socket.gethostname(), []
    pat = re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[^-]+")
    folder = Path(folder)
    if not folder.is_dir():
        return gone
    for p in folder.iterdir():
        m = pat.fullmatch(p.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p)
    if gone and say:
        print(f"removed {len(gone)} temporary file(s) left by an interrupted run: {gone[0]}", file=sys.stderr)
    return gone


def file_digest(path) -> str:
    "A SHA-256 of the file at `path` (its first 16 hex digits), read in blocks: a checksum of stores and graphs."
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def check_out_dir(out, force: bool = False) -> Path:
    "Refuse an existing output folder unless `force`, before any work starts."
    out = Path(out)
    if out.exists() and not force:
        raise UlmfitError(f"{out}: already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise UlmfitError(f"{out}: exists and is not a folder")
    return out


def _then(path: Path) -> str:
    return f"{'what was there is unchanged' if path.exists() else 'nothing was written'}: {AGAIN}"


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`, else it is removed and `path`
    is left as it was (a full disk: `DiskFull`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        with disk_errors(path, _then(path)):
            yield Path(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(out, force: bool = False):
    """Yield a temporary folder beside `out`; when the block succeeds it becomes `out` (replacing an
    existing one only with `force`). On failure it is removed and `out` is left as it was (a full disk: `DiskFull`)."""
    out = check_out_dir(out, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    try:
        with disk_errors(out, _then(out)):
            yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, "old"), dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
