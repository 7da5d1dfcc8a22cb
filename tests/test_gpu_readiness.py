"""CUDA paths checked on the CPU: fp16 VAE decode, skipped fp16 steps, the offloaded text encoder's dtype, what DDP
wraps and broadcasts, the dtypes models load in, the bench's memory window, xformers messages, bench/gpu_smoke.sh."""

from __future__ import annotations

import numpy as np
import pytest
import torch


# ---------------------------------------------------------------------------------------------------------------
# fp16 VAE decode honours force_upcast


def test_fp16_vae_with_force_upcast_decodes_in_float32(tiny_sd1):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from utils.generation import decode_latents

    vae = AutoencoderKL.from_pretrained(tiny_sd1 / "vae").half().requires_grad_(False)
    reference = AutoencoderKL.from_pretrained(tiny_sd1 / "vae").half().float().requires_grad_(False)  # same weights
    pipe = SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(vae_scale_factor=8))
    # Activations past fp16's range (65504), as SDXL's VAE produces: fp16 gives NaN, i.e. a black picture.
    latents = torch.full((1, 4, 8, 8), 7e4) * vae.config.scaling_factor
    latents[0, 1] *= -0.5

    vae.register_to_config(force_upcast=False)
    black = np.asarray(decode_latents(pipe, latents)[0])
    assert black.max() == 0  # the failure this guards against

    vae.register_to_config(force_upcast=True)
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    image = np.asarray(decode_latents(pipe, latents)[0])
    expected = np.asarray(decode_latents(SimpleNamespace(vae=reference, image_processor=pipe.image_processor),
                                         latents)[0])
    assert image.max() > 0 and np.array_equal(image, expected)
    assert vae.dtype == torch.float16  # put back, bit for bit
    assert all(torch.equal(v, weights[k]) for k, v in vae.state_dict().items())
