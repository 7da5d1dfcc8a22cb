"""The steps both trainer scripts take around the loop: data flags, the model on the device, the batch source, previews.

Each function does one step of the recipe the scripts spell out; nothing here knows which trainer is calling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils.data import DataConfig, PromptConfig, TrainLoader, scan_dataset
from utils.data.plan import latent_seed, optimizer_steps_per_epoch, sample_positions
from utils.latents import LatentConfig, LatentEncoder, LatentStore, vae_identity
from utils.models import LoadedModel, ModelSource, enable_xformers, load_pipeline, set_tf32, weight_dtype
from utils.training import make_accelerator

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


def build_batch_source(accelerator, summary, data_cfg: DataConfig, prompt_cfg: PromptConfig,
                       latent_cfg: LatentConfig, loaded: LoadedModel, *, batch_size: int, seed: int,
                       num_workers: int, cache_latents: bool, report_file: Path, accumulation: int = 1
                       ) -> LoaderSource:
    """The rank's batches. Latents are encoded as training first meets each image and kept (in memory, or in
    --cache_latents_to_disk shared by ranks and reruns) unless told not to; --random_crop keeps none."""
    vae = loaded.pipeline.vae
    identity = vae_identity(vae, loaded.identity.sha256 or loaded.identity.name)
    store = LatentStore.for_vae(vae, latent_cfg, identity=identity,
                                keep=cache_latents and not data_cfg.random_crop)
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


def write_settings(out_dir: Path, settings: dict, step: int) -> Path:
    """``training_settings.json``: every option of the run and what it resolved to, plus the final step."""
    import json

    from utils.fileio import write_text_atomic

    path = out_dir / "training_settings.json"
    write_text_atomic(path, json.dumps({**settings, "final_step": step}, indent=4, default=str))
    return path


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


class RunOutputs:
    """What both trainers' output writers share: where files go, the settings, and previews rendered through one
    prompt encoder kept for the run. Subclasses add ``save(step)`` and ``final(step, optimizer)``."""

    def __init__(self, accelerator, trainable, loaded: LoadedModel, out_dir: Path, preview: PreviewOptions, *,
                 settings: dict, save_optimizer_state: bool = False):
        self.accelerator = accelerator
        self.trainable = trainable
        self.loaded = loaded
        self.out_dir = out_dir
        self.preview_opts = preview
        self.settings = settings
        self.save_optimizer_state = save_optimizer_state
        self._encoder = None

    def callbacks(self, previews: bool = True):
        from utils.training import Outputs

        return Outputs(save=self.save, final=self.final, preview=self.preview if previews else None)

    def preview_encoder(self):
        if self._encoder is None:
            from utils.prompts import EmbeddingDatabase, PromptEncoder

            self._encoder = PromptEncoder(self.loaded.pipeline, EmbeddingDatabase([]))
        return self._encoder

    def render(self, step: int, default_prompt: str, extra_info: str = "") -> list:
        return render_previews(self.accelerator.device, self.loaded, self.preview_encoder(), self.preview_opts,
                               self.out_dir, self.trainable.name, step, self.preview_opts.prompt or default_prompt,
                               extra_info)


# ---------------------------------------------------------------------------------------------------------------
# Start and end of a run


def start_run(out_dir: Path, mixed_precision: str | None, gradient_accumulation_steps: int, report_to: str, seed: int,
              ddp_timeout: float | None, data_cfg: DataConfig, prompt_cfg: PromptConfig, logging_dir: str = "logs"):
    """The accelerator (one thread budget per rank) and the data scan, which fails before any model is loaded."""
    from utils.cluster import apply_threads_per_rank

    accelerator = make_accelerator(out_dir, mixed_precision, gradient_accumulation_steps, report_to, seed,
                                   ddp_timeout=ddp_timeout, logging_dir=logging_dir)
    apply_threads_per_rank()
    report = out_dir / "skipped_images.txt"
    summary = scan_dataset(data_cfg, prompt_cfg, report_file=report if accelerator.is_main_process else None)
    accelerator.print(summary.describe())
    return accelerator, summary


def plan_batches(accelerator, summary, data_cfg: DataConfig, prompt_cfg: PromptConfig, latent_cfg: LatentConfig,
                 loaded: LoadedModel, out_dir: Path, *, batch_size: int, accumulation: int, seed: int,
                 num_workers: int, cache_latents: bool, max_train_steps: int | None, num_train_epochs: int | None,
                 report_to: str, ddp_timeout: float | None, initial_step: int = 0) -> tuple[LoaderSource, int]:
    """The batch source, the number of optimizer steps to train to, and the printed plan."""
    batches = build_batch_source(accelerator, summary, data_cfg, prompt_cfg, latent_cfg, loaded,
                                 batch_size=batch_size, seed=seed, num_workers=num_workers,
                                 cache_latents=cache_latents, report_file=out_dir / "skipped_images.txt",
                                 accumulation=accumulation)
    steps_per_epoch = optimizer_steps_per_epoch(batches.micro_batches_per_epoch, accumulation)
    max_steps = resolve_max_steps(max_train_steps, num_train_epochs, steps_per_epoch, initial_step)
    print_run_plan(accelerator, loaded, summary, out_dir, batch_size=batch_size, accumulation=accumulation,
                   max_steps=max_steps, steps_per_epoch=steps_per_epoch, num_workers=num_workers,
                   report_to=report_to, ddp_timeout=ddp_timeout)
    return batches, max_steps


def print_run_plan(accelerator, loaded: LoadedModel, summary, out_dir: Path, *, batch_size: int, accumulation: int,
                   max_steps: int, steps_per_epoch: int, num_workers: int, report_to: str,
                   ddp_timeout: float | None) -> None:
    from utils.cluster import attention_backend, run_plan

    accelerator.print(run_plan(
        accelerator, train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_train_steps=max_steps, steps_per_epoch=steps_per_epoch, attention=attention_backend(loaded.pipeline.unet),
        dataset_examples=summary.num_examples, dataset_kind=summary.kind, dataloader_num_workers=num_workers,
        output_dir=out_dir, trackers=report_to, ddp_timeout=ddp_timeout).describe())


def finish_run(accelerator, result, name: str, kind: str, out_dir: Path, hub=None) -> None:
    """Final files as a W&B artifact (when W&B is on), trackers closed, the model card written (README.md) and, with
    ``hub`` (a utils.hub.HubTarget from --push_to_hub), published; then what the output folder holds."""
    from utils.cluster import log_output_artifact

    log_output_artifact(accelerator, name, kind, result.files, {"step": result.step})
    run_link = tracker_run_link(accelerator)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    from utils import hub as hub_card

    out_dir = Path(out_dir)
    settings = hub_card.read_settings(out_dir)
    hub_card.write_model_card(out_dir, hub_card.card_info(out_dir, settings, run_link=run_link))
    print(f"Done at step {result.step} ({result.stopped_by}). Outputs in {out_dir.resolve()}:")
    for line in describe_outputs(out_dir, result.files):
        print(f"  {line}")
    if hub is None:
        return
    if result.stopped_by == "signal":
        print("Not published: the run was stopped before its end; it is published when a resumed run finishes.")
        return
    try:
        repo_id = hub_card.publish(out_dir, hub, run_link=run_link)
    except Exception as e:  # network, permissions, quota: the run itself is done and saved
        from utils.errors import UserError

        raise UserError(f"training finished and everything is saved in {out_dir}, but the upload to the Hub failed "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); publish it later with: "
                        f"python -m utils.hub {out_dir}" + (f" --hub_model_id {hub.repo_id}" if hub.repo_id else "")
                        ) from None
    print(f"Published: https://huggingface.co/{repo_id}")


def tracker_run_link(accelerator) -> str | None:
    """The W&B run's page, or where an offline run waits for `wandb sync` (None without W&B)."""
    if not accelerator.is_main_process:
        return None
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return None
    if run is None or not hasattr(run, "id"):
        return None
    url = getattr(run, "url", None)
    if url:
        return url
    run_dir = Path(getattr(run, "dir", "") or ".").parent
    return f"W&B run `{run.id}` (offline; upload it with `wandb sync {run_dir}`)"


def describe_outputs(out_dir: Path, files: list[Path]) -> list[str]:
    """The output folder after a run: the final files first, then every other entry, a folder with the number of files
    in it and the checkpoints on one line (hidden entries, e.g. unfinished temp files, are left out)."""
    out_dir = Path(out_dir)
    final = [Path(f) for f in files if Path(f).parent == out_dir and Path(f).exists()]
    lines = [f.name for f in final]
    checkpoints = []
    for entry in sorted(out_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry in final:
            continue
        if entry.is_dir() and entry.name.startswith("checkpoint-"):
            checkpoints.append(entry)
        elif entry.is_dir():
            n = sum(1 for p in entry.rglob("*") if p.is_file())
            lines.append(f"{entry.name}/ ({n} file{'s' if n != 1 else ''})")
        else:
            lines.append(entry.name)
    if checkpoints:
        checkpoints.sort(key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
        lines.append(" ".join(f"{c.name}/" for c in checkpoints) + "  (resume with --resume_from_checkpoint latest)")
    return lines
