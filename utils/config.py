"""The scripts' typed configuration: one small dataclass per concern, composed into one config per script
(``TextualInversionConfig``, ``HypernetworkConfig``, ``InferenceConfig``).

A script resolves its config once (flags + ``--config`` file + ``--demo`` defaults, utils/cli.py) and hands it down;
the library reads ``cfg.saving.output_dir``, never an ``argparse`` namespace. Field names are the flags' names, so a
``--config`` file, the command line, ``training_settings.json`` and the tracker config all say the same thing.

Adding a flag group: its parser group in utils/cli.py (or the script), its dataclass here, one field in the trainer
config(s) that use it. Only the standard library is imported here: ``--help`` and flag errors must not wait for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Keys never written to training_settings.json or sent to trackers.
SECRET_FIELDS = ("hub_token",)


@dataclass
class ModelSettings:
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    model_config: str | None = None
    tokenizer_name: str | None = None
    mixed_precision: str | None = None  # None: accelerate's config
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    prediction_type: str | None = None  # None: the model's own


@dataclass
class DataSettings:
    train_data_dir: str | None = None
    recursive: bool = False
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    filename_word_regex: str = ""
    filename_join_string: str = " "
    resolution: int = 512
    width: int | None = None  # None: resolution
    height: int | None = None  # None: resolution
    center_crop: bool = False
    random_crop: bool = False
    enable_buckets: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    flip_p: float = 0.0
    use_alpha_as_loss_weight: bool = False
    repeats: int = 1
    verify_images: bool = False
    dataloader_num_workers: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of a training image."""
        return self.width or self.resolution, self.height or self.resolution


@dataclass
class PromptSettings:
    template_file: str | None = None
    learnable_property: str = "object"
    caption_only: bool = False
    shuffle_tags: bool = False
    tag_dropout: float = 0.0


@dataclass
class LatentSettings:
    latent_sampling: str = "once"
    cache_latents_to_disk: str | None = None
    no_cache_latents: bool = False


@dataclass
class OptimConfig:
    """The optimizer and learning rate, as the loop (utils/training.py) uses them."""

    learning_rate: str = "0.005"  # a number or an A1111 schedule string
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    scale_lr: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None
    clip_grad_mode: str = "norm"  # norm | value

    def __post_init__(self):
        self.learning_rate = str(self.learning_rate)  # a --config file may give a number


@dataclass
class TrainingSettings:
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None  # None: 3000, or num_train_epochs worth (resolved after the data scan)
    num_train_epochs: int | None = None
    seed: int = 0
    snr_gamma: float | None = None


@dataclass
class SavingSettings:
    output_dir: str = "outputs"
    save_every: int = 500
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    save_optimizer_state: bool = False
    logging_dir: str = "logs"
    local_rank: int = -1  # accepted from old launchers, unused
    no_safe_serialization: bool = False


@dataclass
class HubSettings:
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = field(default=None, repr=False)  # secret: never in settings files or trackers


@dataclass
class TrackingSettings:
    report_to: str = "none"
    tracker_project_name: str = "embedforge"
    run_name: str | None = None
    log_every: int = 1
    wandb_tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        from utils.cluster import parse_tags

        self.wandb_tags = parse_tags(self.wandb_tags)  # the flag's "a, b,,c", or a --config file's list


@dataclass
class PreviewSettings:
    preview_every: int = 500
    preview_prompt: str | None = None
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_sampler: str = "Euler a"
    preview_cfg_scale: float = 7.0
    preview_seed: int = 0
    num_preview_images: int = 1
    validation_epochs: int | None = None
    no_previews: bool = False


@dataclass
class ClusterSettings:
    ddp_timeout: float = 1800.0


@dataclass
class EvalSettings:
    """The evaluation and early-stopping flags (utils/eval_args.py builds their parser group and checks them)."""

    eval_every: int | None = None  # None: every 25 steps with a folder of pictures, else off
    eval_data_dir: str | None = None
    eval_set_size: int = 16
    early_stopping: str = "none"
    dvar_window: int = 3
    dvar_threshold: float = 0.15
    dvar_direction: float | None = 0.5
    patience: int = 8
    patience_metric: str = "eval_loss"
    select_best: str = "eval_loss"
    eval_clip_model: str | None = None
    eval_dino_model: str | None = None
    eval_num_images: int = 4
    eval_prompt: str | None = None
    norm_warn_factor: float = 3.0


@dataclass
class EmbeddingSettings:
    placeholder_token: str | None = None
    initializer_token: str = "*"
    num_vectors: int = 1
    resume_embedding: str | None = None
    save_image_embeddings: bool = False
    save_as_full_pipeline: bool = False


@dataclass
class ManyEmbeddingsSettings:
    """--concepts / --sweep: many embeddings in one run (utils/multi_run.py)."""

    concepts: str | None = None
    sweep: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.concepts or self.sweep)


@dataclass
class HypernetworkSettings:
    hypernetwork_name: str | None = None
    resume_hypernetwork: str | None = None
    layer_structure: str = "1, 2, 1"
    activation_func: str = "linear"
    weight_init: str = "Normal"
    layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: str = ""
    last_layer_dropout: bool = False
    activate_output: bool = False
    sizes: str | None = None
    offload_text_encoder: bool = False
    embeddings_dir: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """What both trainers take."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    latents: LatentSettings = field(default_factory=LatentSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    saving: SavingSettings = field(default_factory=SavingSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    previews: PreviewSettings = field(default_factory=PreviewSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)

    def settings(self) -> dict[str, Any]:
        """Every option by its flag name, flat and without secrets: training_settings.json and the tracker config."""
        return {k: v for k, v in flatten(self).items() if k not in SECRET_FIELDS}


@dataclass
class TextualInversionConfig(TrainerConfig):
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    many: ManyEmbeddingsSettings = field(default_factory=ManyEmbeddingsSettings)
    demo: bool = False


@dataclass
class HypernetworkConfig(TrainerConfig):
    hypernetwork: HypernetworkSettings = field(default_factory=HypernetworkSettings)


def is_section(value: Any) -> bool:
    return hasattr(value, "__dataclass_fields__")


def flatten(cfg) -> dict[str, Any]:
    """{flag name: value} over every section (sections' fields are named after the flags, so no two collide)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_section(value):
            out.update(flatten(value))
        else:
            out[f.name] = value
    return out


def from_values(cls, values: dict[str, Any]):
    """Build ``cls`` (a trainer config or one section) from {flag name: value}; missing names keep their defaults."""
    kwargs = {}
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_section(default):
            kwargs[f.name] = from_values(type(default), values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def resolve(cls, values: dict[str, Any]):
    """Parsed flags {name: value} as ``cls``, once. A flag without a field would be silently lost: a bug, refused."""
    missing = sorted(set(values) - field_names(cls))
    if missing:
        raise TypeError(f"{cls.__name__} has no field for the flag(s) {', '.join(missing)}")
    return from_values(cls, values)


def field_names(cls) -> set[str]:
    """Every flag name a config class holds."""
    return set(flatten(cls()))


# ---------------------------------------------------------------------------------------------------------------
# inference.py


@dataclass
class InferenceModelSettings:
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    mixed_precision: str = "no"
    device: str | None = None  # None: cuda if available


@dataclass
class LibrarySettings:
    embeddings_dir: list[str] | None = None  # None: embeddings/ if it exists
    list_embeddings: bool = False
    hypernetwork: list[str] = field(default_factory=list)
    hypernetwork_dir: list[str] | None = None  # None: hypernetworks/


@dataclass
class GenerationSettings:
    prompt: str | None = None
    prompt_file: str | None = None
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None  # None: the model's own size
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1


@dataclass
class ImageOutputSettings:
    outdir: str = "outputs/txt2img-images"
    grid: bool = False


@dataclass
class InferenceConfig:
    model: InferenceModelSettings = field(default_factory=InferenceModelSettings)
    library: LibrarySettings = field(default_factory=LibrarySettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    output: ImageOutputSettings = field(default_factory=ImageOutputSettings)
