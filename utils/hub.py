"""The model card of a trained embedding or hypernetwork, and publishing a run's final files on the Hugging Face Hub.

The card (``README.md`` in the output folder) is written after every run, pushed or not. It is for the people who
will *use* the file: the trigger word, the base model and its hash, how to load it in A1111, ComfyUI and diffusers,
sample images from the final previews, the training settings and the tracker run. ``--push_to_hub`` (diffusers'
flag, with ``--hub_model_id`` and ``--hub_token`` / ``HF_TOKEN``) then uploads the final files, the card, those
samples, the loss log and training_settings.json through huggingface_hub -- not checkpoints or periodic copies.

A run that could not upload (an offline cluster node) is published later from any machine with network:

    python -m tools.hub OUTPUT_DIR --hub_model_id you/my-embedding    # the command line: tools/hub.py
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError

CARD_FILE = "README.md"
CARD_MARK = "<!-- model card written by Embedforge; it is rewritten by the next run in this folder -->"
SETTINGS_FILE = "training_settings.json"
LOSS_LOGS = {"embedding": "textual_inversion_loss.csv", "hypernetwork": "hypernetwork_loss.csv"}
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


# ---------------------------------------------------------------------------------------------------------------
# What the card says


@dataclass
class CardInfo:
    kind: str  # "embedding" | "hypernetwork"
    name: str  # file stem; for an embedding also the word to write in prompts
    family: str  # "sd1" | "sd2" | "sdxl"
    base_model: str  # a Hub id, or the name of the local file/folder trained on (local paths are not published)
    base_model_on_hub: bool
    base_model_name: str | None  # A1111's name of the model
    base_model_hash: str | None  # A1111's short hash of the model
    step: int
    files: list[str]  # the final files, relative to the output folder
    samples: list[str] = field(default_factory=list)  # final preview images, relative to the output folder
    settings: dict[str, str] = field(default_factory=dict)  # label -> value, shown as a table
    run_link: str | None = None  # W&B run URL (or how to find an offline run)
    repo_id: str | None = None  # where it is published; None: the card describes the local folder
    full_pipeline: bool = False  # --save_as_full_pipeline wrote a diffusers pipeline into the folder
    num_vectors: int | None = None


def _ref(info: CardInfo) -> str:
    """What a loader is pointed at: the Hub repo, or the local output folder."""
    return info.repo_id or "path/to/this/folder"


def _base_ref(info: CardInfo) -> str:
    return info.base_model if info.base_model_on_hub else f"path/to/{info.base_model}"


def _embedding_usage(info: CardInfo) -> list[str]:
    from utils.embeddings import diffusers_prompt_token

    n, ref, base = info.name, _ref(info), _base_ref(info)
    tok = diffusers_prompt_token(n)  # diffusers needs a new token; the files carry <name>
    sdxl = info.family == "sdxl"
    a1111_file = f"{n}.safetensors" if sdxl else f"{n}.pt"
    lines = [
        "## How to use it", "",
        f"Write **`{n}`** in a prompt, e.g. `a photo of {n}` (in diffusers: **`{tok}`**).", "",
        f"- **AUTOMATIC1111 web UI**: put `{a1111_file}` in `stable-diffusion-webui/embeddings/` and write `{n}` in "
        "the prompt (or the negative prompt).",
        f"- **ComfyUI**: put `{n}.safetensors` in `ComfyUI/models/embeddings/` and write `embedding:{n}` in the prompt.",
        "- **diffusers**:", "", "```python", "import torch",
    ]
    pipe_cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    lines.append(f"from diffusers import {pipe_cls}")
    lines.append("")
    if info.full_pipeline:
        lines += [f'pipe = {pipe_cls}.from_pretrained("{ref}", torch_dtype=torch.float16).to("cuda")',
                  "# this folder is the whole model with the embedding already added to its tokenizer"]
    else:
        lines.append(f'pipe = {pipe_cls}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")')
        if sdxl:
            lines += [f'pipe.load_textual_inversion("{ref}", weight_name="learned_embeds.safetensors", token="{tok}",',
                      "                           text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                      f'pipe.load_textual_inversion("{ref}", weight_name="learned_embeds_2.safetensors", token="{tok}",',
                      "                           text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
        else:
            lines.append(f'pipe.load_textual_inversion("{ref}", weight_name="learned_embeds.safetensors", '
                         f'token="{tok}")')
    lines += [f'image = pipe("a photo of {tok}").images[0]', "```", ""]
    return lines


def _hypernetwork_usage(info: CardInfo) -> list[str]:
    n = info.name
    return [
        "## How to use it", "",
        f"- **AUTOMATIC1111 web UI**: put `{n}.pt` in `stable-diffusion-webui/models/hypernetworks/` and add "
        f"`<hypernet:{n}:1>` to the prompt (the number is the strength).",
        f"- **ComfyUI**: put `{n}.pt` in `ComfyUI/models/hypernetworks/` and apply it to the model with the "
        "*HypernetworkLoader* node (strength 1.0).",
        "- **diffusers** has no hypernetwork loader; Embedforge's `inference.py` applies it to a diffusers model:", "",
        "```bash",
        f'python inference.py --pretrained_model_name_or_path {_base_ref(info)} --hypernetwork_dir . '
        f'--prompt "a photo <hypernet:{n}:1>"',
        "```", "",
    ]


def model_card(info: CardInfo) -> str:
    """The card's text: Hub metadata (YAML front matter) and a page for people who will use the file."""
    from huggingface_hub import ModelCardData

    what = "Textual Inversion embedding" if info.kind == "embedding" else "hypernetwork"
    family = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}.get(info.family,
                                                                                                 info.family)
    tags = ["stable-diffusion", "text-to-image", "embedforge",
            "textual-inversion" if info.kind == "embedding" else "hypernetwork"]
    if info.family == "sdxl":
        tags.insert(1, "stable-diffusion-xl")
    meta = ModelCardData(base_model=info.base_model if info.base_model_on_hub else None, tags=tags,
                         library_name="diffusers" if info.kind == "embedding" else None)
    model = info.base_model_name or info.base_model
    model_hash = f" (A1111 hash `{info.base_model_hash}`)" if info.base_model_hash else ""
    script = "train_textual_inversion.py" if info.kind == "embedding" else "train_hypernetwork.py"
    lines = ["---", meta.to_yaml(), "---", CARD_MARK, "", f"# {info.name}", "",
             f"A {what} for {family}, trained for {info.step} steps on **{model}**{model_hash} with Embedforge's "
             f"`{script}`.", ""]
    if info.kind == "embedding":
        vectors = f", {info.num_vectors} vector(s)" if info.num_vectors else ""
        lines += [f"Trigger word: **`{info.name}`**{vectors}.", ""]
    lines += _embedding_usage(info) if info.kind == "embedding" else _hypernetwork_usage(info)
    lines += ["## Files", ""] + [f"- `{f}`" for f in info.files] + [""]
    if info.samples:
        lines += ["## Samples", "", f"Previews rendered at the end of training (step {info.step}):", ""]
        lines += [f"![{Path(s).stem}](./{s})" for s in info.samples] + [""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in info.settings.items()]  # a | would end the cell
    lines += ["", f"Every option of the run is in `{SETTINGS_FILE}`."]
    if info.run_link:
        lines += ["", f"Training run: {info.run_link}"]
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: Path, info: CardInfo) -> Path | None:
    """Write ``README.md`` (atomically). A README.md that Embedforge did not write is kept, and None returned."""
    from utils.fileio import write_text_atomic

    path = Path(out_dir) / CARD_FILE
    if path.is_file() and CARD_MARK not in path.read_text(encoding="utf-8", errors="replace"):
        print(f"note: {path} was not written by Embedforge; it is kept and no model card is written",
              file=sys.stderr)
        return None
    write_text_atomic(path, model_card(info))
    return path


# ---------------------------------------------------------------------------------------------------------------
# From a run's output folder to the card


def _final_files(out_dir: Path, kind: str, name: str) -> list[str]:
    stems = [f"{name}.pt", f"{name}.safetensors"]
    if kind == "embedding":
        stems += ["learned_embeds.safetensors", "learned_embeds_2.safetensors", "learned_embeds.bin"]
    return [s for s in stems if (out_dir / s).is_file()]


def _samples(out_dir: Path, name: str, step: int) -> list[str]:
    found = sorted((out_dir / "images").glob(f"{glob.escape(name)}-{step}-*.png"),
                   key=lambda p: int(p.stem.rsplit("-", 1)[1]) if p.stem.rsplit("-", 1)[1].isdigit() else 0)
    return [p.relative_to(out_dir).as_posix() for p in found]


def _training_rows(kind: str, s: dict) -> dict[str, str]:
    def get(key, default="-"):
        value = s.get(key)
        return default if value in (None, "") else value

    width = s.get("width") or s.get("resolution")
    height = s.get("height") or s.get("resolution")
    batch, accum, world = int(get("train_batch_size", 1)), int(get("gradient_accumulation_steps", 1)), \
        int(get("world_size", 1))
    rows = {"steps": f"{get('final_step')} (of {get('max_train_steps')})",
            "learning rate": f"{get('learning_rate')}"
                             + (f" ({s['lr_scheduler']})" if s.get("lr_scheduler") not in (None, "constant") else "")
                             + (" x global batch (--scale_lr)" if s.get("scale_lr") else ""),
            "batch": f"{batch * accum * world} = {batch} per process x {accum} accumulation x {world} process(es)",
            "resolution": f"{width} x {height}" + (" (aspect-ratio buckets)" if s.get("enable_buckets") else ""),
            "training images": f"{get('num_of_dataset_images')}"
                               + (f", {s['repeats']} repeats" if int(s.get("repeats") or 1) > 1 else "")}
    if kind == "embedding":
        rows["vectors per token"] = str(get("num_vectors"))
        rows["initialization text"] = f"`{get('initializer_token', '')}`"
    else:
        rows["layer structure"] = str(get("layer_structure"))
        rows["activation"] = str(get("activation_func"))
        rows["layer norm / dropout"] = f"{bool(s.get('layer_norm'))} / {get('dropout_structure', 'none')}"
        rows["context widths"] = ", ".join(map(str, s.get("sizes") or [])) or "-"
    template = s.get("template_file") or (f"{get('learnable_property')} templates" if kind == "embedding" else "-")
    rows["prompts"] = "the captions only" if s.get("caption_only") else str(template)
    rows["precision"] = str(get("mixed_precision_used", get("mixed_precision", "no")))
    rows["seed"] = str(get("seed"))
    return rows


def read_settings(out_dir: Path) -> dict:
    path = Path(out_dir) / SETTINGS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{out_dir}: no {SETTINGS_FILE}; is this a training output folder?") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def card_info(out_dir: Path, settings: dict, run_link: str | None = None, repo_id: str | None = None) -> CardInfo:
    """The card of the run whose ``training_settings.json`` content is ``settings``."""
    out_dir = Path(out_dir)
    kind = "hypernetwork" if settings.get("hypernetwork_name") else "embedding"
    name = settings.get("hypernetwork_name") if kind == "hypernetwork" else settings.get("embedding_name")
    if not name:
        raise UserError(f"{out_dir / SETTINGS_FILE}: names neither an embedding nor a hypernetwork")
    source = str(settings.get("pretrained_model_name_or_path") or "")
    local = os.path.exists(os.path.expanduser(source))
    step = int(settings.get("final_step") or 0)
    return CardInfo(
        kind=kind, name=name, family=str(settings.get("model_family") or "sd1"),
        base_model=Path(source).name if local else source, base_model_on_hub=not local and "/" in source,
        base_model_name=settings.get("model_name"), base_model_hash=settings.get("model_hash"), step=step,
        files=_final_files(out_dir, kind, name), samples=_samples(out_dir, name, step),
        settings=_training_rows(kind, settings), run_link=run_link, repo_id=repo_id,
        full_pipeline=bool(settings.get("save_as_full_pipeline")) and (out_dir / "model_index.json").is_file(),
        num_vectors=settings.get("num_vectors") if kind == "embedding" else None)


def upload_paths(out_dir: Path, info: CardInfo, settings: dict) -> list[str]:
    """What a push uploads, relative to the folder: final files, card, samples, settings, loss log, and the pipeline
    when --save_as_full_pipeline wrote one, TensorBoard logs when they were kept. Never checkpoints."""
    out_dir = Path(out_dir)
    paths = list(info.files) + [CARD_FILE, SETTINGS_FILE, LOSS_LOGS[info.kind]] + list(info.samples)
    if info.full_pipeline:
        paths.append("model_index.json")
        paths += [f"{d}/**" for d in PIPELINE_FOLDERS if (out_dir / d).is_dir()]
    if settings.get("report_to") in ("tensorboard", "all") and settings.get("logging_dir"):
        paths.append(f"{settings['logging_dir']}/**")
    return [p for p in paths if p.endswith("/**") or (out_dir / p).is_file()]


# ---------------------------------------------------------------------------------------------------------------
# Publishing


@dataclass
class HubTarget:
    """--hub_model_id (None: the output folder's name, as diffusers) and --hub_token (None: HF_TOKEN or the saved
    login, which huggingface_hub finds itself)."""

    repo_id: str | None = None
    token: str | None = None


def check_can_push(target: HubTarget) -> None:
    """Called before training: a push that cannot work is an error now, not after hours of training."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError("publishing to the Hub (--push_to_hub) needs the network but HF_HUB_OFFLINE is set; train "
                        "without it and publish later with: python -m tools.hub OUTPUT_DIR --hub_model_id ID")
    if not (target.token or get_token()):
        raise UserError("publishing to the Hub (--push_to_hub) needs a Hugging Face token: give --hub_token, set "
                        "HF_TOKEN, or run `hf auth login` once")


def publish(out_dir: Path, target: HubTarget, run_link: str | None = None) -> str:
    """Create the repo if needed, write the card naming it, upload; returns the repo id."""
    from huggingface_hub import HfApi

    out_dir = Path(out_dir)
    settings = read_settings(out_dir)
    api = HfApi(token=target.token)
    repo_id = api.create_repo(target.repo_id or out_dir.resolve().name, exist_ok=True).repo_id
    info = card_info(out_dir, settings, run_link=run_link, repo_id=repo_id)
    write_model_card(out_dir, info)
    api.upload_folder(repo_id=repo_id, folder_path=str(out_dir),
                      allow_patterns=[p if p.endswith("/**") else glob.escape(p)
                                      for p in upload_paths(out_dir, info, settings)],
                      commit_message=f"{info.name}: step {info.step} (Embedforge)")
    return repo_id


if __name__ == "__main__":
    raise SystemExit("python -m utils.hub moved: use python -m tools.hub OUTPUT_DIR --hub_model_id ID")
