"""Build a tiny random-weight Stable Diffusion model offline (for tests, the demo and trying the scripts on a CPU).

    python -m tools.tiny_models --family sd1 --out DIR

The recipes live in utils/tiny_models.py. Flags are parsed before torch is imported.
"""

from __future__ import annotations

import argparse
import sys

# The same values as utils.tiny_models.FAMILIES (tests/test_tools.py checks), here so that the parser needs no torch.
FAMILIES = ("sd1", "sd1-768", "sd2", "sdxl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.tiny_models",
                                     description="Build a tiny random-weight Stable Diffusion model offline.")
    parser.add_argument("--family", choices=FAMILIES, default="sd1",
                        help="sd1: text width 32 (fast tests); sd1-768: real SD-1 text width; sd2: 1024 wide, "
                             "v-prediction; sdxl: two text encoders (768 + 1280).")
    parser.add_argument("--out", required=True, help="output folder (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.tiny_models import save_tiny_model

    print(save_tiny_model(args.family, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
