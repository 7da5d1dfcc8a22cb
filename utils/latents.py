"""VAE latents: encoded as training first meets an image, kept in memory or on disk, sampled the A1111 way.

A1111's ``latent_sampling_method``:

* ``once``          one sample ``(mean + std·ε)·scale`` taken when the image is first encoded, reused for the
                    whole run;
* ``deterministic`` the mean of the distribution, ``mean·scale``;
* ``random``        the distribution is kept and a fresh sample is drawn every time the image is used.

For ``once`` ε comes from a generator seeded by the content half of the entry's key (below), so the one sample is the
same on every rank, every epoch and every rerun, whether the latent was just encoded or read back, and wherever the
pictures lie: a copied or touched data folder trains the same way. On disk every entry stores the distribution
(``mean`` and ``std``), so one cache serves all three modes; in memory only what the mode needs is kept (a sample,
the mean, or both). Each image is encoded on its own: batching changes the last bits of a VAE's output,
and a latent must not depend on which batch first met its image (a resumed run meets it in another batch).

Keys: the image, the training size, the crop mode, the flip, and a VAE identity string. An image is an ``ImageId``: its
content (a folder file's name and byte size; a stream row's SHA-256 of its bytes) and its place (a folder file's
absolute path and modification time). The key's first 16 hex digits hash the content and the plan and seed ``once``;
the other 24 hash everything, so a rerun or another rank reuses entries and a changed file, size, crop or VAE misses.
Nothing reads or hashes every file up front.

The store in memory is bounded (``MEMORY_BUDGET_MB``): past it, new images are encoded at every use instead of kept,
with a warning that points to ``--cache_latents_to_disk``. ``LatentStore`` holds no model and can be used from
DataLoader workers (a worker sees the memory entries that existed when it started, and the disk as it is).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from utils.fileio import atomic_path

SAMPLING_MODES = ("once", "deterministic", "random")
# Bump when the pixels fed to the VAE or the key's meaning change (resample filter, alpha compositing, scaling).
_FORMAT_VERSION = "ef-latents-2|bicubic|alpha-over-white|x/127.5-1"
MEMORY_BUDGET_MB = 4096  # per process; a 512 px SD latent is 16 KB (once/deterministic), 32 KB (random)


@dataclass
class LatentConfig:
    latent_sampling: str = "once"  # once | deterministic | random (A1111 meaning)
    cache_dir: str | None = None  # --cache_latents_to_disk DIR; None keeps latents in memory

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


def model_vae_identity(vae, model_name: str, vae_source: str | None = None) -> str:
    """:func:`vae_identity` of a loaded model's VAE. A ``--vae`` given in place of the model's own goes in by its
    files' paths, sizes and modification times (a Hub id by its name): another VAE of the same architecture has the
    same class and config, and its latents must not be read back from the other's cache."""
    name = model_name
    if vae_source:
        p = Path(os.path.expanduser(vae_source))
        if p.exists():
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
            name += "|vae:" + hashlib.sha256("\n".join("|".join(file_identity(f)) for f in files).encode()
                                             ).hexdigest()[:16]
        else:
            name += f"|vae:{vae_source}"
    return vae_identity(vae, name)


class ImageId(NamedTuple):
    """An image as cache keys see it. ``content`` says which picture it is and seeds ``once`` sampling; ``place`` only
    tells the cache that the file changed (it must not reach the sample: a copied folder, or the fresh file times of
    every test run, would train differently)."""

    content: str
    place: str = ""


def file_identity(path: str | os.PathLike) -> ImageId:
    """A folder image's identity: its name and size as content, its absolute path and modification time as place
    (one stat, no read)."""
    st = os.stat(path)
    return ImageId(f"file:{os.path.basename(path)}|{st.st_size}", f"{os.path.abspath(path)}|{st.st_mtime_ns}")


def bytes_identity(data: bytes) -> ImageId:
    """A stream row's identity: the SHA-256 of the image bytes already in hand (content only)."""
    return ImageId("sha256:" + hashlib.sha256(data).hexdigest())


def cache_key(image: str | ImageId, target: tuple[int, int], crop: str, flip: bool, identity: str) -> str:
    """The key of one (image, training size, crop mode, flip, VAE): 16 hex digits of the content and the plan (what
    ``once`` is seeded from), then 24 of everything (a plain string ``image`` is content only)."""
    image = image if isinstance(image, ImageId) else ImageId(str(image))
    plan = f"{_FORMAT_VERSION}|{target[0]}x{target[1]}|{crop}|flip{int(flip)}|{identity}"
    content = hashlib.sha256(f"{plan}|{image.content}".encode()).hexdigest()[:16]
    whole = hashlib.sha256(f"{plan}|{image.content}|{image.place}".encode()).hexdigest()[:24]
    return content + whole


def _once_generator(key: str) -> torch.Generator:
    # The key's content half only (see cache_key): 15 hex digits stay below 2**63.
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


class Entry(NamedTuple):
    """One cached image: ``mean`` (or, for ``once`` in memory, the one sample), ``std`` (None when not kept), the
    loss weight at latent size (with --use_alpha_as_loss_weight) and the size conditioning of its geometry."""

    mean: torch.Tensor
    std: torch.Tensor | None
    weight: torch.Tensor | None
    sizes: dict  # original_size, crop_top_left, target_size as (h, w) / (top, left) tuples


class LatentStore:
    """Latents by key, in memory or in a cache directory; ``draw`` applies the sampling mode and the VAE scaling.

    ``keep=False`` (--no_cache_latents, --random_crop) keeps nothing: every use is encoded, sampled the same way."""

    def __init__(self, sampling: str, scaling_factor: float, shift_factor: float | None = None,
                 cache_dir: str | os.PathLike | None = None, *, identity: str = "", keep: bool = True,
                 memory_budget_mb: float = MEMORY_BUDGET_MB):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"latent_sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)
        self.cache_dir = Path(cache_dir) if cache_dir and keep else None
        self.identity = identity
        self.keep = keep
        self.memory: dict[str, Entry] = {}
        self.memory_bytes = 0
        self.memory_budget = int(memory_budget_mb * 2**20)
        self.full_warned = False

    @classmethod
    def for_vae(cls, vae, config: LatentConfig, *, identity: str = "", keep: bool = True) -> "LatentStore":
        cfg = vae.config
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        return cls(config.latent_sampling, get("scaling_factor", 0.18215), get("shift_factor", None),
                   config.cache_dir, identity=identity, keep=keep)

    def key(self, image: str | ImageId, target: tuple[int, int], crop: str, flip: bool) -> str:
        return cache_key(image, target, crop, flip, self.identity)

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def lookup(self, key: str, need_weight: bool = False) -> Entry | None:
        """The entry, or None when it is not cached (or lacks the loss weight that is needed now)."""
        entry = self.memory.get(key)
        if entry is None and self.cache_dir is not None:
            path = self._path(key)
            if path.is_file():
                entry = self._read(path)
        if entry is None or (need_weight and entry.weight is None):
            return None
        return entry

    def _read(self, path: Path) -> Entry | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                t = {k: f.get_tensor(k) for k in names}
            sizes = {k: tuple(v) for k, v in json.loads(meta.get("sizes", "{}")).items()}
        except (OSError, ValueError, KeyError):  # unreadable or written by an older version: encode again
            return None
        if "mean" not in t or "std" not in t:
            return None
        return Entry(t["mean"], t["std"], t.get("weight"), sizes)

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor | None = None,
            sizes: dict | None = None, meta: dict | None = None) -> Entry:
        """Store one entry ([C,h,w] mean and std, unscaled); returns it as ``draw`` wants it (full distribution)."""
        sizes = dict(sizes or {})
        fresh = Entry(mean, std, weight, sizes)
        if not self.keep:
            return fresh
        if self.cache_dir is not None:
            from safetensors.torch import save_file

            tensors = {"mean": mean.contiguous(), "std": std.contiguous()}
            if weight is not None:
                tensors["weight"] = weight.contiguous()
            info = {k: str(v) for k, v in (meta or {}).items()}
            info["sizes"] = json.dumps({k: list(v) for k, v in sizes.items()})
            with atomic_path(self._path(key)) as tmp:
                save_file(tensors, str(tmp), metadata=info)
            return fresh
        # In memory keep only what the mode reads (A1111 keeps one tensor per image for once/deterministic).
        if self.sampling == "once":
            kept = Entry(mean + std * torch.randn(mean.shape, generator=_once_generator(key)), None, weight, sizes)
        elif self.sampling == "deterministic":
            kept = Entry(mean, None, weight, sizes)
        else:
            kept = fresh
        size = sum(t.numel() * t.element_size() for t in kept[:3] if t is not None)
        if self.memory_bytes + size > self.memory_budget:
            if not self.full_warned:
                self.full_warned = True
                print(f"warning: the in-memory latent cache reached {self.memory_budget / 2**20:.0f} MB "
                      f"({len(self.memory)} images); images met from now on are encoded at every use. "
                      "--cache_latents_to_disk DIR keeps them all.", file=sys.stderr, flush=True)
            return fresh
        self.memory[key] = kept
        self.memory_bytes += size
        return fresh

    def draw(self, entry: Entry, key: str | None, seed: int | None = None) -> torch.Tensor:
        """The scaled latent ``(z - shift)·scale`` for one use. ``once`` draws ε from the key; ``random`` from a
        generator seeded with ``seed`` (a fresh sample per use); ``deterministic`` takes the mean."""
        z = entry.mean
        if entry.std is not None and self.sampling != "deterministic":
            if self.sampling == "once":
                if key is None:
                    raise ValueError("latent sampling 'once' needs the image's cache key")
                gen = _once_generator(key)
            else:
                gen = torch.Generator().manual_seed(int(seed if seed is not None else 0))
            z = z + entry.std * torch.randn(z.shape, generator=gen)
        return (z - self.shift_factor) * self.scaling_factor

    def get(self, key: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The scaled latent of a cached key for one use; ``random`` mode draws ε from ``generator``."""
        entry = self.lookup(key)
        if entry is None:
            raise KeyError(f"latent {key} is not cached")
        if self.sampling == "random" and entry.std is not None:
            z = entry.mean + entry.std * torch.randn(entry.mean.shape, generator=generator)
            return (z - self.shift_factor) * self.scaling_factor
        return self.draw(entry, key)


class LatentEncoder:
    """Completes a batch's ``latents``: the uses the store answered come as they are; the others are encoded here
    (each image on its own when they are kept, see the module doc), stored, and drawn like a cached entry would be."""

    def __init__(self, vae, store: LatentStore):
        self.vae = vae
        self.store = store

    def complete(self, batch: dict, seeds: list[int]) -> torch.Tensor:
        """[B,C,h,w] scaled latents in batch order. ``batch``: ``latents`` + ``latent_slots`` for the cache hits,
        ``pixel_values`` + ``pixel_slots`` for the rest (slots default to all), ``latent_keys``, ``loss_weights``
        and the size conditioning; ``seeds``: each use's ``random``-mode seed."""
        if "pixel_values" not in batch:
            return batch["latents"]
        pixels = batch["pixel_values"]
        n = len(seeds)
        pixel_slots = list(batch.get("pixel_slots", range(n)))
        keys = batch.get("latent_keys") or [None] * n
        out: list[torch.Tensor | None] = [None] * n
        if "latents" in batch:
            for slot, z in zip(batch["latent_slots"], batch["latents"]):
                out[slot] = z
        todo = []
        for row, slot in enumerate(pixel_slots):
            entry = self.store.lookup(keys[slot], self._need_weight(batch)) if keys[slot] and self.store.keep \
                else None
            if entry is not None:  # encoded meanwhile (a worker's view of the memory cache is older)
                out[slot] = self.store.draw(entry, keys[slot], seeds[slot])
            else:
                todo.append((row, slot))
        if todo:
            rows = [r for r, _ in todo]
            if self.store.keep:  # one image per VAE call: the latent must not depend on its batch
                parts = [encode_pixels(self.vae, pixels[r:r + 1]) for r in rows]
                mean, std = torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
            else:  # encoded at every use: the same batch on a resume, one call is enough
                mean, std = encode_pixels(self.vae, pixels[rows])
            weights = batch.get("loss_weights")
            for (row, slot), m, s in zip(todo, mean, std):
                sizes = {k: tuple(int(x) for x in batch[k][slot]) for k in ("original_size", "crop_top_left",
                                                                              "target_size") if k in batch}
                w = weights[slot] if weights is not None else None
                entry = self.store.put(keys[slot], m, s, w, sizes) if keys[slot] else Entry(m, s, w, sizes)
                out[slot] = self.store.draw(entry, keys[slot], seeds[slot])
        return torch.stack(out)

    @staticmethod
    def _need_weight(batch: dict) -> bool:
        return "loss_weights" in batch
