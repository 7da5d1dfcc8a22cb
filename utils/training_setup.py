"""Setting up what the loop trains on: the frozen model on the device, the noise scheduler and the batch source.

Each function does one step of the recipe the scripts spell out; nothing here knows which trainer is calling. The
run's start and end are in utils/run.py, previews in utils/previews.py, the run's common files in utils/outputs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils.data import DataConfig, PromptConfig, TrainLoader
from utils.data.plan import latent_seed, sample_positions
from utils.latents import LatentConfig, LatentEncoder, LatentStore, model_vae_identity
from utils.models import LoadedModel, ModelSource, enable_xformers, load_pipeline, set_tf32, weight_dtype

DEFAULT_MAX_TRAIN_STEPS = 3000


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
    (fp16 VAEs overflow to NaN on SDXL, and it only runs once per image when latents are cached). Each component is
    loaded in its dtype: every rank of a node loads at once, and a float32 pipeline first would double host RAM."""
    dtype = weight_dtype(opts.mixed_precision)
    loaded = load_pipeline(source, dtype, vae_dtype=torch.float32)
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
    """The loop's BatchSource over utils.data: completes each batch's latents (the images the cache did not have are
    encoded now, kept, and sampled as A1111's --latent_sampling says) and builds SDXL's size conditioning.

    ``loader``: a TrainLoader (or anything with its attributes and ``iter_epoch()``); its ``latents`` store, when
    it has one, is where new latents go. Without one nothing is kept and every use is encoded."""

    def __init__(self, loader: TrainLoader, vae, seed: int, sdxl: bool, latent_sampling: str = "random"):
        self.loader = loader
        self.vae = vae
        self.seed = seed
        self.sdxl = sdxl
        store = getattr(loader, "latents", None)
        if not isinstance(store, LatentStore):
            store = LatentStore.for_vae(vae, LatentConfig(latent_sampling), keep=False)
        self.encoder = LatentEncoder(vae, store)
        self.micro_batches_per_epoch = loader.steps_per_epoch

    def iter_epoch(self, epoch: int, skip: int):
        loader = self.loader
        loader.epoch, loader.position = epoch, skip
        batches = loader.iter_epoch()
        try:
            yield from self._complete(batches, epoch)
        except GeneratorExit:  # the loop is done with the data: stop the pipeline (and its workers) now
            getattr(loader, "close", lambda: None)()
            raise

    def _complete(self, batches, epoch: int):
        loader = self.loader
        for batch in batches:
            if "positions" not in batch:
                batch["positions"] = sample_positions(loader.position - 1, loader.rank, loader.batch_size,
                                                      loader.world_size)
            seeds = batch.get("latent_seeds") or [latent_seed(self.seed, epoch, p) for p in batch["positions"]]
            batch["latents"] = self.encoder.complete(batch, seeds)
            batch.pop("pixel_values", None)
            if self.sdxl:
                batch["add_time_ids"] = torch.cat(
                    [batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()
            yield batch


def latent_store(loaded: LoadedModel, latent_cfg: LatentConfig, keep: bool) -> LatentStore:
    """The latent cache of the loaded model's VAE (its identity: the model's hash or name, and a --vae's files)."""
    vae = loaded.pipeline.vae
    identity = model_vae_identity(vae, loaded.identity.sha256 or loaded.identity.name, loaded.vae_source)
    return LatentStore.for_vae(vae, latent_cfg, identity=identity, keep=keep)


def build_batch_source(accelerator, summary, data_cfg: DataConfig, prompt_cfg: PromptConfig,
                       latent_cfg: LatentConfig, loaded: LoadedModel, *, batch_size: int, seed: int,
                       num_workers: int, cache_latents: bool, report_file: Path, accumulation: int = 1
                       ) -> LoaderSource:
    """The rank's batches. Latents are encoded as training first meets each image and kept (in memory, or in
    --cache_latents_to_disk shared by ranks and reruns) unless told not to; --random_crop keeps none."""
    vae = loaded.pipeline.vae
    store = latent_store(loaded, latent_cfg, keep=cache_latents and not data_cfg.random_crop)
    loader = TrainLoader(summary, data_cfg, prompt_cfg, batch_size=batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, seed=seed, num_workers=num_workers, latents=store,
                         report_file=report_file if accelerator.is_main_process else
                         report_file.with_name(f"{report_file.stem}.rank{accelerator.process_index}{report_file.suffix}"),
                         accumulation=accumulation, progress=accelerator.is_local_main_process)
    return LoaderSource(loader, vae, seed, loaded.family == "sdxl", latent_cfg.latent_sampling)


def resolve_max_steps(max_train_steps: int | None, num_train_epochs: int | None, steps_per_epoch: int,
                      initial_step: int = 0) -> int:
    """--max_train_steps is absolute (A1111); --num_train_epochs counts from where a continued file stands."""
    if max_train_steps is not None:
        return max_train_steps
    if num_train_epochs is not None:
        return initial_step + num_train_epochs * steps_per_epoch
    return DEFAULT_MAX_TRAIN_STEPS
