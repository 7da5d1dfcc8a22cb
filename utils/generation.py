"""Text-to-image through a diffusers pipeline, A1111 style: embeddings by name, A1111 samplers, seeds, infotext.

Used by inference.py and by the trainers' previews, so it never touches the global torch RNG: every image gets its own
CPU ``torch.Generator`` seeded with its seed (image i of a run uses seed + i, as A1111), which also makes an image
depend only on its seed, not on the device or on which batch it was in.
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from utils.errors import UserError
from utils.infotext import format_infotext
from utils.prompts import PromptEncoder, ti_hashes
from utils.samplers import build_scheduler, check_generation, resolve_sampler_name

MAX_SEED = 4294967294  # A1111 draws random seeds from [0, 2**32 - 2)


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = -1  # -1: a random seed
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1


@dataclass
class GeneratedImage:
    image: object  # PIL.Image.Image
    seed: int
    infotext: str


def resolve_seed(seed: int | None) -> int:
    """A1111: None or -1 means a random seed (drawn without touching any RNG the run depends on)."""
    if seed is None or int(seed) == -1:
        return secrets.randbelow(MAX_SEED)
    return int(seed)


def validate(params: GenerationParams, multiple: int = 8) -> None:
    check_generation(params.steps, params.cfg_scale, params.batch_size, params.n_iter, params.sampler,
                     {"width": params.width, "height": params.height}, multiple)


def _number(value: float):
    """7.0 -> 7 (how A1111's infotext shows whole numbers), 7.5 stays."""
    return int(value) if float(value).is_integer() else value


def infotext_params(params: GenerationParams, sampler: str, seed: int, model_identity, embeddings: dict) -> dict:
    return {
        "Steps": params.steps,
        "Sampler": sampler,
        "CFG scale": _number(params.cfg_scale),
        "Seed": seed,
        "Size": f"{params.width}x{params.height}",
        "Model hash": getattr(model_identity, "shorthash", None),
        "Model": getattr(model_identity, "name", None),
        "RNG": "CPU",  # initial noise is drawn per image on the CPU, like A1111's "RNG: CPU" setting
        "TI hashes": ti_hashes(embeddings),
    }


@contextmanager
def _scheduler(pipeline, scheduler):
    original = pipeline.scheduler
    pipeline.scheduler = scheduler
    try:
        yield
    finally:
        pipeline.scheduler = original


def _vae_multiple(pipeline) -> int:
    return int(getattr(pipeline, "vae_scale_factor", 8) or 8)


class HypernetworkLibrary:
    """Hypernetworks by name from folders (``<hypernet:NAME:MULT>`` in prompts), each file loaded once per version."""

    def __init__(self, dirs: list):
        self.dirs = list(dirs)
        self._cache: dict[str, tuple[tuple, object]] = {}

    def get(self, name: str):
        import os

        from utils.hypernetwork import list_hypernetworks, load_hypernetwork

        found = list_hypernetworks(self.dirs)
        if name not in found:
            known = ", ".join(found) or "none"
            raise UserError(f"hypernetwork {name!r} not found in {', '.join(map(str, self.dirs))} (available: {known})")
        path = found[name]
        st = os.stat(path)
        stamp = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._cache.get(name)
        if cached is None or cached[0] != stamp:
            self._cache[name] = (stamp, load_hypernetwork(path))
        return self._cache[name][1]


@contextmanager
def _hypernetworks(unet, pairs: list):
    """Install ``[(Hypernetwork, multiplier)]`` for one generation; put back exactly the processors found."""
    if not pairs:
        yield
        return
    from utils.hypernetwork import install_hypernetworks

    saved = dict(unet.attn_processors)
    for hn, _ in pairs:
        hn.to(device=unet.device)  # stays float32 as in A1111; the processor casts
    install_hypernetworks(unet, pairs)
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def split_hypernet_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(text for the text encoder, [(name, multiplier)]) — A1111's ``<hypernet:…>`` tags never reach CLIP."""
    from utils.hypernetwork import parse_hypernet_tags

    return parse_hypernet_tags(prompt)


def generate(loaded_model, encoder: PromptEncoder, params: GenerationParams, refresh_embeddings: bool = True,
             progress: bool = True, hypernetworks: HypernetworkLibrary | None = None) -> list[GeneratedImage]:
    """Render ``params.batch_size * params.n_iter`` images.

    ``loaded_model`` needs ``.pipeline`` and ``.identity`` (``name``, ``shorthash``) as utils.models' LoadedModel.
    ``refresh_embeddings``: re-check the embedding folders first (A1111 does before every generation; previews skip).
    ``hypernetworks``: where ``<hypernet:NAME:MULT>`` tags in the prompt are looked up (tags stay in the infotext).
    """
    pipeline = loaded_model.pipeline
    validate(params, _vae_multiple(pipeline))
    sampler = resolve_sampler_name(params.sampler)
    prompt_text, tags = split_hypernet_tags(params.prompt)
    if tags and hypernetworks is None:
        raise UserError(f"the prompt uses <hypernet:{tags[0][0]}> but no hypernetwork folder is set")
    pairs = [(hypernetworks.get(name), mult) for name, mult in tags]
    if refresh_embeddings:
        encoder.refresh()
    seed = resolve_seed(params.seed)
    scheduler = build_scheduler(sampler, pipeline.scheduler.config)
    bs = params.batch_size
    pipeline.set_progress_bar_config(disable=not progress)

    results: list[GeneratedImage] = []
    with torch.no_grad(), _scheduler(pipeline, scheduler), _hypernetworks(pipeline.unet, pairs):
        cond, uncond = encoder.encode_pair([prompt_text] * bs, [params.negative_prompt] * bs)
        used = dict(encoder.used_embeddings)
        conditioning = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds}
        if cond.pooled is not None:
            conditioning.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
        for iteration in range(params.n_iter):
            seeds = [seed + iteration * bs + i for i in range(bs)]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            latents = pipeline(
                num_inference_steps=params.steps, guidance_scale=params.cfg_scale, width=params.width,
                height=params.height, generator=generators, output_type="latent", **conditioning,
            ).images
            images = decode_latents(pipeline, latents)
            for image, s in zip(images, seeds):
                info = format_infotext(params.prompt, params.negative_prompt,
                                       infotext_params(params, sampler, s, loaded_model.identity, used))
                results.append(GeneratedImage(image, s, info))
    return results


def decode_latents(pipeline, latents: torch.Tensor) -> list:
    """Latents -> PIL images with the VAE in its own dtype and device.

    Training keeps the VAE in float32 (fp16 VAEs overflow) while the UNet may run in fp16, and the pipelines'
    own decode step assumes both share a dtype; decoding here works for any combination. An fp16 VAE whose config
    sets ``force_upcast`` (SDXL's: its activations overflow fp16 and the image comes out black) decodes in float32
    and is put back in fp16 afterwards (an exact round trip)."""
    vae = pipeline.vae
    cfg = vae.config
    upcast = vae.dtype == torch.float16 and bool(getattr(cfg, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        pixels = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")


def grid_rows(count: int) -> int:
    """A1111's automatic grid rows: the largest divisor of ``count`` not above its square root."""
    rows = max(1, int(count ** 0.5))
    while count % rows:
        rows -= 1
    return rows


def image_grid(images: list, rows: int | None = None):
    """All ``images`` (same size) in one picture, row by row."""
    from PIL import Image

    rows = rows or grid_rows(len(images))
    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def next_image_number(folder, prefix: str = "") -> int:
    """A1111 numbering: one more than the largest leading number of ``<prefix>NNNNN…`` files in ``folder``."""
    import os
    import re

    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)")
    numbers = [int(m.group(1)) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
               if (m := pattern.match(name))]
    return max(numbers, default=-1) + 1
