"""Loading a Stable Diffusion pipeline the way users have one, plus dtype / attention / TF32 helpers.

A model is a Hub id (plain ``from_pretrained`` when online or cached), a local diffusers folder, or a single-file
checkpoint (``.safetensors``; ``.ckpt``/``.pt`` pickles only through ``torch.load(weights_only=True)``) as A1111
users have them. Single files load offline: the architecture configs of SD-1.x, SD-2.x (512 epsilon, 768 v) and
SDXL base ship in ``utils/model_configs/`` and the CLIP tokenizers are built from the local BPE table.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from utils.errors import UserError
from utils.hashes import ModelIdentity, model_identity
from utils.tokenizer import build_clip_tokenizer

CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
ARCHITECTURES = ("sd1", "sd2-512", "sd2-768", "sdxl")
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = [
    "ARCHITECTURES", "CONFIGS_DIR", "LoadedModel", "ModelIdentity", "ModelSource", "architecture_config",
    "checkpoint_shapes", "detect_architecture", "enable_xformers", "family_of", "load_checkpoint_file",
    "load_pipeline", "load_vae", "set_tf32", "uses_v_prediction", "weight_dtype",
]


@dataclass
class ModelSource:
    """What the user asked for (``--pretrained_model_name_or_path``, ``--revision``, ``--variant``, ``--vae``).

    ``revision`` and ``variant`` apply to Hub ids (``variant`` also to local folders, e.g. "fp16"); ``vae`` is a
    VAE folder or single file that replaces the pipeline's. ``model_config``: for single files, a diffusers config
    folder (or one of ``ARCHITECTURES``) to use instead of detecting the architecture from the weights.
    """

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    model_config: str | None = None
    tokenizer: str | None = None  # --tokenizer_name: replaces the (first) tokenizer


@dataclass
class LoadedModel:
    pipeline: Any  # StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str  # 'sd1' | 'sd2' | 'sdxl'
    prediction_type: str  # from the scheduler config: 'epsilon' | 'v_prediction' | ...
    identity: ModelIdentity
    vae_source: str | None = None  # --vae as given (its weights replace the model's own VAE)


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints safely


def _describe_unsafe_pickle(err: Exception) -> str:
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f"it references {m.group(1)}" if m else "it holds objects other than plain tensors"


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's flat state dict. Pickles go through ``weights_only=True`` only: a pickle that needs any other
    global is refused (nothing in it is executed). A Lightning ``state_dict`` wrapper is unwrapped."""
    p = Path(path)
    if p.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise UserError(f"{p}: not a readable .safetensors file ({' '.join(str(e).split())})") from None
    elif p.suffix.lower() in PICKLE_SUFFIXES:
        state = _load_pickle(p)
    else:
        raise UserError(f"{p}: unknown checkpoint format {p.suffix or '(no extension)'}; "
                        f"use .safetensors, .ckpt or a diffusers folder")
    return _unwrap(state, p)


def _load_pickle(p: Path) -> Any:
    try:
        # mmap avoids a second copy in RAM for multi-GB zip checkpoints; old (non-zip) pickles cannot be mapped
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        raise UserError(f"{p}: refusing to load this pickle: {_describe_unsafe_pickle(e)} (only plain tensors "
                        f"are loaded, nothing in the file is run); convert it to .safetensors with a tool you "
                        f"trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None


def _unwrap(state: Any, p: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{p}: holds no model weights")
    return state


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint, without reading tensor data for ``.safetensors``."""
    p = Path(path)
    if p.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        except Exception as e:
            raise UserError(f"{p}: not a readable .safetensors file ({' '.join(str(e).split())})") from None
        if any(k.startswith("state_dict.") for k in shapes):
            shapes = {k.removeprefix("state_dict."): v for k, v in shapes.items()}
        return shapes
    return {k: tuple(v.shape) for k, v in load_checkpoint_file(p).items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------------------------
# Which architecture a single file is


_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_TEXT_WIDTH_KEYS = (
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "text_encoder"),
    ("cond_stage_model.model.token_embedding.weight", "text_encoder"),
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", "text_encoder"),
    ("conditioner.embedders.1.model.token_embedding.weight", "text_encoder_2"),
)
_UNSUPPORTED = {
    "inpainting": "SD-1.x inpainting", "inpainting_v2": "SD-2.x inpainting", "xl_inpaint": "SDXL inpainting",
    "xl_refiner": "SDXL refiner", "playground-v2-5": "Playground v2.5", "upscale": "SD x4 upscaler",
    "instruct-pix2pix": "InstructPix2Pix",
}


def detect_architecture(shapes: Mapping[str, Sequence[int]], name: str = "checkpoint") -> str:
    """One of ``ARCHITECTURES`` for an LDM-layout state dict given as key -> shape.

    SD-2.x is reported as "sd2-768" (v-prediction, the common 2.x release); whether it really predicts v can only be
    told by running the UNet, see ``uses_v_prediction``.
    """
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if _UNET_IN not in shapes:
        component = "conv_in.weight" in shapes
        hint = " (it looks like one diffusers component; pass the pipeline folder)" if component else ""
        raise UserError(f"{name}: not a Stable Diffusion checkpoint: no model.diffusion_model.* weights{hint}")
    # diffusers' own detector only looks at key names and shapes; meta tensors give it those without any data
    meta = {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
    kind = infer_diffusers_model_type(meta)
    if kind in _UNSUPPORTED:
        raise UserError(f"{name}: {_UNSUPPORTED[kind]} checkpoints are not supported (SD-1.x, SD-2.x and SDXL base)")
    if kind == "v1":
        return "sd1"
    if kind == "v2":
        return "sd2-768"
    if kind == "xl_base":
        return "sdxl"
    raise UserError(f"{name}: unsupported model type {kind!r} (SD-1.x, SD-2.x and SDXL base are supported)")


def architecture_config(arch_or_dir: str | os.PathLike) -> Path:
    """The config folder for a name in ``ARCHITECTURES`` or a user-given diffusers config folder."""
    if str(arch_or_dir) in ARCHITECTURES:
        return CONFIGS_DIR / str(arch_or_dir)
    d = Path(arch_or_dir)
    if not (d / "model_index.json").is_file():
        raise UserError(f"--model_config {d}: expected one of {', '.join(ARCHITECTURES)} or a diffusers folder "
                        f"with model_index.json")
    return d


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _check_fits(shapes: Mapping[str, Sequence[int]], config_dir: Path, name: str) -> None:
    """Compare a few telling widths so a mismatch is one clear line instead of a wall of size errors."""
    problems = []
    unet = _read_json(config_dir / "unet" / "config.json")
    if _UNET_IN in shapes:
        got = shapes[_UNET_IN]
        want = (unet["block_out_channels"][0], unet.get("in_channels", 4))
        if tuple(got[:2]) != want:
            problems.append(f"UNet input conv {tuple(got[:2])} vs {want}")
    for key, component in _TEXT_WIDTH_KEYS:
        cfg = config_dir / component / "config.json"
        if key in shapes and cfg.is_file():
            width = _read_json(cfg)["hidden_size"]
            if shapes[key][-1] != width:
                problems.append(f"{component} width {shapes[key][-1]} vs {width}")
    if problems:
        raise UserError(f"{name} does not fit the model config {config_dir} ({'; '.join(problems)}); "
                        f"pass --model_config with a matching diffusers config folder")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_pipeline(source: ModelSource, torch_dtype: torch.dtype = torch.float32,
                  vae_dtype: torch.dtype | None = None) -> LoadedModel:
    """Load the pipeline ``source`` names; every user mistake is a one-line ``UserError``.

    Every component is created in ``torch_dtype`` straight from the files (no float32 copy of the whole pipeline in
    host RAM first, which on an 8-GPU node is 8 copies at once); the VAE in ``vae_dtype`` (default: the same), read
    from the files' own values, never through a narrower dtype."""
    where = source.pretrained_model_name_or_path
    vae_dtype = vae_dtype or torch_dtype
    path = Path(os.path.expanduser(where))
    if path.is_dir():
        pipe, config_dir = _load_folder(path, source, torch_dtype, vae_dtype)
        identity = model_identity(path, source.variant)
    elif path.is_file():
        pipe, config_dir = _load_single_file(path, source, torch_dtype, vae_dtype)
        identity = model_identity(path)
    elif _HUB_ID.match(where) and not where.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        folder = _download(where, source)
        pipe, config_dir = _load_folder(folder, source, torch_dtype, vae_dtype)
        identity = model_identity(folder, source.variant, name=where.replace("/", "_"))
    else:
        raise UserError(f"model not found: {where}: no such file or folder (expected a diffusers folder, "
                        f"a .safetensors/.ckpt file, or a Hub id like owner/name)")
    if source.vae:
        pipe.vae = load_vae(source.vae, config_dir, vae_dtype)
    if source.tokenizer:
        from utils.tokenizer import load_tokenizer

        pipe.tokenizer = load_tokenizer(source.tokenizer)
    return LoadedModel(pipe, family_of(pipe), pipe.scheduler.config.get("prediction_type", "epsilon"), identity,
                       vae_source=source.vae)


def _pipeline_class(name: str):
    import diffusers

    if name not in SUPPORTED_PIPELINES:
        raise UserError(f"unsupported pipeline {name!r}: Stable Diffusion 1.x/2.x and SDXL only")
    return getattr(diffusers, name)


def _load_folder(folder: Path, source: ModelSource, torch_dtype: torch.dtype, vae_dtype: torch.dtype):
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{folder}: a folder but not a diffusers pipeline (no model_index.json)")
    index = _read_json(index_file)
    cls = _pipeline_class(index.get("_class_name", "?"))
    extra = {}
    if "safety_checker" in index:  # the NSFW checker is for serving images, not training; don't load 1 GB of it
        extra = dict(safety_checker=None, requires_safety_checker=False)
    dtype = torch_dtype if vae_dtype == torch_dtype else {"default": torch_dtype, "vae": vae_dtype}
    try:
        pipe = cls.from_pretrained(folder, dtype=dtype, variant=source.variant, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot load ({_one_line(e)})") from None
    return pipe, folder


def _download(repo_id: str, source: ModelSource) -> Path:
    """The local snapshot of a Hub pipeline (downloaded when online, the cache when offline)."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id, revision=source.revision, variant=source.variant))
    except Exception as e:  # hub errors come in many types (offline, missing repo, gated, bad revision)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "offline (HF_HUB_OFFLINE) and not in the local cache" if offline else _one_line(e)
        raise UserError(f"model not found: {repo_id} is not a local file or folder and cannot be fetched "
                        f"from the Hub ({why})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _load_single_file(path: Path, source: ModelSource, torch_dtype: torch.dtype, vae_dtype: torch.dtype):
    shapes = checkpoint_shapes(path)  # also refuses unsafe pickles before diffusers touches the file
    explicit = source.model_config is not None
    if explicit:
        config_dir = architecture_config(source.model_config)
    else:
        config_dir = CONFIGS_DIR / detect_architecture(shapes, path.name)
    _check_fits(shapes, config_dir, path.name)
    index = _read_json(config_dir / "model_index.json")
    cls = _pipeline_class(index.get("_class_name", "?"))
    try:
        pipe = cls.from_single_file(str(path), config=str(config_dir), dtype=torch_dtype,
                                    local_files_only=True, **_offline_tokenizers(config_dir, index))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: cannot load with config {config_dir} ({_one_line(e)})") from None
    if vae_dtype != torch_dtype and not source.vae:
        pipe.vae = _checkpoint_vae(path, config_dir, vae_dtype)
    if not explicit and config_dir.name == "sd2-768" and not uses_v_prediction(pipe.unet):
        config_dir = CONFIGS_DIR / "sd2-512"
        _switch_to(pipe, config_dir)
    return pipe, config_dir


def _checkpoint_vae(path: Path, config_dir: Path, dtype: torch.dtype):
    """The VAE of a single-file checkpoint in ``dtype``, from the file's own tensors (a ``.safetensors`` file is
    read for those keys only): the pipeline was created in a narrower dtype, and upcasting that would not give back
    the file's values."""
    from diffusers import AutoencoderKL

    prefixes = ("first_stage_model.", "vae.")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            state = {k.removeprefix("state_dict."): f.get_tensor(k) for k in f.keys()
                     if k.removeprefix("state_dict.").startswith(prefixes)}
    else:
        state = {k: v for k, v in load_checkpoint_file(path).items() if k.startswith(prefixes)}
    try:
        return AutoencoderKL.from_single_file(state, config=str(config_dir), subfolder="vae", dtype=dtype,
                                              local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: cannot load its VAE with config {config_dir} ({_one_line(e)})") from None


def _offline_tokenizers(config_dir: Path, index: dict) -> dict:
    """CLIP tokenizers for the components whose config folder carries none: SD-1 and SDXL's first encoder pad with
    EOS, SD-2 and SDXL's second (OpenCLIP) encoder pad with id 0."""
    open_clip_text = _read_json(config_dir / "text_encoder" / "config.json").get("hidden_act") == "gelu"
    wanted = {"tokenizer": open_clip_text, "tokenizer_2": True}
    out = {}
    for name, open_clip_padding in wanted.items():
        if name in index and not any((config_dir / name).glob("*.json")):
            out[name] = build_clip_tokenizer(open_clip_padding=open_clip_padding)
    return out


def _switch_to(pipe, config_dir: Path) -> None:
    """Give an SD-2.x pipeline another release's scheduler and default size (the weights' layout is the same)."""
    import diffusers

    sched_cfg = _read_json(config_dir / "scheduler" / "scheduler_config.json")
    pipe.scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    pipe.unet.register_to_config(sample_size=_read_json(config_dir / "unet" / "config.json")["sample_size"])
    pipe.vae.register_to_config(sample_size=_read_json(config_dir / "vae" / "config.json")["sample_size"])


@torch.no_grad()
def uses_v_prediction(unet) -> bool:
    """Whether an SD-2.x UNet was trained for v-prediction, told from its output as A1111 does: on a flat grey
    latent at t=999, a v-model's output sits far below the input (the mean difference is under -1)."""
    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    t = torch.tensor([999], device=p.device)
    out = unet(x, t, encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1


def load_vae(vae: str | os.PathLike, config_dir: str | os.PathLike, torch_dtype: torch.dtype = torch.float32):
    """An ``AutoencoderKL`` from a diffusers folder (``config.json`` inside, or a pipeline's ``vae/``) or a single
    file (LDM or diffusers key layout; the architecture comes from ``config_dir/vae``)."""
    from diffusers import AutoencoderKL

    p = Path(os.path.expanduser(str(vae)))
    if p.is_dir():
        sub = None if (p / "config.json").is_file() else "vae" if (p / "vae" / "config.json").is_file() else ""
        if sub == "":
            raise UserError(f"--vae {p}: no config.json (nor vae/config.json) in this folder")
        try:
            return AutoencoderKL.from_pretrained(p, subfolder=sub, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"--vae {p}: cannot load ({_one_line(e)})") from None
    if not p.is_file():
        raise UserError(f"--vae {p}: not found")
    state = load_checkpoint_file(p)
    if any(k.startswith("encoder.down_blocks.") for k in state):  # already diffusers names
        model = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"--vae {p}: does not fit the model's VAE ({_one_line(e)[:200]})") from None
        return model.to(torch_dtype).eval()
    try:
        return AutoencoderKL.from_single_file(state, config=str(config_dir), subfolder="vae",
                                              dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"--vae {p}: cannot load ({_one_line(e)})") from None


def family_of(pipe) -> str:
    """'sdxl', 'sd2' or 'sd1', from the pipeline's text encoders (utils/text_encoders.py)."""
    from utils.text_encoders import TextEncoders

    return TextEncoders.of(pipe).family


# ----------------------------------------------------------------------------------------------------------------
# Precision and attention


_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype frozen models are cast to under ``--mixed_precision`` (accelerate's names: no, fp16, bf16)."""
    key = "no" if mixed_precision is None else str(mixed_precision).lower()
    if key not in _DTYPES:
        raise UserError(f"--mixed_precision {mixed_precision}: expected one of no, fp16, bf16")
    return _DTYPES[key]


def enable_xformers(unet) -> None:
    """Switch the UNet's attention to xformers, or say in one line why that cannot happen here."""
    try:
        unet.enable_xformers_memory_efficient_attention()
    except ModuleNotFoundError as e:
        if e.name not in (None, "xformers"):  # installed, but a part of it is missing: a broken build
            raise UserError(_broken_xformers(e)) from None
        raise UserError("--enable_xformers_memory_efficient_attention: xformers is not installed; install it with "
                        "`pip install -r requirements-cuda.txt` (CUDA only), or drop the flag to use PyTorch's "
                        "built-in SDPA attention") from None
    except ValueError as e:
        raise UserError("--enable_xformers_memory_efficient_attention: xformers needs a CUDA GPU "
                        f"({_one_line(e)[:120]}); drop the flag to use PyTorch's built-in SDPA attention") from None
    except Exception as e:  # noqa: BLE001 -- a build for another torch/CUDA fails in many ways (see below)
        raise UserError(_broken_xformers(e)) from None


def _broken_xformers(e: Exception) -> str:
    """A build of xformers for another torch or CUDA imports with a warning and then fails when used: "No operator
    found for memory_efficient_attention_forward" (NotImplementedError, many lines), undefined symbols (ImportError,
    OSError), or CUDA errors (RuntimeError)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = f"xformers {version('xformers')}"
    except PackageNotFoundError:
        installed = "xformers"
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return (f"--enable_xformers_memory_efficient_attention: {installed} is installed but cannot run with torch "
            f"{torch.__version__} on this GPU ({type(e).__name__}: {first[:160]}); install the xformers build made for "
            f"this torch (`pip install -r requirements-cuda.txt`), or drop the flag to use PyTorch's built-in SDPA "
            f"attention")


def set_tf32(allow: bool) -> None:
    """``--allow_tf32``: TF32 for float32 matmuls and cuDNN convolutions on Ampere+ GPUs (faster, ~10 mantissa
    bits). False restores PyTorch's default for matmuls (full fp32) and leaves cuDNN's default alone."""
    # The legacy flags on purpose: accelerate and diffusers set them too, and torch refuses to *read* the legacy
    # flags once the new fp32_precision API has been used to set them.
    torch.backends.cuda.matmul.allow_tf32 = allow
    if allow:
        torch.backends.cudnn.allow_tf32 = True
