"""The steps both trainer scripts take around the loop: data flags, the model on the device, the batch source, previews.

Each function does one step of the recipe the scripts spell out; nothing here knows which trainer is calling.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.data import DataConfig, PromptConfig, TrainLoader, check_latents, prepare_latents, scan_dataset
from utils.diffusion_loss import sample_seed
from utils.errors import UserError
from utils.latents import LatentConfig, encode_pixels, vae_identity
from utils.models import LoadedModel, ModelSource, enable_xformers, load_pipeline, set_tf32, weight_dtype

DEFAULT_MAX_TRAIN_STEPS = 3000


# ---------------------------------------------------------------------------------------------------------------
# Flags


def add_data_args(p: argparse.ArgumentParser, default_template: str | None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", help="Folder of training images, with optional <stem>.txt captions beside them.")
    g.add_argument("--recursive", action="store_true", help="Include images in sub-folders of --train_data_dir.")
    g.add_argument("--dataset_name", help="Hub dataset id (online) or a local parquet/arrow/imagefolder/WebDataset "
                                          "path, read as a stream.")
    g.add_argument("--dataset_config_name", help="Dataset configuration name (Hub datasets).")
    g.add_argument("--image_column", help="Image column of --dataset_name (default: detected).")
    g.add_argument("--caption_column", help="Caption column of --dataset_name (default: detected).")
    g.add_argument("--filename_word_regex", default="",
                   help="Caption from file name: join the matches of this regex (A1111's dataset_filename_word_regex).")
    g.add_argument("--filename_join_string", default=" ", help="Joins the --filename_word_regex matches.")
    g.add_argument("--resolution", type=int, default=512, help="Training width = height (multiple of 8).")
    g.add_argument("--width", type=int, default=None, help="Training width (overrides --resolution).")
    g.add_argument("--height", type=int, default=None, help="Training height (overrides --resolution).")
    g.add_argument("--center_crop", action="store_true",
                   help="Keep the aspect ratio: scale to cover and cut the middle (default: A1111's stretch).")
    g.add_argument("--random_crop", action="store_true", help="Like --center_crop but at a random place each use "
                                                              "(latents are then encoded every step).")
    g.add_argument("--enable_buckets", action="store_true", help="Aspect-ratio buckets; every batch from one bucket.")
    g.add_argument("--min_bucket_reso", type=int, default=256)
    g.add_argument("--max_bucket_reso", type=int, default=1024)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--bucket_no_upscale", action="store_true", help="Never put an image in a bigger bucket.")
    g.add_argument("--flip_p", type=float, default=0.0, help="Probability of a left-right mirror per use.")
    g.add_argument("--use_alpha_as_loss_weight", action="store_true",
                   help="PNG alpha channel becomes a per-pixel loss weight (A1111's 'use PNG alpha').")
    g.add_argument("--repeats", type=int, default=1, help="Uses of each image per epoch.")
    g.add_argument("--verify_images", action="store_true", help="Decode every image during the start-up scan.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes per rank.")
    g = p.add_argument_group("prompts")
    g.add_argument("--template_file", default=default_template,
                   help="Prompt template: a name in templates/ (style, style_filewords, subject, subject_filewords, "
                        "hypernetwork, none) or a path. [name] and [filewords] are replaced.")
    g.add_argument("--learnable_property", choices=["object", "style"], default="object",
                   help="Without --template_file: subject or style templates (diffusers' flag).")
    g.add_argument("--caption_only", action="store_true", help="Use each image's caption as the prompt, no template.")
    g.add_argument("--shuffle_tags", action="store_true", help="Shuffle comma-separated caption tags each use.")
    g.add_argument("--tag_dropout", type=float, default=0.0, help="Drop each caption tag with this probability.")
    g = p.add_argument_group("latents")
    g.add_argument("--latent_sampling", choices=["once", "deterministic", "random"], default="once",
                   help="A1111's latent sampling: one stored sample, the mean, or a fresh sample per use.")
    g.add_argument("--cache_latents_to_disk", default=None, metavar="DIR",
                   help="Keep encoded latents in DIR (reused by reruns and shared by ranks).")
    g.add_argument("--no_cache_latents", action="store_true", help="Encode with the VAE every step.")


def data_options(a: argparse.Namespace, placeholder: str) -> tuple[DataConfig, PromptConfig, LatentConfig]:
    width = a.width or a.resolution
    height = a.height or a.resolution
    data = DataConfig(
        train_data_dir=a.train_data_dir, dataset_name=a.dataset_name, dataset_config_name=a.dataset_config_name,
        image_column=a.image_column, caption_column=a.caption_column, recursive=a.recursive,
        filename_word_regex=a.filename_word_regex, filename_join_string=a.filename_join_string, width=width,
        height=height, center_crop=a.center_crop, random_crop=a.random_crop, enable_buckets=a.enable_buckets,
        min_bucket_reso=a.min_bucket_reso, max_bucket_reso=a.max_bucket_reso, bucket_reso_steps=a.bucket_reso_steps,
        bucket_no_upscale=a.bucket_no_upscale, flip_p=a.flip_p, use_alpha_as_loss_weight=a.use_alpha_as_loss_weight,
        repeats=a.repeats, verify_images=a.verify_images)
    prompt = PromptConfig(placeholder=placeholder, template_file=a.template_file,
                          learnable_property=a.learnable_property, caption_only=a.caption_only,
                          shuffle_tags=a.shuffle_tags, tag_dropout=a.tag_dropout)
    latents = LatentConfig(latent_sampling=a.latent_sampling, cache_dir=a.cache_latents_to_disk)
    return data, prompt, latents


def model_source(a: argparse.Namespace) -> ModelSource:
    if not a.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (or --demo for the built-in tiny model)")
    return ModelSource(a.pretrained_model_name_or_path, a.revision, a.variant, a.vae, a.model_config)


# ---------------------------------------------------------------------------------------------------------------
# The model on the device


@dataclass
class ModelOptions:
    mixed_precision: str
    gradient_checkpointing: bool = False
    xformers: bool = False
    allow_tf32: bool = False
    prediction_type: str | None = None


def load_model_for_training(source: ModelSource, opts: ModelOptions, device) -> LoadedModel:
    """Load, freeze and place the frozen models. UNet and text encoders in the weight dtype; the VAE stays float32
    (fp16 VAEs overflow to NaN on SDXL, and it only runs once per image when latents are cached)."""
    dtype = weight_dtype(opts.mixed_precision)
    loaded = load_pipeline(source, torch.float32)
    pipe = loaded.pipeline
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            target = torch.float32 if name == "vae" else dtype
            module.to(device) if module.dtype == target else module.to(device, dtype=target)
    if opts.allow_tf32:
        set_tf32(True)
    if opts.xformers:
        enable_xformers(pipe.unet)
    if opts.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if opts.prediction_type:
        loaded.prediction_type = opts.prediction_type
    return loaded


def training_noise_scheduler(loaded: LoadedModel):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(loaded.pipeline.scheduler.config)
    sched.register_to_config(prediction_type=loaded.prediction_type)
    return sched


# ---------------------------------------------------------------------------------------------------------------
# Batches


class LoaderSource:
    """The loop's BatchSource over utils.data: adds each sample's global position (for its noise seed), encodes
    pixels when latents are not cached, and builds SDXL's size conditioning."""

    def __init__(self, loader: TrainLoader, vae, seed: int, sdxl: bool):
        self.loader = loader
        self.vae = vae
        self.seed = seed
        self.sdxl = sdxl
        self.micro_batches_per_epoch = loader.steps_per_epoch
        self.global_micro_batch = loader.batch_size * loader.world_size

    def iter_epoch(self, epoch: int, skip: int):
        self.loader.epoch, self.loader.position = epoch, skip
        for batch in self.loader.iter_epoch():
            j = self.loader.position - 1
            b = len(batch["prompts"])
            start = j * self.global_micro_batch + self.loader.rank * b
            batch["positions"] = list(range(start, start + b))
            if "latents" not in batch:
                batch["latents"] = self._encode(batch["pixel_values"], epoch, batch["positions"])
            if self.sdxl:
                batch["add_time_ids"] = torch.cat(
                    [batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()
            yield batch

    def _encode(self, pixels: torch.Tensor, epoch: int, positions: list[int]) -> torch.Tensor:
        mean, std = encode_pixels(self.vae, pixels)
        eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
            sample_seed(self.seed + 1, epoch, p))) for p in positions])
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return ((mean + std * eps) - shift) * cfg.scaling_factor


def build_batch_source(accelerator, summary, data_cfg: DataConfig, prompt_cfg: PromptConfig,
                       latent_cfg: LatentConfig, loaded: LoadedModel, *, batch_size: int, seed: int,
                       num_workers: int, cache_latents: bool, report_file: Path) -> LoaderSource:
    """Cache latents (work split across ranks) unless told not to, then move the VAE off the device."""
    vae = loaded.pipeline.vae
    cached = None
    if cache_latents and not data_cfg.random_crop:
        identity = vae_identity(vae, loaded.identity.sha256 or loaded.identity.name)
        cached = prepare_latents(summary, data_cfg, vae, latent_cfg, identity=identity,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes,
                                 progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        if latent_cfg.cache_dir:
            check_latents(cached)
        vae.to("cpu")  # no longer needed on the GPU until previews
    loader = TrainLoader(summary, data_cfg, prompt_cfg, batch_size=batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, seed=seed, num_workers=num_workers, latents=cached,
                         report_file=report_file if accelerator.is_main_process else
                         report_file.with_name(f"{report_file.stem}.rank{accelerator.process_index}{report_file.suffix}"))
    return LoaderSource(loader, vae, seed, loaded.family == "sdxl")


def resolve_max_steps(max_train_steps: int | None, num_train_epochs: int | None, steps_per_epoch: int) -> int:
    if max_train_steps is not None:
        return max_train_steps
    if num_train_epochs is not None:
        return num_train_epochs * steps_per_epoch
    return DEFAULT_MAX_TRAIN_STEPS


def limit_threads_per_rank(num_processes: int) -> None:
    """Several ranks on one CPU machine must not each use every core (2 ranks x 2 threads on 2 cores ran 25x
    slower, field notes). Respect an explicit OMP_NUM_THREADS."""
    if num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))


# ---------------------------------------------------------------------------------------------------------------
# Previews


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
