"""VAE latent cache: encode each training image (per crop/flip variant) once, store on CPU or on disk.

A1111's ``latent_sampling_method`` (a1111-compat §3.4):

* ``once``          one sample ``(mean + std·ε)·scale`` taken when the cache is built and reused for the whole run;
* ``deterministic`` the mean of the distribution, ``mean·scale``;
* ``random``        the distribution is kept and a fresh sample is drawn every time the image is used.

On disk every entry stores the distribution (``mean`` and ``std``), so one cache serves all three modes. For
``once`` the single sample is drawn with a generator seeded from the entry's key, so it is the same on every rank,
every epoch and every rerun: "one sample taken once". In memory only what the mode needs is kept (a sample, the
mean, or both).

Keys hash the image's content (SHA-256 of the file bytes), the planned geometry (source size, resize, crop, target,
flip) and a VAE identity string, so a rerun or another rank reuses entries and any change of image, size, crop or VAE
misses. ``LatentStore`` holds no model and can be pickled into DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from utils.fileio import atomic_path
from utils.images import Geometry

SAMPLING_MODES = ("once", "deterministic", "random")
# Bump when the pixels fed to the VAE change for the same geometry (resample filter, alpha compositing, scaling).
_FORMAT_VERSION = "ef-latents-1|bicubic|alpha-over-white|x/127.5-1"


@dataclass
class LatentConfig:
    latent_sampling: str = "once"  # once | deterministic | random (A1111 meaning)
    cache_dir: str | None = None  # --cache_latents_to_disk DIR; None keeps latents in memory
    encode_batch_size: int = 4  # images per VAE call while building the cache

    def __post_init__(self):
        if self.latent_sampling not in SAMPLING_MODES:
            raise ValueError(f"latent_sampling must be one of {SAMPLING_MODES}, got {self.latent_sampling!r}")


def vae_identity(vae, name: str = "") -> str:
    """A string that changes whenever the encoder would give different latents: the caller's model name/hash, the VAE
    class, its config and its dtype. Weights are not hashed (too slow); ``name`` should carry the model file hash."""
    cfg = dict(getattr(vae, "config", {}) or {})
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    blob = json.dumps(cfg, sort_keys=True, default=str)
    dtype = str(getattr(vae, "dtype", ""))
    return f"{name}|{type(vae).__name__}|{dtype}|{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def cache_key(content_hash: str, geometry: Geometry, identity: str) -> str:
    text = f"{_FORMAT_VERSION}|{content_hash}|{geometry.key()}|{identity}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _once_generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(key[:15], 16))


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior of a batch of pixels in [-1, 1], [B,3,H,W] -> (mean, std) float32 on CPU, unscaled.

    An encoder without a Gaussian posterior (``latent_dist`` missing) gives std = 0, so every mode reads its mean
    (A1111 falls back to ``once`` there, which is the same thing for a deterministic encoder)."""
    param = next(iter(vae.parameters()), None) if hasattr(vae, "parameters") else None
    device = getattr(vae, "device", None) or (param.device if param is not None else "cpu")
    dtype = getattr(vae, "dtype", None) or (param.dtype if param is not None else torch.float32)
    out = vae.encode(pixels.to(device=device, dtype=dtype))
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        mean, std = dist.mean, dist.std
    else:
        mean = out.latents if hasattr(out, "latents") else out[0]
        std = torch.zeros_like(mean)
    return mean.float().cpu(), std.float().cpu()


class LatentStore:
    """Latents by key, in memory or in a cache directory. ``get`` applies the sampling mode and the VAE scaling."""

    def __init__(self, sampling: str, scaling_factor: float, shift_factor: float | None = None,
                 cache_dir: str | os.PathLike | None = None):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"latent_sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @classmethod
    def for_vae(cls, vae, config: LatentConfig) -> "LatentStore":
        cfg = vae.config
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        return cls(config.latent_sampling, get("scaling_factor", 0.18215), get("shift_factor", None), config.cache_dir)

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.memory or (self.cache_dir is not None and self._path(key).is_file())

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor, meta: dict | None = None) -> None:
        """Store one entry ([C,h,w] mean and std, unscaled)."""
        if self.cache_dir is not None:
            from safetensors.torch import save_file

            with atomic_path(self._path(key)) as tmp:
                save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp),
                          metadata={k: str(v) for k, v in (meta or {}).items()})
            return
        # In memory keep only what the mode reads (A1111 keeps one tensor per image for once/deterministic).
        if self.sampling == "once":
            self.memory[key] = (mean + std * torch.randn(mean.shape, generator=_once_generator(key)), None)
        elif self.sampling == "deterministic":
            self.memory[key] = (mean, None)
        else:
            self.memory[key] = (mean, std)

    def get(self, key: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The scaled latent ``(z - shift)·scale`` for one use; ``random`` mode draws ε from ``generator``."""
        if key in self.memory:
            z, std = self.memory[key]
            if std is not None:  # random
                z = z + std * torch.randn(z.shape, generator=generator)
        else:
            if self.cache_dir is None:
                raise KeyError(f"latent {key} is not cached")
            from safetensors.torch import load_file

            path = self._path(key)
            if not path.is_file():
                raise KeyError(f"latent {key} is not cached")
            d = load_file(str(path))
            mean, std = d["mean"], d["std"]
            if self.sampling == "deterministic":
                z = mean
            elif self.sampling == "once":
                z = mean + std * torch.randn(mean.shape, generator=_once_generator(key))
            else:
                z = mean + std * torch.randn(mean.shape, generator=generator)
        return (z - self.shift_factor) * self.scaling_factor

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if not self.has(k)]


@dataclass
class EncodeJob:
    """One latent to compute: its key, the target size (jobs of one size are batched) and how to get its pixels."""

    key: str
    size: tuple[int, int]
    load_pixels: Callable[[], torch.Tensor]  # -> [3,H,W] float in [-1,1]; may raise to skip the job
    meta: dict | None = None


def build_cache(jobs: Iterable[EncodeJob], vae, store: LatentStore, *, rank: int = 0, world_size: int = 1,
                batch_size: int = 4, progress: bool = True,
                on_error: Callable[[EncodeJob, Exception], None] | None = None) -> int:
    """Encode the jobs not yet in ``store``; returns how many images went through the VAE.

    ``jobs`` may be a generator (streams): at most ``batch_size`` images per target size are held at once. With a
    cache directory the work is split across ranks (job j of the sequence belongs to rank j % world_size); the caller
    must then wait for all ranks (``accelerator.wait_for_everyone()``) before reading. Without a directory each rank
    encodes every job into its own memory. A job whose ``load_pixels`` raises is reported through ``on_error`` (or
    re-raised without one) and skipped."""
    split = store.cache_dir is not None and world_size > 1
    pending: dict[tuple[int, int], list[tuple[EncodeJob, torch.Tensor]]] = {}
    encoded = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) if hasattr(jobs, "__len__") else None, desc=f"caching latents (rank {rank})",
                   unit="img")

    def flush(size):
        nonlocal encoded
        group = pending.pop(size, [])
        if group:
            mean, std = encode_pixels(vae, torch.stack([px for _, px in group]))
            for (job, _), m, s in zip(group, mean, std):
                store.put(job.key, m, s, job.meta)
            encoded += len(group)

    for j, job in enumerate(jobs):
        if bar is not None:
            bar.update(1)
        if (split and j % world_size != rank) or store.has(job.key):
            continue
        try:
            pixels = job.load_pixels()
        except Exception as e:  # noqa: BLE001 - bad inputs are reported by the caller, never fatal here
            if on_error is None:
                raise
            on_error(job, e)
            continue
        pending.setdefault(job.size, []).append((job, pixels))
        if len(pending[job.size]) >= batch_size:
            flush(job.size)
    for size in sorted(pending):
        flush(size)
    if bar is not None:
        bar.close()
    return encoded
