"""Preview images during training: the options, and rendering them with the run's own prompt encoder.

Generation uses its own generators, so previews never touch the training RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils.models import LoadedModel


@dataclass
class PreviewOptions:
    prompt: str | None
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = 0
    num_images: int = 1
    width: int = 512
    height: int = 512



def render_previews(device, loaded: LoadedModel, encoder, opts: PreviewOptions, out_dir: Path, name: str,
                    step: int, prompt: str, extra_info: str = "") -> list:
    """Preview images at ``step`` into ``out_dir/images/<name>-<step>-<k>.png`` with infotext; returns (image, caption)
    pairs for the trackers. Models parked off the device (VAE after latent caching, an offloaded text encoder) come
    back for the call and return afterwards; generation uses its own generators, so the training RNG is untouched."""
    from utils.generation import GenerationParams, generate
    from utils.infotext import save_png

    pipe = loaded.pipeline
    moved = []
    for part in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        # The VAE keeps its own dtype (float32); an offloaded text encoder (float32 on the CPU) runs in the UNet's.
        dtype = module.dtype if part == "vae" else pipe.unet.dtype
        if module.device != torch.device(device) or module.dtype != dtype:
            moved.append((module, module.device, module.dtype))
            module.to(device, dtype=dtype)
    try:
        images = generate(loaded, encoder, GenerationParams(
            prompt=prompt, negative_prompt=opts.negative_prompt, steps=opts.steps, sampler=opts.sampler,
            cfg_scale=opts.cfg_scale, seed=opts.seed, width=opts.width, height=opts.height,
            batch_size=opts.num_images), refresh_embeddings=True, progress=False)
    finally:
        for module, where, dtype in moved:
            module.to(where, dtype=dtype)
    out = []
    for k, im in enumerate(images):
        save_png(im.image, out_dir / "images" / f"{name}-{step}-{k}.png", im.infotext + extra_info)
        out.append((im.image, f"step {step}: {prompt}"))
    return out



class Previewer:
    """Renders a run's previews through one prompt encoder kept for the run (main process only)."""

    def __init__(self, device, loaded: LoadedModel, opts: PreviewOptions, out_dir: Path, name: str):
        self.device = device
        self.loaded = loaded
        self.opts = opts
        self.out_dir = out_dir
        self.name = name
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from utils.prompts import EmbeddingDatabase, PromptEncoder

            self._encoder = PromptEncoder(self.loaded.pipeline, EmbeddingDatabase([]))
        return self._encoder

    @encoder.setter
    def encoder(self, encoder) -> None:  # previewers of one model may share one (several embeddings in one run)
        self._encoder = encoder

    def render(self, step: int, default_prompt: str, extra_info: str = "") -> list:
        return render_previews(self.device, self.loaded, self.encoder, self.opts, self.out_dir, self.name, step,
                               self.opts.prompt or default_prompt, extra_info)
