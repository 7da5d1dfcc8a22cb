"""Create, inspect and convert textual-inversion embedding files (A1111 .pt, diffusers, kohya, A1111 PNG cards).

    python -m tools.embeddings create --pretrained_model_name_or_path MODEL --name my-thing [--init_text "a cat"]
    python -m tools.embeddings inspect FILE...
    python -m tools.embeddings convert IN OUT [--format kohya|diffusers|a1111|png]

The file formats themselves live in utils/embeddings.py. Flags are parsed before torch is imported, so ``--help`` and
a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "python -m tools.embeddings"
# The same values as utils.embeddings.FORMATS / MAX_VECTORS (tests/test_tools.py checks), here so that the parser
# needs no torch.
FORMATS = ("a1111", "diffusers", "kohya", "png", "diffusers-sdxl")
MAX_VECTORS = 75


def _load_or_fail(path: str):
    from utils.embeddings import load_embedding
    from utils.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    emb = load_embedding(path)
    if emb is None:
        raise UserError(f"{path}: carries no embedding (A1111 would ignore this file)")
    return emb


def describe(emb) -> dict:
    """The fields ``inspect`` prints."""
    from utils.embeddings import EmbeddingError, checksum

    try:
        check = checksum(emb)
    except EmbeddingError:
        check = "n/a (non-finite values)"
    info = {
        "file": emb.filename, "format": emb.format, "name": emb.name, "vectors": emb.num_vectors, "width": emb.width,
        "step": emb.step, "sd_checkpoint": emb.sd_checkpoint, "sd_checkpoint_name": emb.sd_checkpoint_name,
        "sha256": emb.shorthash, "checksum": check,
    }
    if emb.is_sdxl:
        info["widths"] = {k: int(v.shape[-1]) for k, v in emb.vectors.items()}
    for key in ("stored_name", "token"):
        if key in emb.extra:
            info[key] = emb.extra[key]
    return info


def _cmd_inspect(args) -> None:
    from utils.errors import UserError, first_line

    failed = printed = 0
    for path in args.files:
        try:
            info = describe(_load_or_fail(path))
        except Exception as e:  # noqa: BLE001 - report and go on: one bad file should not hide the others
            failed += 1
            reason = str(e) if isinstance(e, UserError) else f"{path}: unreadable ({type(e).__name__}: {first_line(e)})"
            print(f"error: {' '.join(reason.split())}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(info))
            continue
        if printed:
            print()
        printed += 1
        for key, value in info.items():
            print(f"{key + ':':20s}{'-' if value is None else value}")
    if failed:
        raise UserError(f"{failed} of {len(args.files)} files could not be read as embeddings (reasons above)")


def _load_text_side(folder: Path, suffix: str = ""):
    """(tokenizer, token-embedding table) of a diffusers folder; ``suffix="_2"`` for SDXL's second encoder."""
    import transformers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from utils.errors import UserError, first_line

    transformers.logging.set_verbosity_error()  # load reports and progress bars are noise for a one-shot command
    transformers.logging.disable_progress_bar()
    model_cls = CLIPTextModelWithProjection if suffix else CLIPTextModel  # SDXL's text_encoder_2 has a projection
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / f"tokenizer{suffix}")
        encoder = model_cls.from_pretrained(folder / f"text_encoder{suffix}")
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot load tokenizer{suffix}/text_encoder{suffix} ({first_line(e)})") from None
    return tokenizer, encoder.get_input_embeddings()


def _text_sides(where: str) -> list:
    """(tokenizer, token-embedding table) per text encoder: read straight from a diffusers folder (fast), or through
    the project's model loader for single-file checkpoints and Hub ids."""
    folder = Path(where)
    if folder.is_dir() and (folder / "tokenizer").is_dir() and (folder / "text_encoder").is_dir():
        sides = [_load_text_side(folder)]
        if (folder / "text_encoder_2").is_dir():
            sides.append(_load_text_side(folder, "_2"))
        return sides
    from utils.models import ModelSource, load_pipeline

    pipe = load_pipeline(ModelSource(where)).pipeline
    sides = [(pipe.tokenizer, pipe.text_encoder.get_input_embeddings())]
    if getattr(pipe, "text_encoder_2", None) is not None:
        sides.append((pipe.tokenizer_2, pipe.text_encoder_2.get_input_embeddings()))
    return sides


def _cmd_create(args) -> None:
    import torch

    from utils.embeddings import (Embedding, create_embedding, create_embedding_sdxl, resolve_format,
                                  sanitize_name, save_embedding)
    from utils.errors import UserError

    name = sanitize_name(args.name)
    if args.output and Path(args.output).suffix != ".safetensors":
        # fail on a bad --output before loading a model (.safetensors suits both SD and SDXL, checked later)
        resolve_format(Embedding(name, torch.zeros(1, 1)), Path(args.output), args.format)
    sides = _text_sides(args.pretrained_model_name_or_path)
    sdxl = len(sides) == 2
    output = Path(args.output) if args.output else Path(args.embeddings_dir) / (
        f"{name}.safetensors" if sdxl else f"{name}.pt")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists (pass --overwrite to replace it)")
    if sdxl:
        emb = create_embedding_sdxl(name, args.init_text, args.num_vectors, sides)
    else:
        emb = create_embedding(name, args.init_text, args.num_vectors, *sides[0])
    written = save_embedding(emb, output, resolve_format(emb, output, args.format), overwrite=args.overwrite)
    print(f"created {written} ({emb.num_vectors} vectors x {emb.width})")


def _cmd_convert(args) -> None:
    from utils.embeddings import (IMAGE_EXTENSIONS, load_diffusers_sdxl_pair, resolve_format, sanitize_name,
                                  save_embedding)
    from utils.errors import UserError

    if args.input_2:
        emb = load_diffusers_sdxl_pair(args.input, args.input_2)
    else:
        emb = _load_or_fail(args.input)
    output = Path(args.output)
    if output.resolve() == Path(args.input).resolve():
        raise UserError(f"{output}: output is the input file")
    if args.name:
        emb.name = sanitize_name(args.name)
    elif output.suffix.lower() not in IMAGE_EXTENSIONS:
        # A1111 names .pt/.bin/.safetensors after the file: store that name so the file agrees with its keyword.
        emb.name = output.stem
    written = save_embedding(emb, output, args.format, overwrite=args.overwrite, token=args.token,
                             padding=args.padding)
    print(f"wrote {written} ({resolve_format(emb, output, args.format)}, {emb.num_vectors} vectors x {emb.width})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create, inspect and convert textual-inversion embedding files (A1111 .pt, diffusers, kohya, "
                    "A1111 PNG cards).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{create,inspect,convert}")

    p = sub.add_parser("create", help="create a new embedding from initialization text, as A1111's Train tab does",
                       description="Create a new embedding: each vector starts as the token embedding of the "
                                   "initialization text (stretched over the vectors), or zeros for empty text.")
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="diffusers model folder; its tokenizer/ and text_encoder/ (and _2 for SDXL) are used")
    p.add_argument("--name", required=True, help="embedding name (the prompt keyword); characters other than "
                                                 "letters, digits, '.', '_', '-' and space are dropped")
    p.add_argument("--init_text", default="*",
                   help="initialization text (default: '*'); pass '' for all-zero vectors")
    p.add_argument("--num_vectors", type=int, default=1, help=f"vectors per token, 1..{MAX_VECTORS} (default: 1)")
    p.add_argument("--embeddings_dir", default="embeddings",
                   help="folder for <name>.pt (<name>.safetensors for SDXL) when --output is not given "
                        "(default: embeddings)")
    p.add_argument("--output", help="file to write instead; the extension picks the format")
    p.add_argument("--format", choices=FORMATS, help="file format, when the extension allows several (.safetensors: "
                                                     "diffusers, kohya or diffusers-sdxl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser("inspect", help="print name, vectors, width, step, checkpoint, hashes and format",
                       description="Print what an embedding file holds. Files A1111 would ignore are reported "
                                   "as errors.")
    p.add_argument("files", nargs="+", help="embedding files (.pt, .bin, .safetensors, .png, .webp)")
    p.add_argument("--json", action="store_true", help="one JSON object per file instead of text")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("convert", help="convert between embedding formats",
                       description="Convert an embedding to another format; the output extension picks it "
                                   "(.pt A1111, .png A1111 card, .bin diffusers, .safetensors diffusers, or kohya "
                                   "clip_l/clip_g for SDXL) unless --format says otherwise.")
    p.add_argument("input", help="embedding file to read (any format utils.embeddings.load_embedding reads)")
    p.add_argument("output", help="file to write")
    p.add_argument("--input_2", help="second file of diffusers' SDXL layout (the 1280-wide text_encoder_2 half); "
                                     "the pair is joined into one clip_l/clip_g embedding")
    p.add_argument("--format", choices=FORMATS,
                   help="output format when the extension allows several; diffusers-sdxl also writes <stem>_2")
    p.add_argument("--name", help="name to store (default: the output file's stem, as A1111 names .pt/.bin/"
                                  ".safetensors files; for PNG cards the loaded name, which becomes their keyword)")
    p.add_argument("--token", help="the key of diffusers files (default: the loaded token, else <name>)")
    p.add_argument("--padding", choices=("cyclic", "zero"), default="cyclic",
                   help="PNG card payload padding: cyclic (newest A1111, default) or zero (older A1111)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.errors import exit_on_user_error

    with exit_on_user_error(PROG):
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
