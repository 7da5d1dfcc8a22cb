"""File hashes as A1111 computes them (a1111-compat §1.6, §6.5), cached by (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
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
    """Full SHA-256 hex of a file. Large files are cached on disk keyed by absolute path, size and mtime."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
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


def folder_weights_hash(folder: str | os.PathLike) -> str:
    """A stable SHA-256 over a diffusers folder's weight files (relative path + content hash, sorted)."""
    folder = Path(folder)
    suffixes = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()
