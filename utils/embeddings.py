"""The Embedding type and every embedding file format in use (docs/a1111-rules.md, "Embedding files").

Reading (:func:`load_embedding`) follows A1111's rules: dispatch on the extension, classify the loaded dict
(``string_to_param`` / ``clip_l``+``clip_g`` / one tensor), name from the file stem except for images. Pickles are
loaded with ``weights_only=True``; the only non-tensor classes allowed are the two the original textual-inversion repo
pickled (``ParameterDict``, ``Parameter``).

Writing: A1111 ``.pt``, diffusers ``{token: [n, dim]}`` (``.safetensors`` or ``.bin``; SDXL as two files), kohya
``emb_params`` / ``clip_l``+``clip_g`` safetensors, and A1111's PNG card. All writes are atomic.

The command line (create, inspect, convert) is tools/embeddings.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.errors import UserError, first_line
from utils.fileio import atomic_path
from utils.hashes import sha256_file
from utils.pt_file import save_pt, write_pt

SDXL_KEYS = ("clip_l", "clip_g")
IMAGE_EXTENSIONS = (".png", ".webp", ".jxl", ".avif")
EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors") + IMAGE_EXTENSIONS
FORMATS = ("a1111", "diffusers", "kohya", "png", "diffusers-sdxl")
MAX_VECTORS = 75  # A1111's creation limit: one 75-token prompt chunk
A1111_STAR_TOKEN = 265  # CLIP id of "*"; A1111 writes it and never reads it
KOHYA_KEY = "emb_params"
# Classes the original textual-inversion repo pickled (string_to_param as a ParameterDict). Nothing else is allowed.
SAFE_TORCH_GLOBALS = (torch.nn.ParameterDict, torch.nn.Parameter)
_METADATA_KEYS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")


class EmbeddingError(UserError):
    """A file that should be an embedding but is not one, or is broken / unsafe. The message names the file."""


@dataclass
class Embedding:
    name: str
    # [n, dim] float32 on CPU, or for SDXL {"clip_l": [n, 768], "clip_g": [n, 1280]}
    vectors: torch.Tensor | dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    filename: str | None = None
    sha256: str | None = None  # of the file it was loaded from
    # "format" (a1111, a1111-parameterdict, diffusers, kohya, kohya-sdxl, png-text, png-pixels), "stored_name" (the
    # name inside the file when it differs from the one used), "token" (the key of a diffusers file)
    extra: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.vectors, dict)

    @property
    def num_vectors(self) -> int:
        v = self.vectors["clip_g"] if self.is_sdxl else self.vectors
        return int(v.shape[0])

    @property
    def width(self) -> int:
        """A1111's ``shape``: 768 (SD-1), 1024 (SD-2), 768 + 1280 = 2048 (SDXL)."""
        if self.is_sdxl:
            return int(sum(v.shape[-1] for v in self.vectors.values()))
        return int(self.vectors.shape[-1])

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:12] if self.sha256 else None

    @property
    def format(self) -> str | None:
        return self.extra.get("format")


# =====================================================================================================================
# Listing and reading


def _is_our_temp_file(name: str) -> bool:
    # utils.fileio.atomic_path writes ".<stem>.<random>.tmp<suffix>" next to the target; never a finished embedding.
    return name.startswith(".") and ".tmp." in name


# Folders and files that a training output folder holds besides embeddings (see list_embedding_files).
_CHECKPOINT_DIR = re.compile(r"^\.?checkpoint-\d+(\.tmp)?$")
_DIFFUSERS_COPY = re.compile(r"^learned_embeds(_2)?\.(safetensors|bin)$")
_RUN_PLOT = "evaluation.png"  # a run's evaluation curves (utils/eval_hook.py), not an embedding card
_RUN_SETTINGS = "training_settings.json"


def _model_component_dirs(root: str, files: list[str]) -> set[str]:
    """The sub-folders a diffusers pipeline folder (model_index.json) keeps its models in."""
    if "model_index.json" not in files:
        return set()
    try:
        with open(os.path.join(root, "model_index.json"), encoding="utf-8") as f:
            return {k for k in json.load(f) if not k.startswith("_")}
    except (OSError, ValueError, AttributeError):
        return set()


def list_embedding_files(folder: str | os.PathLike, recursive: bool = True) -> Iterator[Path]:
    """Files in ``folder`` with an embedding extension (sorted, symlinks followed, each real folder visited once).

    A training run's output folder can be given as is: what it holds besides embeddings is left out -- resumable
    ``checkpoint-N/`` folders (their trainable.pt is training state), the model folders of a pipeline saved with
    ``--save_as_full_pipeline`` (unet/, text_encoder/, ...), and, in a folder with training_settings.json,
    ``learned_embeds(_2).safetensors|.bin``, the diffusers copies of ``<name>.pt`` (A1111 would name them
    "learned_embeds"), and its evaluation plot. The final ``<name>`` files, ``<name>-best`` and the periodic
    ``<name>-<step>`` copies count. A learned_embeds file
    anywhere else (a downloaded diffusers concept) loads as A1111 loads it."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        components = _model_component_dirs(root, files)
        dirs[:] = sorted(d for d in dirs if not _CHECKPOINT_DIR.match(d) and d not in components)
        run_output = _RUN_SETTINGS in files
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in EMBEDDING_EXTENSIONS and not _is_our_temp_file(name) and \
                    not (run_output and (_DIFFUSERS_COPY.match(name) or name == _RUN_PLOT)):
                yield Path(root) / name
        if not recursive:
            break


# When several files give one name (a run's <name>.pt and <name>.safetensors; a periodic copy and its PNG card): the
# A1111 .pt first (it also carries the step and the model it was trained on), then .safetensors, .bin, then
# embedding images; among files of one kind the later one in folder order, as A1111 (whose order is the OS's).
FILE_PREFERENCE = (".bin", ".safetensors", ".pt")  # lowest first; anything else (images) below all


def file_preference(emb: Embedding) -> int:
    ext = os.path.splitext(emb.filename or "")[1].lower()
    return FILE_PREFERENCE.index(ext) + 1 if ext in FILE_PREFERENCE else 0


def prefer_files(embeddings: list[Embedding]) -> tuple[list[Embedding], dict[str, list[str]]]:
    """``embeddings`` (in folder order) reordered so that, name by name, the file to use comes last (so "the later one
    wins" picks it), and {name: [the file used, the others...]} for every name that several files give."""
    ordered = sorted(embeddings, key=file_preference)  # stable: folder order kept among files of one kind
    by_name: dict[str, list[str]] = {}
    for emb in reversed(ordered):
        by_name.setdefault(emb.name, []).append(emb.filename or "?")
    return ordered, {name: files for name, files in by_name.items() if len(files) > 1}


def duplicate_note(name: str, files: list[str]) -> str:
    """One line: which of the files that give ``name`` is used, and why."""
    used, others = files[0], files[1:]
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    why = ("the later one in folder order" if len(kinds) == 1 else
           "A1111 .pt before .safetensors before .bin before embedding images")
    return f"{len(files)} files give the embedding name '{name}': using {used} ({why}), not {', '.join(others)}"


def _vectors_from(value, path: Path, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{path}: {what} is a {type(value).__name__}, not a tensor")
    if value.ndim == 1:  # diffusers concept files hold one vector as [dim]
        value = value.unsqueeze(0)
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise EmbeddingError(f"{path}: {what} has shape {list(value.shape)}; an embedding is [vectors, width]")
    if value.is_complex() or value.dtype == torch.bool:
        raise EmbeddingError(f"{path}: {what} has dtype {value.dtype}, not a float type")
    # Files saved from a training GPU hold cuda tensors with requires_grad; always hand out plain CPU float32.
    value = value.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(value).all()):  # e.g. saved from a diverged run: it would turn every image into NaN
        bad = int((~torch.isfinite(value)).sum())
        raise EmbeddingError(f"{path}: {what} holds {bad} NaN or infinite value(s); refusing a broken embedding")
    return value


def _int_or_none(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


def embedding_from_data(data, name: str, path: str | os.PathLike = "<data>",
                        metadata: Mapping | None = None) -> Embedding:
    """Classify a loaded dict the way A1111 does (docs/a1111-rules.md, "Reading") and build an Embedding named ``name``.

    ``metadata`` supplies step/checkpoint fields when the data itself has none (safetensors header metadata).
    """
    path = Path(path)
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"{path}: not an embedding (the file holds a {type(data).__name__}, not a dict)")
    extra: dict = {}
    meta = data if "string_to_param" in data else (metadata or {})
    if "string_to_param" in data:
        params = data["string_to_param"]
        extra["format"] = "a1111-parameterdict" if isinstance(params, torch.nn.ParameterDict) else "a1111"
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else "no"
            raise EmbeddingError(f"{path}: embedding file has {count} terms in string_to_param; exactly one is needed")
        vectors = _vectors_from(next(iter(params.values())), path, "string_to_param")
    elif all(k in data for k in SDXL_KEYS):
        extra["format"] = "kohya-sdxl"
        vectors = {k: _vectors_from(data[k], path, k) for k in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingError(f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors but clip_g has "
                                 f"{vectors['clip_g'].shape[0]}")
    elif data and isinstance(next(iter(data.values())), torch.Tensor):
        if len(data) != 1:
            keys = ", ".join(map(str, list(data)[:4])) + (", ..." if len(data) > 4 else "")
            raise EmbeddingError(f"{path}: embedding file has {len(data)} tensors ({keys}); exactly one is needed")
        key, value = next(iter(data.items()))
        extra["format"] = "kohya" if key == KOHYA_KEY else "diffusers"
        if key != KOHYA_KEY:
            extra["token"] = str(key)
        vectors = _vectors_from(value, path, f"tensor {key!r}")
    else:
        what = "an empty dict" if not data else f"a dict with keys {', '.join(map(repr, list(data)[:5]))}"
        raise EmbeddingError(f"{path}: not a textual inversion embedding nor a diffusers concept ({what})")
    stored = meta.get("name")
    if stored is not None and str(stored) != name:
        extra["stored_name"] = str(stored)
    return Embedding(
        name=name,
        vectors=vectors,
        step=_int_or_none(meta.get("step")),
        sd_checkpoint=_str_or_none(meta.get("sd_checkpoint")),
        sd_checkpoint_name=_str_or_none(meta.get("sd_checkpoint_name")),
        filename=str(path),
        extra=extra,
    )


def _torch_load(path: Path):
    try:
        with torch.serialization.safe_globals(list(SAFE_TORCH_GLOBALS)), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol notes mean nothing to users
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        culprit = f" ({found.group(1)})" if found else ""
        raise EmbeddingError(f"{path}: refused to load: its pickle needs code an embedding never contains{culprit}; "
                             f"it may be malicious") from None
    except Exception as e:  # zip/pickle corruption surfaces as many exception types
        raise EmbeddingError(f"{path}: not a readable torch file ({type(e).__name__}: {first_line(e)})") from None


def _safetensors_load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, header errors, OSError
        raise EmbeddingError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def _load_image_embedding(path: Path) -> Embedding | None:
    from PIL import Image, UnidentifiedImageError

    from utils.png_embedding import MAX_CARD_PIXELS, CardTooLarge, PayloadError, read_image_payload

    if path.stem.lower().endswith(".preview"):  # extra-network thumbnails, never embeddings
        return None
    try:
        found = read_image_payload(path)
    except PayloadError as e:
        raise EmbeddingError(f"{path}: broken embedding in image ({e})") from None
    except CardTooLarge as e:
        raise EmbeddingError(f"{path}: image too large to be an embedding card ({e})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's limit, hit while opening
        found = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{found.group(1)} pixels" if found else "too many pixels"
        raise EmbeddingError(f"{path}: image too large to be an embedding card ({declared} declared in its header; "
                             f"budget {MAX_CARD_PIXELS})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
            MemoryError) as e:
        raise EmbeddingError(f"{path}: not a readable image ({type(e).__name__}: {first_line(e)})") from None
    if found is None:
        return None  # a plain picture: A1111 ignores it silently
    data, source = found
    stored = data.get("name")
    name = str(stored) if stored else path.stem
    emb = embedding_from_data(data, name, path)
    if emb.is_sdxl:
        raise EmbeddingError(f"{path}: image payloads hold SD-1/SD-2 embeddings only")
    emb.extra["format"] = f"png-{source}"
    emb.extra.pop("stored_name", None)
    return emb


def load_embedding(path: str | os.PathLike) -> Embedding | None:
    """Load any embedding file A1111 reads; None for files A1111 silently ignores.

    Ignored: unknown extensions, zero-byte files, ``*.preview.<image>`` and images without embedded data.
    Raises EmbeddingError (a UserError, one line, naming the file) for files that are not embeddings, are broken,
    or whose pickle wants anything beyond tensors.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EMBEDDING_EXTENSIONS:
        return None
    try:
        if path.stat().st_size == 0:
            return None
    except OSError as e:
        raise EmbeddingError(f"{path}: cannot read ({e.strerror or e})") from None
    if ext in IMAGE_EXTENSIONS:
        emb = _load_image_embedding(path)
    elif ext == ".safetensors":
        data, metadata = _safetensors_load(path)
        emb = embedding_from_data(data, path.stem, path, metadata)
    else:
        emb = embedding_from_data(_torch_load(path), path.stem, path)
    if emb is not None:
        emb.filename = str(path)
        emb.sha256 = sha256_file(path)
    return emb


def load_diffusers_sdxl_pair(path_l: str | os.PathLike, path_g: str | os.PathLike) -> Embedding:
    """Join diffusers' SDXL layout (two ``{token: [n, dim]}`` files, 768 and 1280 wide; either order) into one."""
    halves = []
    for p in (path_l, path_g):
        emb = load_embedding(p)
        if emb is None or emb.is_sdxl:
            raise EmbeddingError(f"{p}: not a single-encoder embedding file")
        halves.append(emb)
    halves.sort(key=lambda e: e.width)  # the 768-wide half belongs to CLIP-L, the 1280-wide one to OpenCLIP-G
    small, big = halves
    if small.num_vectors != big.num_vectors:
        raise EmbeddingError(f"{big.filename}: has {big.num_vectors} vectors but {small.filename} has "
                             f"{small.num_vectors}")
    if small.width == big.width:
        raise EmbeddingError(f"{path_l} and {path_g} are both {small.width} wide; an SDXL pair is 768 + 1280")
    token = small.extra.get("token") or big.extra.get("token")
    name = token.strip("<>") if token else small.name
    return Embedding(
        name=name, vectors={"clip_l": small.vectors, "clip_g": big.vectors},
        step=small.step if small.step is not None else big.step,
        sd_checkpoint=small.sd_checkpoint or big.sd_checkpoint,
        sd_checkpoint_name=small.sd_checkpoint_name or big.sd_checkpoint_name,
        filename=small.filename,
        extra={"format": "diffusers-sdxl", **({"token": token} if token else {})},
    )


def checksum(emb: Embedding | torch.Tensor) -> str:
    """A1111's 4-hex fingerprint of the values (docs/a1111-rules.md, "Hashes and checksums"): used in ``.optim``
    sidecars and old generation comments.

    A1111 leaves it undefined for SDXL; here it runs over clip_l then clip_g.
    """
    vec = emb.vectors if isinstance(emb, Embedding) else emb
    if isinstance(vec, dict):
        vec = torch.cat([vec[k].reshape(-1) for k in SDXL_KEYS])
    scaled = vec.detach().to("cpu", torch.float32).reshape(-1) * 100  # the product in float32, as A1111
    if not torch.isfinite(scaled).all():
        raise EmbeddingError("the embedding has non-finite values (NaN/inf); no checksum")
    r = 0
    for v in scaled.trunc().to(torch.int64).tolist():  # int() truncates toward zero
        r = ((r * 281) ^ (v * 997)) & 0xFFFFFFFF
    return f"{r & 0xFFFF:04x}"


# =====================================================================================================================
# Writing


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def _single(emb: Embedding, what: str) -> torch.Tensor:
    if emb.is_sdxl:
        raise EmbeddingError(f"{emb.name}: {what} holds one text encoder's vectors; SDXL embeddings are saved as "
                             f"kohya .safetensors (clip_l + clip_g) or the diffusers two-file layout")
    return _plain(emb.vectors)


def a1111_dict(emb: Embedding) -> dict:
    """The dict A1111 ``torch.save``s, keys in A1111's order (docs/a1111-rules.md, "Writing")."""
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": _single(emb, "an A1111 .pt / PNG")},
        "name": emb.name,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def _metadata(emb: Embedding) -> dict[str, str]:
    # safetensors headers only hold strings; A1111 ignores them, our reader restores step/checkpoint from them.
    values = {k: getattr(emb, k) for k in _METADATA_KEYS}
    return {k: str(v) for k, v in values.items() if v is not None}


def diffusers_prompt_token(name: str) -> str:
    """The token our diffusers files carry: ``<name>``. diffusers needs a token its tokenizer does not know yet (it
    refuses ``tiger``, a vocabulary word); A1111, ComfyUI and kohya ignore the key and use the file name."""
    return f"<{name}>"


def diffusers_token(emb: Embedding) -> str:
    """The prompt token of a diffusers file: the one it was loaded with, else ``<name>`` (diffusers' convention)."""
    return emb.extra.get("token") or f"<{emb.name}>"


def save_a1111_pt(emb: Embedding, path: str | os.PathLike) -> Path:
    # Our own zip writer, not torch.save: A1111's load-time check refuses the records recent torch releases add.
    return save_pt(a1111_dict(emb), path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        if Path(path).suffix.lower() == ".bin":  # the older diffusers concept layout: a torch pickle of the dict
            with open(tmp, "wb") as f:
                write_pt(tensors, f)  # A1111 checks .bin files like .pt ones (see utils/pt_file.py)
        else:
            save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_diffusers(emb: Embedding, path: str | os.PathLike, token: str | None = None) -> Path:
    """``{token: [n, dim]}`` as diffusers' ``load_textual_inversion`` reads it (``.safetensors``, or ``.bin``)."""
    vec = _single(emb, "a diffusers file")
    return _save_tensors({token or diffusers_token(emb): vec}, path, _metadata(emb))


def save_diffusers_sdxl(emb: Embedding, path: str | os.PathLike, path_2: str | os.PathLike | None = None,
                        token: str | None = None) -> tuple[Path, Path]:
    """diffusers' SDXL layout: ``path`` holds the CLIP-L vectors, ``path_2`` (default ``<stem>_2<suffix>``) the
    OpenCLIP-G ones, each as ``{token: [n, dim]}``."""
    if not emb.is_sdxl:
        raise EmbeddingError(f"{emb.name}: the diffusers SDXL layout needs an SDXL (clip_l + clip_g) embedding")
    path = Path(path)
    path_2 = Path(path_2) if path_2 else path.with_name(f"{path.stem}_2{path.suffix}")
    token = token or diffusers_token(emb)
    _save_tensors({token: _plain(emb.vectors["clip_l"])}, path, _metadata(emb))
    _save_tensors({token: _plain(emb.vectors["clip_g"])}, path_2, _metadata(emb))
    return path, path_2


def save_kohya(emb: Embedding, path: str | os.PathLike) -> Path:
    """kohya sd-scripts' layout: ``{'emb_params': [n, dim]}``, or ``{'clip_l', 'clip_g'}`` for SDXL."""
    if emb.is_sdxl:
        tensors = {k: _plain(emb.vectors[k]) for k in SDXL_KEYS}
    else:
        tensors = {KOHYA_KEY: _plain(emb.vectors)}
    if Path(path).suffix.lower() != ".safetensors":
        raise EmbeddingError(f"{path}: kohya embeddings are .safetensors files")
    return _save_tensors(tensors, path, _metadata(emb))


def save_png_card(emb: Embedding, path: str | os.PathLike, image=None, *, padding: str = "cyclic",
                  steps_done: int | None = None, checkpoint_hash: str | None = None) -> Path:
    """A1111's "embedding in PNG" card (docs/a1111-rules.md, "Embeddings inside images"): captioned picture + pixel
    payload + ``sd-ti-embedding`` text chunk.

    ``image`` is the preview picture (PIL); without one a pattern drawn from the vectors is used. ``steps_done``
    and ``checkpoint_hash`` only change the caption (default: the stored step and sd_checkpoint).
    """
    from PIL import PngImagePlugin

    from utils.png_embedding import TEXT_KEY, caption_card, default_card_background, encode_text_payload, \
        insert_pixel_payload

    data = a1111_dict(emb)
    if image is None:
        image = default_card_background(data["string_to_param"]["*"])
    steps = steps_done if steps_done is not None else (emb.step or 0)
    ckpt = checkpoint_hash or emb.sd_checkpoint
    card = caption_card(image, f"<{emb.name}>", emb.sd_checkpoint_name or "", f"[{ckpt}]" if ckpt else "",
                        f"{emb.num_vectors}v {steps}s")
    card = insert_pixel_payload(card, data, padding=padding)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, encode_text_payload(data))
    with atomic_path(path) as tmp:
        card.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


_EXTENSION_FORMATS = {".pt": ("a1111",), ".bin": ("diffusers",), ".png": ("png",),
                      ".safetensors": ("diffusers", "kohya", "diffusers-sdxl")}


def resolve_format(emb: Embedding, path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format a path + optional ``fmt`` mean: ``.pt`` a1111, ``.png`` card, ``.bin`` diffusers,
    ``.safetensors`` diffusers (kohya clip_l/clip_g for SDXL) unless ``fmt`` says otherwise."""
    ext = Path(path).suffix.lower()
    allowed = _EXTENSION_FORMATS.get(ext)
    if allowed is None:
        raise EmbeddingError(f"{path}: cannot tell the embedding format from the extension; use "
                             f"{', '.join(_EXTENSION_FORMATS)}")
    if fmt is None:
        fmt = "kohya" if ext == ".safetensors" and emb.is_sdxl else allowed[0]
    if fmt not in FORMATS:
        raise EmbeddingError(f"unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt not in allowed:
        raise EmbeddingError(f"{path}: format {fmt} cannot be written to a {ext} file")
    return fmt


def save_embedding(emb: Embedding, path: str | os.PathLike, fmt: str | None = None, *, overwrite: bool = True,
                   token: str | None = None, image=None, padding: str = "cyclic") -> Path:
    """Write ``emb`` in the format the extension (or ``fmt``) names; see :func:`resolve_format`.

    ``overwrite=False`` refuses an existing file (UserError). ``token`` applies to diffusers files, ``image`` and
    ``padding`` to PNG cards. Returns the path written (for diffusers-sdxl the first of the two files).
    """
    fmt = resolve_format(emb, path, fmt)
    path = Path(path)
    if not overwrite:
        targets = [path]
        if fmt == "diffusers-sdxl":
            targets.append(path.with_name(f"{path.stem}_2{path.suffix}"))
        for target in targets:
            if target.exists():
                raise UserError(f"{target} already exists (pass overwrite / --overwrite to replace it)")
    if fmt == "a1111":
        return save_a1111_pt(emb, path)
    if fmt == "diffusers":
        return save_diffusers(emb, path, token)
    if fmt == "diffusers-sdxl":
        return save_diffusers_sdxl(emb, path, token=token)[0]
    if fmt == "kohya":
        return save_kohya(emb, path)
    if emb.is_sdxl:
        raise EmbeddingError(f"{path}: A1111 PNG cards hold SD-1/SD-2 embeddings only; save SDXL as .safetensors")
    return save_png_card(emb, path, image, padding=padding)


# =====================================================================================================================
# Creating


def sanitize_name(name: str) -> str:
    """A1111's rule: keep letters, digits and ``. _ -`` and spaces; anything else is dropped."""
    clean = "".join(ch for ch in name if ch.isalnum() or ch in "._- ")
    if not clean.strip(" ."):
        raise UserError(f"embedding name {name!r} has no usable characters (letters, digits, '.', '_', '-', ' ')")
    return clean


def _init_token_ids(tokenizer, init_text: str, num_vectors: int, truncate: bool) -> list[int]:
    ids = list(tokenizer(init_text, add_special_tokens=False)["input_ids"])
    return ids[:num_vectors] if truncate else ids


def _init_vectors(init_text: str, num_vectors: int, tokenizer, token_embedding: torch.nn.Embedding,
                  truncate: bool) -> torch.Tensor:
    width = token_embedding.embedding_dim
    if not init_text:
        return torch.zeros(num_vectors, width)
    ids = _init_token_ids(tokenizer, init_text, num_vectors, truncate)
    if not ids:
        raise UserError(f"initialization text {init_text!r} gives no tokens; use a word or leave it empty for zeros")
    if max(ids) >= token_embedding.num_embeddings:
        raise UserError(f"initialization text {init_text!r} has token ids beyond the text encoder's vocabulary")
    table = token_embedding.weight.detach()[torch.tensor(ids)].to("cpu", torch.float32)
    # Stretch the tokens over the vectors (rows 0,0,1,1,2 for 3 tokens in 5), as A1111 does; do not cycle them.
    rows = [i * len(ids) // num_vectors for i in range(num_vectors)]
    return table[rows].clone()


def _check_num_vectors(num_vectors: int) -> None:
    if not isinstance(num_vectors, int) or isinstance(num_vectors, bool) or not 1 <= num_vectors <= MAX_VECTORS:
        raise UserError(f"number of vectors per token must be 1..{MAX_VECTORS}, not {num_vectors!r}")


def _truncates(tokenizer) -> bool:
    # SD-1 (HF CLIP) keeps at most n init tokens; SD-2 (OpenCLIP, pads with "!") keeps them all and subsamples.
    return getattr(tokenizer, "pad_token", None) != "!"


def create_embedding(name: str, init_text: str, num_vectors: int, tokenizer, token_embedding: torch.nn.Embedding,
                     *, truncate: bool | None = None) -> Embedding:
    """A fresh embedding as A1111 creates it (docs/a1111-rules.md, "Creating an embedding"): row i = embedding of init
    token ⌊i·T/n⌋; empty init -> zeros.

    ``truncate`` (default: decided from the tokenizer) keeps at most ``num_vectors`` init tokens, as SD-1 does.
    """
    _check_num_vectors(num_vectors)
    truncate = _truncates(tokenizer) if truncate is None else truncate
    vec = _init_vectors(init_text, num_vectors, tokenizer, token_embedding, truncate)
    return Embedding(name=sanitize_name(name), vectors=vec, step=0)


def create_embedding_sdxl(name: str, init_text: str, num_vectors: int,
                          encoders: Sequence[tuple[object, torch.nn.Embedding]]) -> Embedding:
    """SDXL: ``encoders`` = [(tokenizer, token_embedding) of CLIP-L, (tokenizer_2, token_embedding_2) of OpenCLIP-G].

    Both halves keep at most ``num_vectors`` init tokens so their rows stay aligned.
    """
    _check_num_vectors(num_vectors)
    if len(encoders) != 2:
        raise ValueError("SDXL needs exactly two (tokenizer, token_embedding) pairs")
    vecs = [_init_vectors(init_text, num_vectors, tok, emb, truncate=True) for tok, emb in encoders]
    return Embedding(name=sanitize_name(name), vectors=dict(zip(SDXL_KEYS, vecs)), step=0)


if __name__ == "__main__":
    raise SystemExit("python -m utils.embeddings moved: use python -m tools.embeddings create|inspect|convert")
