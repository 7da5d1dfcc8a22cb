"""Training data: images + captions as a per-rank stream of batches, prompts from templates, buckets, cached latents.

Use from a trainer, in this order (all cheap until ``prepare_latents``)::

    summary = scan_dataset(data_cfg, prompt_cfg, report_file=out / "skipped_images.txt")   # UserError if nothing usable
    print(summary.describe())                                                               # counts + bucket table
    cached = prepare_latents(summary, data_cfg, vae, LatentConfig(...), identity=..., rank=r, world_size=n)  # optional
    accelerator.wait_for_everyone()                                                         # disk cache split by rank
    loader = TrainLoader(summary, data_cfg, prompt_cfg, batch_size=b, rank=r, world_size=n, seed=s, latents=cached)
    for batch in loader: ...                # endless; loader.epoch / loader.position / loader.state_dict() for resume

A batch is a dict: ``latents`` [B,C,h,w] (scaled, when cached) or ``pixel_values`` [B,3,H,W] in [-1,1]; ``prompts``
(list[str]); ``captions`` (list[str]); ``loss_weights`` [B,1,h,w] at latent size (only with use_alpha_as_loss_weight);
``original_size``, ``crop_top_left``, ``target_size`` (LongTensor [B,2], (h,w)/(top,left) as SDXL wants); ``index``
(LongTensor [B], example ids; -1 for streams); ``skipped`` (list of (path, reason) met while making it).

Sharding: ``datasets.distributed.split_dataset_by_node`` only (never also ``accelerator.prepare`` the loader).

Folder datasets (``train_data_dir``) -- exact order. The epoch's order is a function of (seed, epoch, global batch
size G = world_size x batch_size) only: ``epoch_plan`` cuts shuffled buckets into global batches of G examples of one
bucket. Every global batch becomes ``world_size`` micro-batches and each micro-batch is one shard of an
``IterableDataset.from_generator`` stream; rank r takes the contiguous slice [r*b, (r+1)*b) of every global batch.
So N processes x batch b see exactly the global sequence of 1 process x batch N*b, and random draws per use (template
line, tag shuffle/dropout, flip, random crop, random latent sample) come from a generator seeded by
(seed, epoch, global position), independent of process and worker counts. ``state_dict()`` = (epoch, position in
micro-batches of this rank); a resumed loader yields exactly what the uninterrupted one would. Each epoch uses
floor(n*repeats / G) global batches (drop-last, like A1111); with several buckets the leftovers of all buckets fill the
remaining batches (one bucket per batch, topped up with repeats from the same bucket).

Streams (``dataset_name``: Hub id, parquet/arrow/imagefolder+metadata.jsonl/WebDataset .tar) -- weaker guarantee. Each
rank reads its part (whole shards when num_shards % world_size == 0, else every world_size-th example) shuffled with one
shared seed through a buffer, and makes one-bucket batches from it. Every rank yields the same number of batches per
epoch (floor(n / G) from the scan), so ranks stay in lockstep; a rank whose part runs out first continues into its next
pass. Order depends on the world size and the worker count. Resume replays the stream and drops the batches already
consumed: exact, but it re-reads (and decodes) that part of the epoch.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError
from utils.fileio import write_text_atomic
from utils.images import (
    RESAMPLE,
    Geometry,
    ImageLoadError,
    LoadedImage,
    apply_geometry,
    image_size,
    is_image_file,
    make_buckets,
    open_image,
    open_image_bytes,
    plan_geometry,
    select_bucket,
)

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
LATENT_FACTOR = 8  # SD VAEs: latents are 1/8 of the image on each side
# Files in a training folder that are neither images nor skipped-and-reported: captions and common side-cars.
_SIDECAR_EXTENSIONS = {".txt", ".json", ".jsonl", ".csv", ".md", ".npz", ".safetensors", ".caption", ".tags"}


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


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


# ---------------------------------------------------------------------------------------------------------------------
# Captions and prompts

_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")


def caption_from_filename(stem: str, word_regex: str = "", join_string: str = " ") -> str:
    """A1111's caption for an image without a .txt: drop a leading run of digits and dashes (and the spaces after
    it), then, if ``word_regex`` is given, join all its matches with ``join_string``."""
    text = _LEADING_NUMBERS.sub("", stem)
    if word_regex:
        text = join_string.join(re.findall(word_regex, text))
    return text


def read_caption_file(path: str | os.PathLike) -> str:
    """The caption text of a .txt side-car (UTF-8, BOM tolerated, surrounding whitespace removed). Raises ValueError
    with a reason when the file is not UTF-8 or cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"caption file unreadable ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ValueError("caption file is not UTF-8") from None


def resolve_template(cfg: PromptConfig, has_captions: bool) -> Path | None:
    """The template file to use, or None in caption-only mode.

    Without ``template_file``: ``learnable_property`` object -> subject, style -> style, with the ``_filewords`` variant
    when the dataset has real captions (a .txt beside any image, a caption column, or a --filename_word_regex, which
    says the file names are meaningful). Plain file names like IMG_0001 are not treated as captions."""
    if cfg.caption_only:
        return None
    name = cfg.template_file
    if name is None:
        base = "subject" if cfg.learnable_property == "object" else "style"
        name = base + ("_filewords" if has_captions else "")
    p = Path(name)
    if p.is_file():
        return p
    for cand in (TEMPLATES_DIR / name, TEMPLATES_DIR / f"{name}.txt"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(f.stem for f in TEMPLATES_DIR.glob("*.txt")))
    raise UserError(f"template file {name!r} not found (not a file, nor one of templates/: {known})")


def load_template(path: str | os.PathLike) -> list[str]:
    """Template lines, stripped; blank lines are dropped (A1111 keeps them and can draw an empty prompt)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read template file {path}: {e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"template file {path} has no prompt lines")
    return lines


def item_rng(seed: int, epoch: int, position: int, extra: int = 0) -> np.random.Generator:
    """The generator for every random choice of one use of one example (same on any rank or worker)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, position, extra])


def process_tags(caption: str, shuffle: bool, dropout: float, rng: np.random.Generator) -> str:
    """Split on ',', trim, drop each tag with probability ``dropout``, shuffle if asked, join with ', '.

    A1111 neither trims nor adds spaces (joins with ','); trimming keeps shuffled tags tidy and tokenizes the same."""
    if not shuffle and dropout <= 0:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if dropout > 0:
        tags = [t for t in tags if rng.random() >= dropout]
    if shuffle and len(tags) > 1:
        tags = [tags[i] for i in rng.permutation(len(tags))]
    return ", ".join(tags)


def build_prompt(caption: str, lines: list[str] | None, cfg: PromptConfig, rng: np.random.Generator) -> str:
    """One use's prompt: a template line drawn from ``lines`` (A1111 fixes one line per image unless tags are shuffled
    or dropped; we draw per use), [filewords] -> processed caption, then [name] -> placeholder."""
    words = process_tags(caption or "", cfg.shuffle_tags, cfg.tag_dropout, rng)
    text = "[filewords]" if lines is None else lines[int(rng.integers(len(lines)))]
    return text.replace("[filewords]", words).replace("[name]", cfg.placeholder)


# ---------------------------------------------------------------------------------------------------------------------
# Scan: list what is usable, cheaply, before any model is loaded


@dataclass
class Example:
    index: int
    path: str
    caption: str
    has_caption_file: bool
    size: tuple[int, int]  # (w, h) after EXIF orientation
    bucket: tuple[int, int]  # training size (w, h)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class DatasetSummary:
    kind: str  # "folder" | "stream"
    num_examples: int
    examples: list[Example]  # folder only (streams are never held in memory)
    skipped: list[Skipped]
    bucket_counts: dict[tuple[int, int], int]
    has_captions: bool
    warnings: list[str] = field(default_factory=list)
    image_column: str | None = None
    caption_column: str | None = None

    def bucket_table(self) -> str:
        rows = [f"  {w}x{h}: {n} image{'s' if n != 1 else ''}" for (w, h), n in sorted(self.bucket_counts.items())]
        return "buckets (w x h):\n" + "\n".join(rows)

    def describe(self) -> str:
        lines = [f"{self.num_examples} usable image(s), {len(self.skipped)} skipped", self.bucket_table()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def list_folder(root: str | os.PathLike, recursive: bool) -> tuple[list[Path], list[Skipped]]:
    """Image files under ``root`` in a stable order (sorted relative paths; A1111 uses OS order), and the other
    files that are reported as skipped (not images and not caption/side-car files). Hidden entries are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--train_data_dir {root} is not a folder")
    images, skipped = [], []
    walker = os.walk(root) if recursive else [(str(root), [], [e.name for e in os.scandir(root) if e.is_file()])]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if is_image_file(p):
                images.append(p)
            elif p.suffix.lower() not in _SIDECAR_EXTENSIONS:
                skipped.append(Skipped(str(p), "not an image file"))
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    return images, skipped


def _scan_folder(cfg: DataConfig) -> DatasetSummary:
    files, skipped = list_folder(cfg.train_data_dir, cfg.recursive)
    buckets = cfg.bucket_sizes() if cfg.enable_buckets else None
    examples: list[Example] = []
    any_caption_file = False
    for path in files:
        try:
            size = open_image(path).rgb.size if cfg.verify_images else image_size(path)
        except ImageLoadError as e:
            skipped.append(Skipped(str(path), str(e)))
            continue
        txt = path.with_suffix(".txt")
        if txt.is_file():
            try:
                caption = read_caption_file(txt)
            except ValueError as e:
                skipped.append(Skipped(str(path), str(e)))
                continue
            has_file = any_caption_file = True
        else:
            caption = caption_from_filename(path.stem, cfg.filename_word_regex, cfg.filename_join_string)
            has_file = False
        examples.append(Example(len(examples), str(path), caption, has_file, size, cfg.target_for(size, buckets)))
    counts = Counter(e.bucket for e in examples)
    return DatasetSummary("folder", len(examples), examples, skipped, dict(counts),
                          has_captions=any_caption_file or bool(cfg.filename_word_regex))


def _write_report(path: str | os.PathLike, skipped: list[Skipped]) -> None:
    lines = ["# skipped training inputs: path<TAB>reason"] + [f"{s.path}\t{s.reason}" for s in skipped]
    write_text_atomic(path, "\n".join(lines) + "\n")


def scan_dataset(cfg: DataConfig, prompt: PromptConfig | None = None,
                 report_file: str | os.PathLike | None = None) -> DatasetSummary:
    """Find the usable images (header read only unless ``verify_images``), their captions and buckets; write the
    skipped ones to ``report_file``; raise UserError when nothing is usable. Call it before loading any model.

    For streams this reads the whole dataset once (image headers + captions) to count it; nothing is kept."""
    summary = _scan_folder(cfg) if cfg.train_data_dir is not None else _scan_stream(cfg)
    if report_file is not None:
        _write_report(report_file, summary.skipped)
    if summary.num_examples == 0:
        where = cfg.train_data_dir or cfg.dataset_name
        detail = f" ({len(summary.skipped)} file(s) skipped" + (f", see {report_file})" if report_file else ")")
        raise UserError(f"no usable training image found in {where}{detail if summary.skipped else ''}")
    if prompt is not None:
        summary.warnings += _prompt_warnings(summary, prompt)
    return summary


def _prompt_warnings(summary: DatasetSummary, prompt: PromptConfig) -> list[str]:
    out = []
    if prompt.caption_only and summary.kind == "folder":
        missing = sum(1 for e in summary.examples if "[name]" not in e.caption
                      and (not prompt.placeholder or prompt.placeholder not in e.caption))
        if missing:
            out.append(f"caption-only mode: {missing} caption(s) contain neither [name] nor {prompt.placeholder!r}; "
                       "those images cannot teach the new token")
    if not prompt.caption_only:
        path = resolve_template(prompt, summary.has_captions)
        text = path.read_text(encoding="utf-8", errors="replace") if path is not None else ""
        # hypernetwork.txt / none.txt leave [name] out on purpose (the HN is not named in its prompts)
        if path is not None and "[name]" not in text and prompt.placeholder and \
                path.resolve().parent != TEMPLATES_DIR.resolve():
            out.append(f"template {path.name} has no [name]: the prompts never contain {prompt.placeholder!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Streams (datasets.load_dataset(..., streaming=True))

_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset", ".jsonl": "json", ".json": "json",
                      ".csv": "csv"}
_IMAGE_NAMES = ("image", "img", "png", "jpg", "jpeg", "webp")
_CAPTION_NAMES = ("text", "caption", "txt", "prompt", "captions")


def open_stream(cfg: DataConfig):
    """(IterableDataset with the image column left undecoded, image column, caption column or None)."""
    from datasets import Image as HFImage
    from datasets import load_dataset

    name = cfg.dataset_name
    p = Path(name)
    try:
        if p.is_file():
            builder = _BUILDER_BY_SUFFIX.get(p.suffix.lower())
            if builder is None:
                raise UserError(f"--dataset_name {name}: unknown file type "
                                "(use parquet, arrow, tar, jsonl, csv or a folder)")
            ds = load_dataset(builder, data_files=[str(p)], split=cfg.dataset_split, streaming=True)
        else:
            ds = load_dataset(name, cfg.dataset_config_name, split=cfg.dataset_split, streaming=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --dataset_name for the user
        raise UserError(f"cannot open dataset {name!r}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    features = ds.features or {}
    cols = list(features)
    image_col = cfg.image_column
    if image_col is None:
        image_col = next((c for c in cols if isinstance(features[c], HFImage)), None)
        image_col = image_col or next((c for c in _IMAGE_NAMES if c in cols), None)
    if image_col is None or (cols and image_col not in cols):
        raise UserError(f"dataset {name!r} has no image column {image_col or ''} (columns: {', '.join(cols)}); "
                        "use --image_column")
    caption_col = cfg.caption_column
    if caption_col is None:
        caption_col = next((c for c in _CAPTION_NAMES if c in cols), None)
    elif cols and caption_col not in cols:
        raise UserError(f"dataset {name!r} has no column {caption_col!r} (columns: {', '.join(cols)})")
    if isinstance(features.get(image_col), HFImage):
        ds = ds.cast_column(image_col, HFImage(decode=False))
    return ds, image_col, caption_col


def _row_image_bytes(value) -> tuple[bytes, str]:
    """(bytes, a name for reports) from an undecoded image cell: {'bytes', 'path'}, raw bytes or a path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            data = Path(path).read_bytes()
        return data or b"", str(path or "<bytes>")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "<bytes>"
    if isinstance(value, str):
        return Path(value).read_bytes(), value
    raise ImageLoadError(f"unsupported image cell {type(value).__name__}")


def _row_caption(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise ValueError("caption is not UTF-8") from None
    if isinstance(value, (list, tuple)):  # several captions per image: the first one
        return _row_caption(value[0]) if value else ""
    return str(value).strip()


def _row_name(row: dict, fallback: str) -> str:
    key, url = row.get("__key__"), row.get("__url__")
    return f"{url}:{key}" if key and url else fallback


def _scan_stream(cfg: DataConfig) -> DatasetSummary:
    ds, image_col, caption_col = open_stream(cfg)
    buckets = cfg.bucket_sizes() if cfg.enable_buckets else None
    counts: Counter = Counter()
    skipped: list[Skipped] = []
    n = 0
    for i, row in enumerate(ds):
        name = f"{cfg.dataset_name}[{i}]"
        try:
            data, name = _row_image_bytes(row.get(image_col))
            name = _row_name(row, name if name != "<bytes>" else f"{cfg.dataset_name}[{i}]")
            size = open_image_bytes(data).rgb.size if cfg.verify_images else image_size(data)
            if caption_col:
                _row_caption(row.get(caption_col))
        except (ImageLoadError, ValueError, OSError) as e:
            skipped.append(Skipped(name, str(e)))
            continue
        counts[cfg.target_for(size, buckets)] += 1
        n += 1
    return DatasetSummary("stream", n, [], skipped, dict(counts), has_captions=caption_col is not None,
                          image_column=image_col, caption_column=caption_col)


# ---------------------------------------------------------------------------------------------------------------------
# Epoch plan (folder datasets)


def epoch_plan(buckets: list[tuple[int, int]], global_batch: int, seed: int, epoch: int, repeats: int = 1
               ) -> list[list[int]]:
    """Global batches (lists of example indices, one bucket each) for one epoch; a function of its arguments only.

    ``buckets[i]`` is example i's bucket. Each bucket (with ``repeats`` copies of its members) is shuffled and cut into
    full batches; then floor(leftovers / G) more batches are made, each from one bucket chosen with probability
    proportional to its leftover count, filled with that bucket's leftovers and topped up with random members of the
    same bucket. The batches are shuffled. Total: floor(n*repeats / G)."""
    G = global_batch
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x9E3779B9])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(tuple(b), []).extend([i] * repeats)
    batches: list[list[int]] = []
    leftovers: dict[tuple[int, int], list[int]] = {}
    for key in sorted(groups):
        members = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        full = len(members) // G
        batches += [members[k * G:(k + 1) * G] for k in range(full)]
        if len(members) > full * G:
            leftovers[key] = members[full * G:]
    n_extra = sum(len(v) for v in leftovers.values()) // G
    for _ in range(n_extra):
        keys = sorted(k for k, v in leftovers.items() if v)
        weights = np.array([len(leftovers[k]) for k in keys], dtype=np.float64)
        key = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
        batch, leftovers[key] = leftovers[key][:G], leftovers[key][G:]
        pool = groups[key]
        while len(batch) < G:
            batch.append(pool[int(rng.integers(len(pool)))])
        batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]


def steps_per_epoch(summary: DatasetSummary, cfg: DataConfig, batch_size: int, world_size: int = 1) -> int:
    """Batches each rank yields per epoch (the same on every rank); UserError if the data does not fill one step."""
    G = batch_size * world_size
    n = summary.num_examples * (cfg.repeats if summary.kind == "folder" else 1)
    if n < G:
        raise UserError(f"{summary.num_examples} usable image(s) (x{cfg.repeats} repeats) do not fill one step of "
                        f"{world_size} process(es) x batch {batch_size}; lower --train_batch_size or add images")
    return n // G


# ---------------------------------------------------------------------------------------------------------------------
# Turning one example use into tensors


def _pixels(img: Image.Image) -> torch.Tensor:
    # Reorder while still uint8 (4x less memory traffic), then one float pass in place.
    chw = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div_(127.5).sub_(1.0)


def alpha_to_weight(alpha: Image.Image | None, target: tuple[int, int], factor: int = LATENT_FACTOR) -> torch.Tensor:
    """Loss weight [1, h, w] at latent size from an L mask already sized like the training image (w, h = target).

    A1111 normalises to min 0, mean 1; a uniform mask (or none) gives all ones. Sized (w, h) for PIL and read back
    as (h, w), so non-square maps keep their orientation (A1111 transposes them)."""
    lw, lh = target[0] // factor, target[1] // factor
    if alpha is None:
        return torch.ones(1, lh, lw)
    w = np.asarray(alpha.resize((lw, lh), resample=RESAMPLE), dtype=np.float32) / 255.0
    w = w - w.min()
    mean = float(w.mean())
    if mean <= 0:
        return torch.ones(1, lh, lw)
    return torch.from_numpy(w / mean).reshape(1, lh, lw)


def _sizes(geom: Geometry) -> dict:
    left = geom.resize[0] - geom.left - geom.target[0] if geom.flip else geom.left
    return {"original_size": (geom.source[1], geom.source[0]), "crop_top_left": (geom.top, left),
            "target_size": (geom.target[1], geom.target[0])}


@dataclass
class CachedLatents:
    """What ``prepare_latents`` returns: the store plus the key of every (example index, flip) of a folder dataset."""

    store: object  # utils.latents.LatentStore
    identity: str
    keys: dict[tuple[int, bool], str] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # loss weights by key (alpha maps), when asked


@dataclass
class _Ctx:
    """Everything a worker needs to turn planned uses into batches (picklable; no models)."""

    cfg: DataConfig
    prompt: PromptConfig
    lines: list[str] | None
    seed: int
    examples: list[Example] | None = None
    bucket_members: dict[tuple[int, int], list[int]] | None = None
    latents: CachedLatents | None = None
    image_col: str | None = None
    caption_col: str | None = None
    buckets: list[tuple[int, int]] | None = None


def _draw_flip(cfg: DataConfig, rng) -> bool:
    return cfg.flip_p > 0 and bool(rng.random() < cfg.flip_p)


def _latent_from_cache(ctx: _Ctx, key: str, rng) -> torch.Tensor:
    gen = None
    if ctx.latents.store.sampling == "random":
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return ctx.latents.store.get(key, gen)


def _item_from_loaded(ctx: _Ctx, loaded: LoadedImage, target, flip: bool, rng) -> dict:
    geom = plan_geometry(loaded.rgb.size, target, ctx.cfg.crop_mode, rng, flip)
    item = {"pixel_values": _pixels(apply_geometry(loaded.rgb, geom)), **_sizes(geom)}
    if ctx.cfg.use_alpha_as_loss_weight:
        alpha = apply_geometry(loaded.alpha, geom) if loaded.alpha is not None else None
        item["loss_weights"] = alpha_to_weight(alpha, geom.target)
    return item


def _folder_item(ctx: _Ctx, ex: Example, epoch: int, position: int) -> dict:
    rng = item_rng(ctx.seed, epoch, position)
    flip = _draw_flip(ctx.cfg, rng)
    if ctx.latents is not None:
        key = ctx.latents.keys[(ex.index, flip)]
        geom = plan_geometry(ex.size, ex.bucket, ctx.cfg.crop_mode, None, flip)
        item = {**_sizes(geom)}
        if ctx.cfg.use_alpha_as_loss_weight:
            item["loss_weights"] = ctx.latents.weights[key]
        prompt = build_prompt(ex.caption, ctx.lines, ctx.prompt, rng)
        item["latents"] = _latent_from_cache(ctx, key, rng)
    else:
        item = _item_from_loaded(ctx, open_image(ex.path), ex.bucket, flip, rng)
        prompt = build_prompt(ex.caption, ctx.lines, ctx.prompt, rng)
    item.update(prompts=prompt, captions=ex.caption, index=ex.index)
    return item


def _collate(items: list[dict], skipped: list) -> dict:
    out: dict = {}
    for k in ("pixel_values", "latents", "loss_weights"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    for k in ("original_size", "crop_top_left", "target_size"):
        out[k] = torch.tensor([it[k] for it in items], dtype=torch.long)
    out["prompts"] = [it["prompts"] for it in items]
    out["captions"] = [it["captions"] for it in items]
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    out["skipped"] = skipped
    return out


def _folder_microbatch(ctx: _Ctx, shard: dict) -> dict:
    """One micro-batch; an image that fails to load now is reported and replaced by another image of the same bucket
    (the batch keeps its size so every rank keeps the same step count)."""
    epoch, items, skipped = shard["epoch"], [], []
    for pos, idx in zip(shard["positions"], shard["indices"]):
        ex = ctx.examples[idx]
        pool = ctx.bucket_members[ex.bucket]
        order = item_rng(ctx.seed, epoch, pos, 1).permutation(len(pool))
        candidates = [idx] + [pool[j] for j in order if pool[j] != idx]
        for cand in candidates:
            try:
                items.append(_folder_item(ctx, ctx.examples[cand], epoch, pos))
                break
            except (ImageLoadError, OSError, KeyError) as e:
                reason = "no cached latent (failed while caching)" if isinstance(e, KeyError) else str(e)
                skipped.append((ctx.examples[cand].path, reason))
        else:
            raise UserError(f"no image of bucket {ex.bucket[0]}x{ex.bucket[1]} can be loaded any more")
    return _collate(items, skipped)


def _folder_gen(shards: list[dict], ctx: _Ctx):
    for shard in shards:
        yield _folder_microbatch(ctx, shard)


def _loader(ds, num_workers: int):
    if num_workers <= 0:
        return iter(ds)
    # batch_size=None: every dataset row is already a micro-batch; workers are handed shards w, w+W, ... and the
    # loader takes rows from them in turn, which keeps the planned order.
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers))


def _make_ctx(summary: DatasetSummary, cfg: DataConfig, prompt: PromptConfig, seed: int,
              latents: CachedLatents | None) -> _Ctx:
    template = resolve_template(prompt, summary.has_captions)
    lines = load_template(template) if template is not None else None
    if latents is not None and cfg.random_crop:
        raise UserError("--random_crop cannot be combined with cached latents (the crop changes every use)")
    members = None
    if summary.kind == "folder":
        members = {}
        for e in summary.examples:
            members.setdefault(e.bucket, []).append(e.index)
    return _Ctx(cfg, prompt, lines, seed, summary.examples or None, members, latents, summary.image_column,
                summary.caption_column, cfg.bucket_sizes() if cfg.enable_buckets else None)


def iter_batches(summary: DatasetSummary, cfg: DataConfig, prompt: PromptConfig, *, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, epoch: int = 0, seed: int = 0, start: int = 0,
                 num_workers: int = 0, latents: CachedLatents | None = None) -> Iterator[dict]:
    """This rank's batches of one epoch, from micro-batch ``start`` on (see the module doc for the order)."""
    ctx = _make_ctx(summary, cfg, prompt, seed, latents)
    spe = steps_per_epoch(summary, cfg, batch_size, world_size)
    if summary.kind == "stream":
        yield from _stream_batches(ctx, summary, rank, world_size, batch_size, epoch, start, spe, num_workers)
        return
    if start >= spe:
        return
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    G = batch_size * world_size
    plan = epoch_plan([e.bucket for e in summary.examples], G, seed, epoch, cfg.repeats)
    shards = []
    for j, gb in enumerate(plan[start:], start=start):
        for r in range(world_size):
            lo = r * batch_size
            shards.append({"epoch": epoch, "positions": list(range(j * G + lo, j * G + lo + batch_size)),
                           "indices": gb[lo:lo + batch_size]})
    ds = IterableDataset.from_generator(_folder_gen, gen_kwargs={"shards": shards, "ctx": ctx})
    # len(shards) is a multiple of world_size, so each rank gets whole shards r, r+N, ...: its slice of every batch.
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    yield from _loader(ds, num_workers)


def _stream_process(row: dict, ctx: _Ctx, epoch: int) -> dict:
    """Decode + size one stream row inside a worker; bad rows come back as {'bad': reason}."""
    import hashlib

    name = "<row>"
    try:
        data, name = _row_image_bytes(row.get(ctx.image_col))
        name = _row_name(row, name)
        caption = _row_caption(row.get(ctx.caption_col)) if ctx.caption_col else ""
        digest = hashlib.sha256(data).hexdigest()
        rng = item_rng(ctx.seed, epoch, int(digest[:12], 16), 2)
        flip = _draw_flip(ctx.cfg, rng)
        if ctx.latents is not None:
            size = image_size(data)
            target = ctx.cfg.target_for(size, ctx.buckets)
            geom = plan_geometry(size, target, ctx.cfg.crop_mode, None, flip)
            from utils.latents import cache_key

            key = cache_key(digest, geom, ctx.latents.identity)
            item = {**_sizes(geom), "latents": _latent_from_cache(ctx, key, rng)}
            if ctx.cfg.use_alpha_as_loss_weight:
                item["loss_weights"] = ctx.latents.weights[key]
        else:
            loaded = open_image_bytes(data)
            target = ctx.cfg.target_for(loaded.rgb.size, ctx.buckets)
            item = _item_from_loaded(ctx, loaded, target, flip, rng)
        item.update(prompts=build_prompt(caption, ctx.lines, ctx.prompt, rng), captions=caption, index=-1,
                    bucket=target)
        return {"item": item, "bad": None}
    except (ImageLoadError, ValueError, OSError, KeyError) as e:
        return {"item": None, "bad": (name, str(e) if not isinstance(e, KeyError) else "latent not cached")}


def _stream_pass(ctx: _Ctx, rank: int, world_size: int, p: int, num_workers: int):
    """One pass over this rank's part of the stream, decoded (in DataLoader workers when num_workers > 0)."""
    from datasets.distributed import split_dataset_by_node

    ds, _, _ = open_stream(ctx.cfg)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    ds = ds.shuffle(seed=ctx.seed, buffer_size=ctx.cfg.shuffle_buffer_size,
                    max_buffer_input_shards=ctx.cfg.shuffle_buffer_shards)
    ds.set_epoch(p)
    ds = ds.map(_stream_process, fn_kwargs={"ctx": ctx, "epoch": p}, remove_columns=ds.column_names)
    for row in _loader(ds, min(num_workers, ds.num_shards)):
        yield row


def _stream_batches(ctx: _Ctx, summary, rank, world_size, batch_size, epoch, start, spe, num_workers):
    """Per-bucket accumulation over this rank's part; passes continue past the epoch until ``spe`` batches exist."""
    if start >= spe:
        return
    produced, pending, skipped = 0, {}, []
    p = epoch
    while True:
        dry = True
        for out in _stream_pass(ctx, rank, world_size, p, num_workers):
            if out["bad"] is not None:
                skipped.append(tuple(out["bad"]))
                continue
            dry = False
            item = out["item"]
            bucket = tuple(item["bucket"])
            group = pending.setdefault(bucket, [])
            group.append(item)
            if len(group) == batch_size:
                del pending[bucket]
                if produced >= start:
                    yield _collate(group, skipped)
                    skipped = []
                produced += 1
                if produced >= spe:
                    return
        if dry:
            raise UserError(f"rank {rank} received no usable image from {ctx.cfg.dataset_name!r}")
        p += 1


# ---------------------------------------------------------------------------------------------------------------------
# Latents


def prepare_latents(summary: DatasetSummary, cfg: DataConfig, vae, latent_cfg, *, identity: str, rank: int = 0,
                    world_size: int = 1, progress: bool = True) -> CachedLatents:
    """Encode every (image, flip variant) the run can use, once; returns what ``TrainLoader(latents=...)`` takes.

    ``identity`` names the VAE (``utils.latents.vae_identity(vae, model_hash)``). With ``latent_cfg.cache_dir`` the
    work is split across ranks and entries already on disk are reused; call ``accelerator.wait_for_everyone()``
    afterwards, then ``check_latents``. Images that fail to decode are added to ``summary.skipped``."""
    from utils.hashes import sha256_file
    from utils.latents import EncodeJob, LatentStore, build_cache, cache_key

    if cfg.random_crop:
        raise UserError("--random_crop cannot be combined with cached latents (the crop changes every use)")
    store = LatentStore.for_vae(vae, latent_cfg)
    cached = CachedLatents(store, identity)
    flips = [f for f in (False, True) if (f and cfg.flip_p > 0) or (not f and cfg.flip_p < 1)]
    jobs = []
    if summary.kind == "folder":
        for ex in summary.examples:
            try:
                digest = sha256_file(ex.path)
            except OSError as e:
                summary.skipped.append(Skipped(ex.path, f"cannot read: {e}"))
                continue
            for f in flips:
                geom = plan_geometry(ex.size, ex.bucket, cfg.crop_mode, None, f)
                key = cache_key(digest, geom, identity)
                cached.keys[(ex.index, f)] = key
                jobs.append(EncodeJob(key, geom.target, _pixel_loader(ex.path, None, geom, cfg, cached, key),
                                      {"source": ex.path, "geometry": geom.key()}))
    else:
        jobs = _stream_jobs(cfg, cached, identity, flips)

    def on_error(job, e):
        summary.skipped.append(Skipped(str((job.meta or {}).get("source")), str(e)))

    build_cache(jobs, vae, store, rank=rank, world_size=world_size, batch_size=latent_cfg.encode_batch_size,
                progress=progress, on_error=on_error)
    if cfg.use_alpha_as_loss_weight and summary.kind == "folder":
        # Weights are small (latent size, one channel); every rank keeps them all in memory.
        for job in jobs:
            if job.key not in cached.weights:
                try:
                    job.load_pixels()
                except (ImageLoadError, OSError):
                    pass
    return cached


def _stream_jobs(cfg: DataConfig, cached: CachedLatents, identity: str, flips: list[bool]):
    """Encode jobs for a stream, produced while reading it (images are never all held)."""
    import hashlib

    from utils.latents import EncodeJob, cache_key

    ds, image_col, _ = open_stream(cfg)
    buckets = cfg.bucket_sizes() if cfg.enable_buckets else None
    for row in ds:
        try:
            data, name = _row_image_bytes(row.get(image_col))
            size = image_size(data)
        except (ImageLoadError, OSError):
            continue  # already reported by the scan
        digest = hashlib.sha256(data).hexdigest()
        for f in flips:
            geom = plan_geometry(size, cfg.target_for(size, buckets), cfg.crop_mode, None, f)
            key = cache_key(digest, geom, identity)
            load = _pixel_loader(None, data, geom, cfg, cached, key)
            if cfg.use_alpha_as_loss_weight and key not in cached.weights:
                try:  # every rank needs every weight map, also for images another rank encodes
                    load()
                except (ImageLoadError, OSError):
                    pass
            yield EncodeJob(key, geom.target, load, {"source": name, "geometry": geom.key()})


def _pixel_loader(path, data, geom: Geometry, cfg: DataConfig, cached: CachedLatents, key: str):
    def load() -> torch.Tensor:
        loaded = open_image(path) if path is not None else open_image_bytes(data)
        if loaded.rgb.size != geom.source:
            raise ImageLoadError(f"image changed since the scan ({loaded.rgb.size} != {geom.source})")
        if cfg.use_alpha_as_loss_weight:
            alpha = apply_geometry(loaded.alpha, geom) if loaded.alpha is not None else None
            cached.weights[key] = alpha_to_weight(alpha, geom.target)
        return _pixels(apply_geometry(loaded.rgb, geom))

    return load


def check_latents(cached: CachedLatents) -> None:
    """After all ranks built their share: every key must be readable (a rank that crashed leaves holes)."""
    missing = cached.store.missing(set(cached.keys.values()))
    if missing:
        raise UserError(f"{len(missing)} cached latent(s) missing from {cached.store.cache_dir}; rerun to rebuild them")


# ---------------------------------------------------------------------------------------------------------------------
# The loader the trainer holds


class TrainLoader:
    """Endless iterator of this rank's batches, epoch after epoch, with a resumable position.

    ``state_dict()`` -> {"epoch", "position"}: ``position`` micro-batches of ``epoch`` have been handed out. A new
    loader given that state continues with exactly the batch the old one would have yielded next (folder datasets;
    streams replay, see the module doc). Skipped inputs met while training are appended to ``report_file``."""

    def __init__(self, summary: DatasetSummary, cfg: DataConfig, prompt: PromptConfig, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0,
                 latents: CachedLatents | None = None, report_file: str | os.PathLike | None = None):
        self.summary, self.cfg, self.prompt = summary, cfg, prompt
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.latents, self.report_file = num_workers, latents, report_file
        self.steps_per_epoch = steps_per_epoch(summary, cfg, batch_size, world_size)
        _make_ctx(summary, cfg, prompt, seed, latents)  # validate templates/options now, not at the first batch
        self.epoch = 0
        self.position = 0
        self.skipped_during_run: list[Skipped] = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) * state.get("batch_size", self.batch_size) != \
                self.world_size * self.batch_size:
            # Another global batch size means another plan: restart the epoch rather than pretend to resume.
            self.epoch, self.position = int(state["epoch"]), 0
            return
        # Each rank takes one micro-batch of every global batch, so the position is also the number of global
        # batches consumed: it carries over to another world size with the same global batch size.
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def iter_epoch(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards ``epoch`` is advanced and ``position`` reset."""
        for batch in iter_batches(self.summary, self.cfg, self.prompt, rank=self.rank, world_size=self.world_size,
                                  batch_size=self.batch_size, epoch=self.epoch, seed=self.seed, start=self.position,
                                  num_workers=self.num_workers, latents=self.latents):
            self.position += 1
            if batch["skipped"]:
                self._record(batch["skipped"])
            yield batch
        self.epoch += 1
        self.position = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self.iter_epoch()

    def _record(self, skipped) -> None:
        known = {(s.path, s.reason) for s in self.skipped_during_run}
        new = [Skipped(p, r) for p, r in dict.fromkeys(map(tuple, skipped)) if (p, r) not in known]
        if not new:
            return
        self.skipped_during_run += new
        if self.report_file is not None:
            _write_report(self.report_file, self.summary.skipped + self.skipped_during_run)
