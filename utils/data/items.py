"""Turning one use of one example into tensors: a cached latent when the store has it, else decoded pixels.

A batch (see ``collate``) has ``prompts``, ``captions``, ``index`` (example ids; -1 for streams), the SDXL size
conditioning ``original_size`` / ``crop_top_left`` / ``target_size`` (LongTensor [B,2], (h,w) / (top,left)),
``loss_weights`` [B,1,h,w] with --use_alpha_as_loss_weight, ``latent_keys`` (cache keys, None without a store) and
``skipped`` ((path, reason) met while making it). Cache hits come as ``latents`` [H,C,h,w] + ``latent_slots``, the
rest as ``pixel_values`` [M,3,H,W] in [-1,1] + ``pixel_slots`` (the batch's places they fill); the trainer encodes the
pixels (``utils.latents.LatentEncoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from utils.data.config import LATENT_FACTOR, DataConfig, PromptConfig
from utils.data.plan import item_rng, latent_seed
from utils.data.prompts import build_prompt
from utils.images import RESAMPLE, Geometry, LoadedImage, apply_geometry, plan_geometry

if TYPE_CHECKING:
    from utils.latents import ImageId


@dataclass
class Use:
    """One example as the item maker needs it; every callable may raise for a bad input."""

    name: str  # for skip reports
    index: int  # example id (-1 for streams)
    target: tuple[int, int]  # training size (w, h): the bucket
    caption: Callable[[], str]  # ValueError for an unreadable caption
    image_id: Callable[[], ImageId]  # cache-key identity (utils.latents.file_identity / bytes_identity)
    load: Callable[[], LoadedImage]  # ImageLoadError / OSError


@dataclass
class ItemContext:
    """What a worker needs to make items (picklable; no models)."""

    cfg: DataConfig
    prompt: PromptConfig
    lines: list[str] | None  # template lines; None in caption-only mode
    seed: int
    latents: object | None = None  # utils.latents.LatentStore: keys, cached entries, sampling


def pixels(img: Image.Image) -> torch.Tensor:
    # Reorder while still uint8 (4x less memory traffic), then one float pass in place.
    chw = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div_(127.5).sub_(1.0)


def alpha_to_weight(alpha: Image.Image | None, target: tuple[int, int], factor: int = LATENT_FACTOR) -> torch.Tensor:
    """Loss weight [1, h, w] at latent size from an L mask already sized like the training image (w, h = target).

    A1111 normalises to min 0, mean 1; a uniform mask (or none) gives all ones. Sized (w, h) for PIL and read back
    as (h, w), so non-square maps keep their orientation (A1111 transposes them)."""
    lw, lh = target[0] // factor, target[1] // factor
    if alpha is None:
        return torch.ones(1, lh, lw)
    w = np.asarray(alpha.resize((lw, lh), resample=RESAMPLE), dtype=np.float32) / 255.0
    w = w - w.min()
    mean = float(w.mean())
    if mean <= 0:
        return torch.ones(1, lh, lw)
    return torch.from_numpy(w / mean).reshape(1, lh, lw)


def geometry_sizes(geom: Geometry) -> dict:
    left = geom.resize[0] - geom.left - geom.target[0] if geom.flip else geom.left
    return {"original_size": (geom.source[1], geom.source[0]), "crop_top_left": (geom.top, left),
            "target_size": (geom.target[1], geom.target[0])}


def make_item(ctx: ItemContext, use: Use, epoch: int, position: int) -> dict:
    """One use at global ``position`` of ``epoch``: flip, crop and prompt drawn from (seed, epoch, position)."""
    cfg = ctx.cfg
    rng = item_rng(ctx.seed, epoch, position)
    flip = cfg.flip_p > 0 and bool(rng.random() < cfg.flip_p)
    caption = use.caption()
    store, key, entry = ctx.latents, None, None
    if store is not None:
        key = store.key(use.image_id(), use.target, cfg.crop_mode, flip)
        if store.keep:
            entry = store.lookup(key, need_weight=cfg.use_alpha_as_loss_weight)
    if entry is not None and len(entry.sizes) == 3:
        item = {"latents": store.draw(entry, key, latent_seed(ctx.seed, epoch, position)), **entry.sizes}
        if cfg.use_alpha_as_loss_weight:
            item["loss_weights"] = entry.weight
    else:
        loaded = use.load()
        geom = plan_geometry(loaded.rgb.size, use.target, cfg.crop_mode, rng, flip)
        item = {"pixel_values": pixels(apply_geometry(loaded.rgb, geom)), **geometry_sizes(geom)}
        if cfg.use_alpha_as_loss_weight:
            alpha = apply_geometry(loaded.alpha, geom) if loaded.alpha is not None else None
            item["loss_weights"] = alpha_to_weight(alpha, geom.target)
    item.update(prompts=build_prompt(caption, ctx.lines, ctx.prompt, rng), captions=caption, index=use.index,
                latent_key=key)
    return item


def collate(items: list[dict], skipped: list) -> dict:
    out: dict = {}
    hits = [k for k, it in enumerate(items) if "latents" in it]
    misses = [k for k, it in enumerate(items) if "latents" not in it]
    if hits:
        out["latents"] = torch.stack([items[k]["latents"] for k in hits])
        out["latent_slots"] = hits
    if misses:
        out["pixel_values"] = torch.stack([items[k]["pixel_values"] for k in misses])
        out["pixel_slots"] = misses
    if "loss_weights" in items[0]:
        out["loss_weights"] = torch.stack([it["loss_weights"] for it in items])
    for k in ("original_size", "crop_top_left", "target_size"):
        out[k] = torch.tensor([it[k] for it in items], dtype=torch.long)
    out["prompts"] = [it["prompts"] for it in items]
    out["captions"] = [it["captions"] for it in items]
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    out["latent_keys"] = [it["latent_key"] for it in items]
    out["skipped"] = skipped
    return out
