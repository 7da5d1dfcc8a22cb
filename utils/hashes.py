"""File hashes as A1111 computes them (docs/a1111-rules.md, "Hashes and checksums", "Model hashes"), cached by
(path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from utils.fileio import write_text_atomic
from utils.tokenizer import cache_root

_BLOCK = 1 << 20


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def sha256_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    """Full SHA-256 hex of a file. Large files are cached on disk keyed by absolute path, size, mtime, ctime and
    inode: a file replaced in place (even with its mtime put back) changes ctime or inode, so it is hashed again."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    return _sha256_cached(key, str(path), use_cache and st.st_size >= 16 * _BLOCK)


@lru_cache(maxsize=4096)
def _sha256_cached(key: str, path: str, persist: bool) -> str:
    cache = _load_cache() if persist else {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    digest = h.hexdigest()
    if persist:
        cache = _load_cache()
        cache[key] = digest
        try:
            write_text_atomic(_cache_file(), json.dumps(cache))
        except OSError:
            pass  # a read-only cache only costs time
    return digest


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-hex "Model hash": SHA-256 of the 64 KiB at offset 1 MiB (fewer bytes for short files)."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def _file_variant(name: str) -> str | None:
    """``model.fp16.safetensors`` and ``model.fp16-00001-of-00002.safetensors`` -> "fp16"; ``model.bin`` -> None."""
    parts = name.split(".")
    return parts[1].split("-")[0] if len(parts) > 2 else None


def folder_weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The weight files diffusers would load from a pipeline folder: per component, the requested variant (or the
    plain files when that component has none) and safetensors in preference to pickles."""
    folder = Path(folder)
    groups: dict[Path, list[Path]] = {}
    for f in folder.rglob("*"):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
            groups.setdefault(f.parent, []).append(f)
    chosen: list[Path] = []
    for files in groups.values():
        picked = ([f for f in files if _file_variant(f.name) == variant]
                  or [f for f in files if _file_variant(f.name) is None])
        safetensors = [f for f in picked if f.suffix == ".safetensors"]
        chosen += safetensors or picked
    return sorted(chosen, key=lambda f: f.relative_to(folder).as_posix())


def folder_weights_hash(folder: str | os.PathLike, variant: str | None = None) -> str:
    """A stable SHA-256 over a diffusers folder's weight files (relative path + content hash, in path order).

    Only the files that are loaded count (see ``folder_weight_files``), so an extra fp16 copy next to the fp32
    weights does not change the identity of the fp32 model.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for f in folder_weight_files(folder, variant):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """How logs, infotext and saved embeddings name the base model (docs/a1111-rules.md, "Model hashes").

    Single file: ``sha256`` of the file, ``shorthash`` its first 10 hex, ``legacy_hash`` A1111's old 8-hex hash.
    Folder: ``sha256`` = ``folder_weights_hash``, ``shorthash`` its first 10 hex, no legacy hash.
    """

    name: str
    sha256: str | None = None
    shorthash: str | None = None
    legacy_hash: str | None = None

    @property
    def title(self) -> str:
        """A1111's checkpoint title, ``name [shorthash]``."""
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name


def checkpoint_name(path: str | os.PathLike) -> str:
    """A1111's model name of a single file: the file name without extension, path separators made ``_``."""
    return re.sub(r"[/\\]", "_", Path(path).stem)


def model_identity(path: str | os.PathLike, variant: str | None = None, name: str | None = None) -> ModelIdentity:
    """Identity of a single-file checkpoint or a diffusers folder.

    Every file's SHA-256 is computed once per (path, size, mtime) and kept (large files on disk), so asking again
    is cheap; a folder is re-listed each time because its own mtime does not change when a weight file inside does.
    """
    p = Path(path)
    if p.is_dir():
        digest = folder_weights_hash(p, variant)
        return ModelIdentity(name or p.resolve().name, digest, digest[:10], None)
    if not p.is_file():
        raise FileNotFoundError(str(p))
    digest = sha256_file(p)
    return ModelIdentity(name or checkpoint_name(p), digest, digest[:10], legacy_model_hash(p))
