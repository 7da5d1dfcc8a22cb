"""Command-line flags shared by the two trainers, turned once into the typed config (utils/config.py); the
conversions of its sections into the library's own dataclasses.

Flag names follow diffusers' example scripts where one exists (so their command lines run unchanged) and A1111's
Train tab otherwise. ``--config FILE`` (YAML or JSON with the same option names) supplies defaults; flags given on the
command line win.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from utils.checkpoints import check_resume
from utils.config import TrainerConfig, flatten, resolve
from utils.errors import UserError
from utils.lr_schedule import check_scheduler_name, validate_learning_rate

# Only the standard library at module level: the scripts build their parser and check every flag before torch,
# diffusers or transformers load, so --help and flag errors answer at once. Library types are imported where used.

def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", help="Hub id, local diffusers folder, or single-file checkpoint "
                   "(.safetensors/.ckpt). Single files load offline with the configs shipped in utils/model_configs.")
    g.add_argument("--revision", help="Hub revision of the model.")
    g.add_argument("--variant", help="Weight variant, e.g. fp16.")
    g.add_argument("--vae", help="Replace the model's VAE (folder or single file), e.g. an fp16-safe VAE.")
    g.add_argument("--model_config", help="Diffusers config folder for a single-file checkpoint whose architecture "
                   "is not detected automatically.")
    g.add_argument("--tokenizer_name", help="Use this CLIP tokenizer (a folder, a model folder with tokenizer/, or a "
                   "Hub id) instead of the model's own (diffusers' flag; SDXL: the first tokenizer).")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Frozen models run in this precision; trained weights stay float32. Default: accelerate's config.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs (faster).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute UNet activations in the backward pass: less memory, ~20-30%% slower.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use xformers attention (CUDA only; pip install -r requirements-cuda.txt). Default: torch SDPA.")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"],
                   help="Override the model's prediction type (read from its scheduler config).")


def add_optim_args(p: argparse.ArgumentParser, default_lr: str, default_weight_decay: float,
                   default_batch_size: int = 1) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", default=default_lr,
                   help="A number, or an A1111 schedule such as '0.005:100, 1e-3:1000, 1e-5' (rate:until-step, ..., "
                        "a bare rate runs to the end; N:-1 = until max steps; training ends when the schedule does). "
                        f"Default {default_lr}.")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by the global batch (batch x accumulation x processes).")
    g.add_argument("--lr_scheduler", default="constant",
                   help="With a plain-number learning rate: diffusers scheduler name (constant, constant_with_warmup, "
                        "linear, cosine, cosine_with_restarts, polynomial).")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps for --lr_scheduler.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles for cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power for the polynomial scheduler.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=default_weight_decay,
                   help=f"AdamW weight decay (default {default_weight_decay}, as A1111).")
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=None,
                   help="Clip gradients (after unscaling) to this norm/value; off by default.")
    g.add_argument("--clip_grad_mode", choices=["norm", "value"], default="norm",
                   help="How --max_grad_norm clips: total norm or per-element value (A1111's two modes).")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is common).")
    g.add_argument("--train_batch_size", type=int, default=default_batch_size,
                   help=f"Images per process per micro-batch (default {default_batch_size}).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimizer steps to train to (counts from the embedding's stored step). Default 3000, "
                        "or --num_train_epochs worth of steps.")
    g.add_argument("--num_train_epochs", type=int, default=None,
                   help="Alternative to --max_train_steps: epochs over the data set.")
    g.add_argument("--seed", type=int, default=0, help="Seed for data order, noise and timesteps.")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("saving and resuming")
    g.add_argument("--output_dir", default="outputs", help="Where everything is written.")
    g.add_argument("--save_every", "--save_steps", dest="save_every", type=int, default=500,
                   help="Save a copy of the trained file every N steps (0 = never). --save_steps is diffusers' name.")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Write a resumable checkpoint every N steps (0 = only on a stop signal).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoint folder; 'latest' with no checkpoint starts fresh.")
    g.add_argument("--save_optimizer_state", action="store_true",
                   help="Also write A1111's <file>.pt.optim optimizer sidecar next to the final file.")
    g.add_argument("--logging_dir", default="logs",
                   help="TensorBoard log folder, relative to --output_dir (diffusers' flag).")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="Accepted for old launchers that pass it; the rank comes from the launcher's environment.")
    g.add_argument("--no_safe_serialization", action="store_true",
                   help="Also write the diffusers learned_embeds as .bin (pickle) next to the .safetensors.")
    g = p.add_argument_group("publishing (the model card README.md is written in --output_dir either way)")
    g.add_argument("--push_to_hub", action="store_true",
                   help="At the end, upload the final files, the model card, the final previews, the loss log and "
                        "training_settings.json to a Hugging Face Hub model repository (not checkpoints).")
    g.add_argument("--hub_model_id", default=None,
                   help="The repository, 'name' or 'owner/name'; created if missing. Default: the --output_dir "
                        "folder's name under your account.")
    g.add_argument("--hub_token", default=None,
                   help="Hub token for --push_to_hub. Default: HF_TOKEN, or the login saved by `hf auth login`. "
                        "Never written to training_settings.json or trackers.")


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("watching it")
    g.add_argument("--report_to", default="none", choices=["none", "wandb", "tensorboard", "all"],
                   help="Trackers (through accelerate). W&B works offline with WANDB_MODE=offline.")
    g.add_argument("--tracker_project_name", default="embedforge", help="W&B project / TensorBoard folder name.")
    g.add_argument("--run_name", default=None, help="Run name shown in the tracker.")
    g.add_argument("--log_every", type=int, default=1, help="Send metrics to trackers every N steps.")
    g = p.add_argument_group("previews")
    g.add_argument("--preview_every", "--validation_steps", dest="preview_every", type=int, default=500,
                   help="Generate preview images every N steps and at the end (0 = only at the end).")
    g.add_argument("--preview_prompt", "--validation_prompt", dest="preview_prompt", default=None,
                   help="Preview prompt (default: a training prompt).")
    g.add_argument("--preview_negative_prompt", default="", help="Negative prompt for previews.")
    g.add_argument("--preview_steps", type=int, default=20, help="Sampling steps for previews.")
    g.add_argument("--preview_sampler", default="Euler a", help="A1111 sampler name for previews.")
    g.add_argument("--preview_cfg_scale", type=float, default=7.0, help="Guidance scale for previews.")
    g.add_argument("--preview_seed", type=int, default=0, help="Seed for previews (the same each time).")
    g.add_argument("--num_preview_images", "--num_validation_images", dest="num_preview_images", type=int,
                   default=1, help="Images per preview.")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Previews every N epochs instead of --preview_every steps (diffusers' older flag).")
    g.add_argument("--no_previews", action="store_true", help="Do not generate previews at all.")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file with option values (same names as the flags); "
                                    "flags on the command line win.")


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse twice: once to find --config, then with the file's values as defaults."""
    pre, _ = p.parse_known_args(argv)
    if getattr(pre, "config", None):
        path = Path(pre.config)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--config {path}: {e.strerror}") from None
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text) or {}
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file
            raise UserError(f"--config {path}: cannot parse ({e.__class__.__name__}: {e})") from None
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: expected a mapping of option names to values")
        known = {a.dest for a in p._actions}
        unknown = sorted(k for k in values if k.replace("-", "_") not in known)
        if unknown:
            raise UserError(f"--config {path}: unknown option(s): {', '.join(unknown)}")
        p.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return p.parse_args(argv)


def to_config(a: argparse.Namespace, cls):
    """The parsed flags (the --config file already folded in) as the trainer's typed config, once."""
    return resolve(cls, {k: v for k, v in vars(a).items() if k != "config"})


def check_flags(cfg: TrainerConfig) -> None:
    """Everything both trainers can check with the standard library alone: before torch is imported, so a bad flag
    is answered at once. The last: the checkpoint to resume from (its files against its manifest)."""
    values = flatten(cfg)
    validate_learning_rate(cfg.optim.learning_rate)
    for n in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs", "log_every",
              "preview_steps", "num_preview_images", "validation_epochs"):
        if values[n] is not None and values[n] <= 0:
            raise UserError(f"--{n} must be > 0 (got {values[n]})")
    for n in ("save_every", "checkpointing_steps", "preview_every", "lr_warmup_steps"):
        if values[n] < 0:
            raise UserError(f"--{n} must be >= 0 (got {values[n]})")
    for name, (ok, rule) in _FLOAT_RULES.items():
        value = values.get(name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name} must be a finite number{rule} (got {value})")
    check_scheduler_name(cfg.optim.lr_scheduler)
    check_resume(Path(cfg.saving.output_dir), cfg.saving.resume_from_checkpoint)


def check_run(cfg: TrainerConfig) -> None:
    """The checks that need the libraries (the scheduler's arguments, the Hub login) or the disk, before any model
    loads. Creates --output_dir: the last check."""
    from utils.fileio import check_writable_folder
    from utils.lr_schedule import validate_scheduler

    o = cfg.optim
    validate_scheduler(o.lr_scheduler, o.lr_warmup_steps, o.lr_num_cycles, o.lr_power)
    if cfg.hub.push_to_hub:
        from utils.hub import check_can_push

        check_can_push(hub_target(cfg))
    check_writable_folder(cfg.saving.output_dir, "--output_dir")


# Float flags whose bad values would otherwise surface only after the model has loaded (AdamW's own checks) or never
# (a NaN guidance scale, a negative timeout): flag -> (test, the rule in words). nan and inf parse as floats.
_FLOAT_RULES = {
    "adam_beta1": (lambda v: 0 <= v < 1, " in [0, 1)"), "adam_beta2": (lambda v: 0 <= v < 1, " in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, " > 0"), "adam_weight_decay": (lambda v: v >= 0, " >= 0"),
    "max_grad_norm": (lambda v: v >= 0, " >= 0"), "snr_gamma": (lambda v: v >= 0, " >= 0"),
    "lr_power": (lambda v: True, ""), "preview_cfg_scale": (lambda v: True, ""),
    "ddp_timeout": (lambda v: v > 0, " > 0 (seconds)"), "flip_p": (lambda v: 0 <= v <= 1, " in [0, 1]"),
    "tag_dropout": (lambda v: 0 <= v <= 1, " in [0, 1]"),
}


def check_data_fits(cfg: TrainerConfig, accelerator, summary, data_cfg) -> None:
    """After the data scan, before the model: one epoch must hold at least one optimizer step on every process."""
    from utils.data import steps_per_epoch

    t = cfg.training
    batches = steps_per_epoch(summary, data_cfg, t.train_batch_size, accelerator.num_processes)
    if batches < t.gradient_accumulation_steps:
        raise UserError(
            f"one epoch has {batches} batch(es) per process, fewer than --gradient_accumulation_steps "
            f"{t.gradient_accumulation_steps}; use more images, a smaller batch or less accumulation")


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

def data_options(cfg: TrainerConfig, placeholder: str):
    """The data, prompt and latent sections as utils.data's DataConfig / PromptConfig and utils.latents' LatentConfig."""
    from utils.data import DataConfig, PromptConfig
    from utils.latents import LatentConfig

    d, p = cfg.data, cfg.prompts
    width, height = d.size
    data = DataConfig(
        train_data_dir=d.train_data_dir, dataset_name=d.dataset_name, dataset_config_name=d.dataset_config_name,
        image_column=d.image_column, caption_column=d.caption_column, recursive=d.recursive,
        filename_word_regex=d.filename_word_regex, filename_join_string=d.filename_join_string, width=width,
        height=height, center_crop=d.center_crop, random_crop=d.random_crop, enable_buckets=d.enable_buckets,
        min_bucket_reso=d.min_bucket_reso, max_bucket_reso=d.max_bucket_reso, bucket_reso_steps=d.bucket_reso_steps,
        bucket_no_upscale=d.bucket_no_upscale, flip_p=d.flip_p, use_alpha_as_loss_weight=d.use_alpha_as_loss_weight,
        repeats=d.repeats, verify_images=d.verify_images)
    prompt = PromptConfig(placeholder=placeholder, template_file=p.template_file,
                          learnable_property=p.learnable_property, caption_only=p.caption_only,
                          shuffle_tags=p.shuffle_tags, tag_dropout=p.tag_dropout)
    latents = LatentConfig(latent_sampling=cfg.latents.latent_sampling, cache_dir=cfg.latents.cache_latents_to_disk)
    return data, prompt, latents


def model_source(cfg: TrainerConfig):
    from utils.models import ModelSource

    m = cfg.model
    if not m.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (or --demo for the built-in tiny model)")
    return ModelSource(m.pretrained_model_name_or_path, m.revision, m.variant, m.vae, m.model_config,
                       tokenizer=m.tokenizer_name)


def model_options(cfg: TrainerConfig, mixed_precision: str):
    from utils.training_setup import ModelOptions

    m = cfg.model
    return ModelOptions(mixed_precision, m.gradient_checkpointing, m.enable_xformers_memory_efficient_attention,
                        m.allow_tf32, m.prediction_type)


def start_run(cfg: TrainerConfig, data_cfg, prompt_cfg):
    """utils.run.start_run with the config's values: the Accelerator and the data scan."""
    from utils.run import start_run as start

    t = cfg.training
    return start(Path(cfg.saving.output_dir), cfg.model.mixed_precision, t.gradient_accumulation_steps,
                 cfg.tracking.report_to, t.seed, cfg.cluster.ddp_timeout, data_cfg, prompt_cfg, cfg.saving.logging_dir)


def plan_batches(cfg: TrainerConfig, accelerator, summary, data_cfg, prompt_cfg, latent_cfg, loaded,
                 initial_step: int = 0):
    """utils.run.plan_batches with the config's values."""
    from utils.run import plan_batches as plan

    t = cfg.training
    return plan(accelerator, summary, data_cfg, prompt_cfg, latent_cfg, loaded, Path(cfg.saving.output_dir),
                batch_size=t.train_batch_size, accumulation=t.gradient_accumulation_steps, seed=t.seed,
                num_workers=cfg.data.dataloader_num_workers, cache_latents=not cfg.latents.no_cache_latents,
                max_train_steps=t.max_train_steps, num_train_epochs=t.num_train_epochs,
                report_to=cfg.tracking.report_to, ddp_timeout=cfg.cluster.ddp_timeout, initial_step=initial_step)


def run_settings(cfg: TrainerConfig, accelerator, loaded, summary, max_steps: int, **extra) -> dict:
    """Every option of the run (no secrets) plus what it resolved to, for training_settings.json and the trackers."""
    return {**cfg.settings(), **extra,
            "max_train_steps": max_steps, "model_hash": loaded.identity.shorthash, "model_name": loaded.identity.name,
            "model_family": loaded.family, "mixed_precision_used": str(accelerator.mixed_precision),
            "num_of_dataset_images": summary.num_examples, "world_size": accelerator.num_processes}


def loop_config(cfg: TrainerConfig, max_train_steps: int, prediction_type: str, settings: dict,
                micro_batches_per_epoch: int | None = None):
    """The loop's LoopConfig: the config's values plus what the run resolved (steps, prediction type)."""
    from utils.training import LoopConfig, config_for_trackers

    t, s, k = cfg.training, cfg.saving, cfg.tracking
    return LoopConfig(
        output_dir=Path(s.output_dir), max_train_steps=max_train_steps, train_batch_size=t.train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, seed=t.seed, prediction_type=prediction_type,
        snr_gamma=t.snr_gamma, save_every=s.save_every, checkpointing_steps=s.checkpointing_steps,
        checkpoints_total_limit=s.checkpoints_total_limit, resume_from_checkpoint=s.resume_from_checkpoint,
        preview_every=preview_every(cfg, micro_batches_per_epoch), log_every=k.log_every, report_to=k.report_to,
        tracker_project_name=k.tracker_project_name, run_name=k.run_name, wandb_tags=k.wandb_tags,
        tracker_config=config_for_trackers(settings), optim=cfg.optim)


def preview_every(cfg: TrainerConfig, micro_batches_per_epoch: int | None) -> int:
    """Optimizer steps between previews: --preview_every, or --validation_epochs epochs of steps (diffusers)."""
    v = cfg.previews
    if v.no_previews:
        return 0
    if v.validation_epochs and micro_batches_per_epoch:
        return v.validation_epochs * max(1, micro_batches_per_epoch // cfg.training.gradient_accumulation_steps)
    return v.preview_every


def preview_options(cfg: TrainerConfig, data_cfg):
    from utils.previews import PreviewOptions

    v = cfg.previews
    return PreviewOptions(prompt=v.preview_prompt, negative_prompt=v.preview_negative_prompt, steps=v.preview_steps,
                          sampler=v.preview_sampler, cfg_scale=v.preview_cfg_scale, seed=v.preview_seed,
                          num_images=v.num_preview_images, width=data_cfg.width, height=data_cfg.height)


def hub_target(cfg: TrainerConfig):
    """Where --push_to_hub publishes (None without it)."""
    from utils.hub import HubTarget

    return HubTarget(cfg.hub.hub_model_id, cfg.hub.hub_token) if cfg.hub.push_to_hub else None
