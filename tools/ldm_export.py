"""Write a diffusers SD-1.x / SD-2.x / SDXL folder as one original-layout (LDM) ``.safetensors``, as A1111 users have.

    python -m tools.ldm_export --model DIFFUSERS_FOLDER --out model.safetensors

The key mapping lives in utils/ldm_export.py. Flags are parsed before torch is imported.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.ldm_export",
        description="Write a diffusers SD-1.x/SD-2.x/SDXL folder as one LDM-layout .safetensors.")
    parser.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json inside)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--text_encoder_format", choices=("clip", "openclip"), default=None,
                        help="SD-1.x/2.x only. clip: SD-1.x layout; openclip: SD-2.x layout "
                             "(default: from the text encoder's activation)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.ldm_export import export_single_file

    print(export_single_file(args.model, args.out, args.text_encoder_format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
