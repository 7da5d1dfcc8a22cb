#!/usr/bin/env python
"""Throughput of preprocess.py: source pictures per second for 1 and 2 worker processes.

Generates a few hundred photo-like JPEGs of mixed sizes and orientations (smooth gradients plus noise), then runs the
default crop-and-resize (plus, with --heavy, split, flips and focal crop) into a fresh folder per worker count.

    python bench/bench_preprocess.py --num_images 300 --workers 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import preprocess  # noqa: E402

SIZES = [(640, 480), (480, 640), (768, 512), (512, 512), (1024, 384), (400, 900)]


def make_pictures(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:04d}.jpg", quality=90)


def run_once(src: Path, dst: Path, workers: int, size: int, heavy: bool) -> dict:
    argv = ["--src", str(src), "--dst", str(dst), "--width", str(size), "--height", str(size), "--workers", str(workers)]
    if heavy:
        argv += ["--split_oversized", "--flip", "horizontal", "--focal_crop"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return preprocess.main(argv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=300, help="generated source pictures (default 300)")
    p.add_argument("--size", type=int, default=256, help="output width = height (default 256)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument("--heavy", action="store_true", help="also split, flip and focal-crop every picture")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t = time.perf_counter()
        make_pictures(src, args.num_images)
        print(f"generated {args.num_images} pictures in {time.perf_counter() - t:.1f}s; output {args.size}px"
              f"{' (split + flip + focal crop)' if args.heavy else ''}")
        for workers in args.workers:
            t = time.perf_counter()
            summary = run_once(src, Path(tmp) / f"dst{workers}", workers, args.size, args.heavy)
            elapsed = time.perf_counter() - t  # includes starting the worker processes
            print(f"workers={workers}: {summary['processed'] / elapsed:7.1f} images/s "
                  f"({summary['written'] / elapsed:.1f} outputs/s, {summary['processed']} images in {elapsed:.2f}s)")


if __name__ == "__main__":
    main()
