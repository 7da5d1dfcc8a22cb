"""Tiny random-weight Stable Diffusion pipelines, built offline, for tests and the demo.

They have the real architecture families' shapes where it matters to users (text widths 768 / 1024 / 768+1280 so
real embedding files load; the real CLIP vocabulary) and are otherwise as small as possible so a CPU can train on
them in seconds. Builds are seeded and cached under ``cache_root()/tiny-models``. Only the standard library at module
level: ``tiny_model_dir`` serves ``--demo`` before the flags are checked.

The command line is tools/tiny_models.py (``python -m tools.tiny_models --family sd1 --out DIR``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from utils.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, build_clip_tokenizer, cache_root

FAMILIES = ("sd1", "sd1-768", "sd2", "sdxl")
_BUILD_VERSION = "1"  # bump when a recipe below changes, so stale caches are rebuilt


@dataclass(frozen=True)
class TinySpec:
    text_width: int
    text_layers: int
    text_heads: int
    open_clip_padding: bool
    linear_projection: bool
    prediction_type: str


SPECS = {
    "sd1": TinySpec(32, 2, 4, False, False, "epsilon"),
    "sd1-768": TinySpec(768, 1, 12, False, False, "epsilon"),
    "sd2": TinySpec(1024, 1, 16, True, True, "v_prediction"),
}


def _text_config(width: int, layers: int, heads: int, projection_dim: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=max(37, width // 8),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection_dim or width,
        hidden_act=act,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks, so latents are 1/8 of the image as in real SD (a 2-block VAE makes training much slower).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def _unet(cross_attention_dim: int, linear_projection: bool, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 1280,
            transformer_layers_per_block=(1, 1),
        )
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(4, 8),
        norm_num_groups=32,
        use_linear_projection=linear_projection,
        **extra,
    )


def _sd_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, set_alpha_to_one=False)
    if prediction_type == "v_prediction":  # SD-2.x 768-v ships DDIM with v-prediction
        return DDIMScheduler(clip_sample=False, prediction_type="v_prediction", **common)
    return PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon", **common)


def build_pipeline(family: str, seed: int = 0):
    """A random-weight pipeline of one family (not saved)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family == "sdxl":
        text_encoder = CLIPTextModel(_text_config(768, 1, 12))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(1280, 1, 20, projection_dim=1280, act="gelu"))
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=build_clip_tokenizer(False), tokenizer_2=build_clip_tokenizer(True),
            unet=_unet(768 + 1280, True, sdxl=True), scheduler=scheduler,
        )
    spec = SPECS[family]
    text_encoder = CLIPTextModel(_text_config(spec.text_width, spec.text_layers, spec.text_heads,
                                              act="gelu" if spec.open_clip_padding else "quick_gelu"))
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=build_clip_tokenizer(spec.open_clip_padding),
        unet=_unet(spec.text_width, spec.linear_projection), scheduler=_sd_scheduler(spec.prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_model(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny pipeline into ``out_dir`` (written to a temp folder, then renamed)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_pipeline(family, seed).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_model_dir(family: str = "sd1", seed: int = 0) -> Path:
    """Where a tiny model is cached (it may not be built yet); the standard library only."""
    return cache_root() / "tiny-models" / f"{family}-s{seed}-v{_BUILD_VERSION}"


def tiny_model_path(family: str = "sd1", seed: int = 0) -> Path:
    """The cached folder of a tiny model, built on first use."""
    out = tiny_model_dir(family, seed)
    if not (out / "model_index.json").is_file():
        save_tiny_model(family, out, seed)
    return out


if __name__ == "__main__":
    raise SystemExit("python -m utils.tiny_models moved: use python -m tools.tiny_models")
