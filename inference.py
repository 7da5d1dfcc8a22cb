"""Generate images with Textual Inversion embeddings (and hypernetworks) used by name, as in A1111.

    python inference.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --prompt "a photo of a cat, style of my-embedding" --negative_prompt "EasyNegative" --seed 42

Embeddings are every file under --embeddings_dir (A1111 .pt, diffusers .bin/.safetensors, kohya, embedding PNGs),
used by writing their name in the prompt; folders are re-checked before each prompt (only new or changed files are
read), so files added or replaced while a prompt file runs are picked up. Images are saved as ``NNNNN-<seed>.png``
with A1111's ``parameters`` text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Only standard-library modules at the top: --help and flag errors come before torch and diffusers load.
from utils.config import GenerationSettings, InferenceConfig, InferenceModelSettings, LibrarySettings, resolve
from utils.errors import UserError, exit_on_user_error
from utils.fileio import check_writable_folder
from utils.samplers import check_generation, sampler_names

DEFAULT_EMBEDDINGS_DIR = "embeddings"
DEFAULT_HYPERNETWORK_DIR = "hypernetworks"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Hub id, local diffusers folder, or single-file checkpoint (.safetensors/.ckpt).")
    m.add_argument("--revision", help="Hub revision of the model.")
    m.add_argument("--variant", help="Weight variant, e.g. fp16.")
    m.add_argument("--vae", help="Replace the model's VAE (folder or single file).")
    m.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="Run the model in this precision (fp16/bf16 need a GPU to be fast).")
    m.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu. Default: cuda if available.")

    e = p.add_argument_group("embeddings and hypernetworks")
    e.add_argument("--embeddings_dir", action="append", default=None,
                   help=f"Folder of embeddings, searched recursively; repeat for several. A training --output_dir "
                        f"works as is (its checkpoints and diffusers copies are left out). Default: "
                        f"{DEFAULT_EMBEDDINGS_DIR}/ (if it exists).")
    e.add_argument("--list_embeddings", action="store_true",
                   help="Print the embeddings usable with this model (and those skipped, with the reason), then exit.")
    e.add_argument("--hypernetwork", action="append", default=[], metavar="NAME[:MULT]",
                   help="Apply a hypernetwork from --hypernetwork_dir to every prompt (same as adding "
                        "<hypernet:NAME:MULT> to it); repeatable.")
    e.add_argument("--hypernetwork_dir", action="append", default=None,
                   help=f"Folder of hypernetwork .pt files for --hypernetwork and <hypernet:NAME:MULT> prompt tags; "
                        f"repeatable. Default: {DEFAULT_HYPERNETWORK_DIR}/.")

    g = p.add_argument_group("generation")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="The prompt. Embedding names and <hypernet:NAME:MULT> tags may appear in it; "
                                      "(word:1.2) / [word] emphasis and BREAK work as in A1111.")
    src.add_argument("--prompt_file", help="A text file with one prompt per line (blank lines skipped).")
    g.add_argument("--negative_prompt", default="", help="The negative prompt (embeddings work here too).")
    g.add_argument("--steps", type=int, default=20, help="Sampling steps.")
    g.add_argument("--sampler", default="Euler a", help=f"A1111 sampler name: {', '.join(sampler_names())}.")
    g.add_argument("--cfg_scale", type=float, default=7.0, help="Classifier-free guidance scale.")
    g.add_argument("--seed", type=int, default=-1,
                   help="Seed of the first image; image i of a prompt uses seed + i. -1: random (a new one per prompt "
                        "line).")
    g.add_argument("--width", type=int, default=None,
                   help="Image width (multiple of 8). Default: the model's own size, its UNet sample size x VAE "
                        "factor (512 for SD-1.5, 768 for SD-2 768-v, 1024 for SDXL, 64 for the tiny test models).")
    g.add_argument("--height", type=int, default=None,
                   help="Image height (multiple of 8). Default: the model's own size, as --width.")
    g.add_argument("--batch_size", type=int, default=1, help="Images generated together.")
    g.add_argument("--n_iter", type=int, default=1, help="Batches per prompt (A1111's batch count).")

    o = p.add_argument_group("output")
    o.add_argument("--outdir", default="outputs/txt2img-images", help="Where images are written.")
    o.add_argument("--grid", action="store_true", help="Also save all images of each prompt as grid-NNNN.png.")
    return p


def resolve_config(argv: list[str] | None = None) -> InferenceConfig:
    """The flags, once, as the typed config the rest of the run reads."""
    return resolve(InferenceConfig, vars(build_parser().parse_args(argv)))


def read_prompts(g: GenerationSettings) -> list[str]:
    if g.prompt is not None:
        return [g.prompt]
    if g.prompt_file is None:
        raise UserError("give --prompt or --prompt_file (or --list_embeddings)")
    try:
        lines = Path(g.prompt_file).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"--prompt_file {g.prompt_file}: {e.strerror or e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompt_file {g.prompt_file}: no prompts in it")
    return prompts


def embedding_dirs(lib: LibrarySettings) -> list[Path]:
    if lib.embeddings_dir is None:
        return [Path(DEFAULT_EMBEDDINGS_DIR)]  # optional: a missing default folder just means no embeddings
    missing = [d for d in lib.embeddings_dir if not Path(d).is_dir()]
    if missing:
        raise UserError(f"--embeddings_dir {missing[0]}: no such folder")
    return [Path(d) for d in lib.embeddings_dir]


def hypernetwork_tags(values: list[str]) -> str:
    """``--hypernetwork NAME[:MULT]`` flags as the prompt tags A1111 would write (so the infotext reproduces)."""
    tags = []
    for value in values:
        name, _, mult = value.partition(":")
        try:
            mult = float(mult) if mult else 1.0
        except ValueError:
            raise UserError(f"--hypernetwork {value}: multiplier must be a number") from None
        tags.append(f"<hypernet:{name}:{mult:g}>")
    return "".join(" " + t for t in tags)


def check_generation_flags(g: GenerationSettings) -> None:
    """The generation flags, before torch loads (utils.generation.validate checks them again with the model's own
    size and VAE factor)."""
    check_generation(g.steps, g.cfg_scale, g.batch_size, g.n_iter, g.sampler, {"width": g.width, "height": g.height})


def print_embeddings(db, width: int) -> None:
    from utils.embeddings import duplicate_note

    row = "  {:<28} {:>7} {:>6} {:>7}  {:<12}  {}"

    def show(emb, extra: str = "") -> None:
        print(row.format(emb.name, emb.num_vectors, emb.width, "-" if emb.step is None else emb.step,
                         emb.shorthash or "-", extra).rstrip())

    print(f"Loaded embeddings ({len(db.loaded)}), model text width {width}:")
    print(row.format("name", "vectors", "width", "step", "hash", "").rstrip())
    for emb in db.loaded.values():
        show(emb)
    print(f"Skipped embeddings ({len(db.skipped)}):")
    for name, emb in db.skipped_embeddings.items():
        show(emb, db.skipped[name])
    if db.errors:
        print(f"Not embeddings ({len(db.errors)}):")
        for path, message in db.errors.items():
            print(f"  {message if message.startswith(path) else f'{path}: {message}'}")
    if db.duplicates:
        print(f"Names given by several files ({len(db.duplicates)}):")
        for name, files in db.duplicates.items():
            print(f"  {duplicate_note(name, files)}")


def report_duplicates(db, limit: int = 3) -> None:
    """Say which file is used when several give one name: one line each, the first ``limit`` names."""
    from utils.embeddings import duplicate_note

    for name, files in list(db.duplicates.items())[:limit]:
        print(f"note: {duplicate_note(name, files)}", file=sys.stderr)
    if len(db.duplicates) > limit:
        print(f"note: {len(db.duplicates) - limit} more names are given by several files (the same rule; "
              "--list_embeddings shows them)", file=sys.stderr)


def model_default_size(pipeline) -> int:
    """The size the model was made for: its UNet sample size times the VAE's down-scaling factor."""
    return int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)


def load_pipeline(source, **kwargs):
    """utils.models.load_pipeline, imported only once the flags have been checked."""
    from utils.models import load_pipeline as load

    return load(source, **kwargs)


def device_of(m: InferenceModelSettings) -> str:
    import torch

    device = m.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {device}: {str(e).splitlines()[0]}") from None
    return device


def generation_params(g: GenerationSettings, prompt: str, default_size: int):
    """--width/--height not given: the model's own size (``default_size``)."""
    from utils.generation import GenerationParams, resolve_seed

    return GenerationParams(
        prompt=prompt, negative_prompt=g.negative_prompt, steps=g.steps, sampler=g.sampler, cfg_scale=g.cfg_scale,
        seed=resolve_seed(g.seed), width=default_size if g.width is None else g.width,
        height=default_size if g.height is None else g.height, batch_size=g.batch_size, n_iter=g.n_iter)


def main(argv: list[str] | None = None) -> int:
    cfg = resolve_config(argv)
    m, lib, g = cfg.model, cfg.library, cfg.generation
    with exit_on_user_error("inference.py"):
        # Everything the flags alone can show is checked before the model loads.
        prompts = [] if lib.list_embeddings else read_prompts(g)
        dirs = embedding_dirs(lib)
        always_on = hypernetwork_tags(lib.hypernetwork)
        if not lib.list_embeddings:
            check_generation_flags(g)
            check_writable_folder(cfg.output.outdir, "--outdir")

        from utils.generation import HypernetworkLibrary, generate, image_grid, next_image_number, split_hypernet_tags
        from utils.infotext import save_png
        from utils.models import ModelSource, weight_dtype
        from utils.prompts import EmbeddingDatabase, PromptEncoder, warn_refused_files

        device = device_of(m)
        source = ModelSource(m.pretrained_model_name_or_path, revision=m.revision, variant=m.variant, vae=m.vae)
        model = load_pipeline(source, torch_dtype=weight_dtype(m.mixed_precision))
        model.pipeline.to(device)
        db = EmbeddingDatabase(dirs)
        encoder = PromptEncoder(model.pipeline, db)

        if lib.list_embeddings:
            encoder.refresh()
            print_embeddings(db, encoder.expected_width)
            return 0

        hypernetworks = HypernetworkLibrary(lib.hypernetwork_dir or [DEFAULT_HYPERNETWORK_DIR])
        outdir = Path(cfg.output.outdir)
        size = model_default_size(model.pipeline)
        reported = None
        for prompt in prompts:
            params = generation_params(g, prompt + always_on, size)
            encoder.refresh()  # pick up embedding files changed since the last prompt (only changed files are read)
            warn_refused_files(db, "inference.py")  # once per file, again only if it changes
            if db.version != reported:
                report_duplicates(db)
                reported = db.version
            for label, text in (("prompt", params.prompt), ("negative prompt", params.negative_prompt)):
                used, limit = encoder.count_tokens(split_hypernet_tags(text)[0])
                print(f"{label}: {used}/{limit} tokens", file=sys.stderr)
            results = generate(model, encoder, params, refresh_embeddings=False, hypernetworks=hypernetworks)
            for result in results:
                path = outdir / f"{next_image_number(outdir):05}-{result.seed}.png"
                save_png(result.image, path, result.infotext)
                print(path)
            if cfg.output.grid and results:
                path = outdir / f"grid-{next_image_number(outdir, 'grid-'):04}.png"
                save_png(image_grid([r.image for r in results]), path, results[0].infotext)
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
