"""Writing files so that a crash or kill at any moment leaves either the old file or the new one, never half of one,
and a failed write (a full disk, a folder we may not write) ends as one line naming the file and what to do."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from utils.errors import UserError

# What torch's C++ writer and safetensors' Rust writer raise when the OS refuses a write: no errno, only these texts.
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter failed|basic_ios::clear|file write failed|unexpected pos \d+")
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_NEARLY_FULL_BYTES = 1 << 20

_ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free some space (or write elsewhere) and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space (or write elsewhere) and run again"),
    errno.EACCES: ("permission denied", "make the folder writable or choose another one"),
    errno.EPERM: ("operation not permitted", "make the folder writable or choose another one"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable disk"),
}


class WriteError(UserError, OSError):
    """A file we could not write. Still an OSError, so code that tolerates unwritable caches keeps doing so."""


def _nearly_full(path: Path) -> bool:
    for folder in (path.parent, *path.parent.parents):
        try:
            return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
        except OSError:
            continue
    return False


def write_failure_code(error: BaseException, path: str | os.PathLike) -> int | None:
    """The errno behind a failed write of ``path``, 0 for a write failure of unknown cause, None for any other error.

    OSError carries its errno; torch.save's C++ stream errors carry none, so a nearly full disk is taken as the cause.
    """
    if isinstance(error, OSError):
        return error.errno or 0
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code and type(error).__name__ == "SafetensorError":
        return int(code.group(1))
    if isinstance(error, RuntimeError) and _TORCH_WRITE_FAILURE.search(text):
        return errno.ENOSPC if _nearly_full(Path(path)) else 0
    return None


def write_error(path: str | os.PathLike, error: BaseException, note: str = "") -> WriteError | None:
    """The one-line WriteError for ``error`` raised while writing ``path``; None if it is not a write failure."""
    if isinstance(error, WriteError):
        return error
    code = write_failure_code(error, path)
    if code is None:
        return None
    if code in _ADVICE:
        reason, todo = _ADVICE[code]
    else:
        text = str(error).strip()
        reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
        todo = "check the disk and the folder's permissions"
    e = WriteError(f"cannot write {path}: {reason}; {todo}{note}")
    e.errno = code or None
    return e


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``, on error it is removed.

    The temp name keeps the final suffix so libraries that pick a format from the extension still work. A write the
    OS refuses (full disk, permissions) becomes a WriteError naming ``path``; the previous ``path`` stays as it was.
    """
    final = Path(path)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        failure = write_error(final, e) if isinstance(e, Exception) else None
        if failure is not None and failure is not e:
            raise failure from None
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def check_writable_folder(folder: str | os.PathLike, flag: str) -> None:
    """Fail now, with one line, if ``folder`` cannot hold our outputs (it is a file, or the disk refuses a file there).

    Creates the folder (as the run would) and a probe file that is removed at once."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is an existing file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason, todo = _ADVICE.get(e.errno, (e.strerror or str(e), "choose another folder"))
        raise UserError(f"{flag} {folder}: cannot write there ({reason}); {todo}") from None
