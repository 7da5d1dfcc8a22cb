"""What to read and how to size it: the data flags as two small dataclasses, checked when they are built."""

from __future__ import annotations

import re
from dataclasses import dataclass

from utils.errors import UserError
from utils.images import make_buckets, select_bucket

LATENT_FACTOR = 8  # SD VAEs: latents are 1/8 of the image on each side


@dataclass
class DataConfig:
    train_data_dir: str | None = None  # folder of images (+ <stem>.txt captions)
    dataset_name: str | None = None  # Hub id, or a local folder/file: parquet, arrow, imagefolder, WebDataset .tar
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    image_column: str | None = None  # None: the first Image column (or image/png/jpg/...)
    caption_column: str | None = None  # None: text/caption/txt/prompt if present
    recursive: bool = False  # include sub-folders of train_data_dir
    filename_word_regex: str = ""  # A1111 dataset_filename_word_regex
    filename_join_string: str = " "  # A1111 dataset_filename_join_string
    resolution: int | None = None  # sets width = height
    width: int = 512
    height: int = 512
    center_crop: bool = False  # keep aspect: scale to cover, cut the middle (default: A1111 stretch to W x H)
    random_crop: bool = False  # keep aspect: scale to cover, cut at a random place each use
    enable_buckets: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    flip_p: float = 0.0  # probability of a left-right mirror per use
    use_alpha_as_loss_weight: bool = False
    repeats: int = 1  # times each image is used per epoch (folder datasets)
    shuffle_buffer_size: int = 1000  # streams only
    # Streams: shards feeding the shuffle buffer at once. >1 mixes better, but datasets 5.2 then reads parquet
    # through threads and sleeps 5 s at the end of every pass (its workaround for apache/arrow#45214).
    shuffle_buffer_shards: int = 1
    verify_images: bool = False  # scan decodes every image fully (finds truncated files before training)

    def __post_init__(self):
        if self.resolution is not None:
            self.width = self.height = int(self.resolution)
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise UserError("give exactly one of --train_data_dir or --dataset_name")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v <= 0 or v % LATENT_FACTOR:
                raise UserError(f"--{name} must be a positive multiple of {LATENT_FACTOR}, got {v}")
        if self.enable_buckets and self.bucket_reso_steps % LATENT_FACTOR:
            raise UserError(f"--bucket_reso_steps must be a multiple of {LATENT_FACTOR}")
        if self.enable_buckets:
            try:
                self.bucket_sizes()
            except ValueError:
                raise UserError(
                    f"--enable_buckets: no bucket with sides from --min_bucket_reso {self.min_bucket_reso} to "
                    f"--max_bucket_reso {self.max_bucket_reso} (steps of {self.bucket_reso_steps}) fits the area of "
                    f"--resolution {self.width}x{self.height}; lower --min_bucket_reso") from None
        if not 0.0 <= self.flip_p <= 1.0:
            raise UserError(f"--flip_p must be in [0, 1], got {self.flip_p}")
        if self.center_crop and self.random_crop:
            raise UserError("--center_crop and --random_crop exclude each other")
        if self.repeats < 1:
            raise UserError("--repeats must be >= 1")
        if self.filename_word_regex:
            try:
                re.compile(self.filename_word_regex)
            except re.error as e:
                raise UserError(f"--filename_word_regex is not a valid regular expression: {e}") from None

    @property
    def crop_mode(self) -> str:
        if self.random_crop:
            return "random"
        return "center" if (self.center_crop or self.enable_buckets) else "none"

    def bucket_sizes(self) -> list[tuple[int, int]]:
        return make_buckets(self.width * self.height, self.min_bucket_reso, self.max_bucket_reso,
                            self.bucket_reso_steps)

    def target_for(self, size: tuple[int, int], buckets: list[tuple[int, int]] | None = None) -> tuple[int, int]:
        """Training size (w, h) of an image of ``size``: its bucket, or (width, height) without buckets."""
        if not self.enable_buckets:
            return (self.width, self.height)
        return select_bucket(size, buckets or self.bucket_sizes(), no_upscale=self.bucket_no_upscale,
                             max_area=self.width * self.height, step=self.bucket_reso_steps)


@dataclass
class PromptConfig:
    placeholder: str = ""  # the text that replaces [name] (TI: the new token; HN: the hypernetwork name)
    template_file: str | None = None  # a name in templates/ (.txt optional) or a path; None: see resolve_template
    learnable_property: str = "object"  # object | style (diffusers' flag) -> subject*.txt | style*.txt
    caption_only: bool = False  # the prompt is the caption alone ([name] inside it is still replaced)
    shuffle_tags: bool = False  # shuffle the comma-separated tags of the caption, every use
    tag_dropout: float = 0.0  # drop each tag with this probability, every use

    def __post_init__(self):
        if self.learnable_property not in ("object", "style"):
            raise UserError(f"--learnable_property must be object or style, got {self.learnable_property!r}")
        if not 0.0 <= self.tag_dropout <= 1.0:
            raise UserError(f"--tag_dropout must be in [0, 1], got {self.tag_dropout}")
