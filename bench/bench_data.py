"""Throughput of the training data path on generated images: decode + resize + batch with 0/1/2 DataLoader workers,
reading cached latents, and the VAE-encode cost per image (tiny offline VAE unless --vae points at a real one).

    python bench/bench_data.py                       # 64 JPEGs 768x512 -> 512x512, batch 4
    python bench/bench_data.py --num_images 200 --workers 0 2 4 --vae /path/to/sd-model

Compare images/s with the training step rate: a step at batch b needs b images, so the data path keeps up when
images/s > b x steps/s (field notes: the tiny model trains at 20-50 steps/s on CPU; real SD at 512 px does ~1-3
steps/s per GPU at batch 1-4).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, n: int, size: tuple[int, int], fmt: str) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        # smooth gradients + mild noise: decodes like a photo (pure noise would be unrealistically slow to decode)
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, (xx + yy + 40 * i) % 256], -1).astype(np.float32)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}-a generated picture {i}.{fmt}", quality=92)
        (folder / f"{i:05d}-a generated picture {i}.txt").write_text(f"tag{i % 7}, gradient, noise")


def time_loader(summary, cfg, pc, batch_size: int, workers: int, latents=None, epochs: int = 1) -> float:
    from utils.data import TrainLoader

    loader = TrainLoader(summary, cfg, pc, batch_size=batch_size, num_workers=workers, latents=latents)
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in loader.iter_epoch():
            n += len(batch["prompts"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num_images", type=int, default=64, help="images to generate (default 64)")
    ap.add_argument("--image_size", type=int, nargs=2, default=(768, 512), metavar=("W", "H"),
                    help="size of the generated images (default 768 512)")
    ap.add_argument("--format", default="jpg", choices=("jpg", "png", "webp"), help="file format of the images")
    ap.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    ap.add_argument("--batch_size", type=int, default=4, help="per-process batch size (default 4)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    ap.add_argument("--center_crop", action="store_true", help="center crop instead of A1111's stretch")
    ap.add_argument("--vae", default=None,
                    help="diffusers model folder whose vae/ to time (default: the tiny offline SD-1)")
    ap.add_argument("--encode_images", type=int, default=8, help="images to push through the VAE (default 8)")
    args = ap.parse_args()

    import torch

    from utils.data import DataConfig, PromptConfig, prepare_latents, scan_dataset
    from utils.latents import LatentConfig, vae_identity

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        t0 = time.perf_counter()
        make_images(folder, args.num_images, tuple(args.image_size), args.format)
        print(f"generated {args.num_images} {args.format} images {args.image_size[0]}x{args.image_size[1]} "
              f"in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
        cfg = DataConfig(train_data_dir=str(folder), resolution=args.resolution, center_crop=args.center_crop)
        pc = PromptConfig(placeholder="<tok>", shuffle_tags=True)
        t0 = time.perf_counter()
        summary = scan_dataset(cfg, pc)
        print(f"scan (headers + captions): {summary.num_examples / (time.perf_counter() - t0):.0f} images/s")

        time_loader(summary, cfg, pc, args.batch_size, 0)  # warm-up: imports, first-call costs
        print(f"\ndecode + resize to {args.resolution} + batch {args.batch_size} (pixel_values):")
        for w in args.workers:
            rate = time_loader(summary, cfg, pc, args.batch_size, w)
            print(f"  workers={w}: {rate:7.1f} images/s")

        from diffusers import AutoencoderKL

        if args.vae:
            vae_path = args.vae
        else:
            from utils.tiny_models import tiny_model_path

            vae_path = tiny_model_path("sd1")
        vae = AutoencoderKL.from_pretrained(vae_path, subfolder="vae").eval()
        x = torch.randn(args.batch_size, 3, args.resolution, args.resolution)
        with torch.no_grad():
            vae.encode(x[:1])  # warm-up
            t0 = time.perf_counter()
            reps = max(1, args.encode_images // args.batch_size)
            for _ in range(reps):
                vae.encode(x)
        per = (time.perf_counter() - t0) / (reps * args.batch_size)
        label = "given" if args.vae else "tiny offline"
        print(f"\nVAE encode ({label} VAE, {args.resolution}px, batch {args.batch_size}): {per * 1000:.1f} ms/image "
              f"({1 / per:.1f} images/s) -- paid once per image with the latent cache, every step without it")

        sub = DataConfig(train_data_dir=str(folder), resolution=args.resolution, center_crop=args.center_crop)
        small = scan_dataset(sub)
        small.examples = small.examples[: max(args.batch_size, args.encode_images)]
        small.num_examples = len(small.examples)
        small.bucket_counts = {small.examples[0].bucket: small.num_examples}
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            cached = prepare_latents(small, sub, vae, LatentConfig("once", cache_dir=cache), identity=vae_identity(vae),
                                     progress=False)
            print(f"building the disk cache: {small.num_examples / (time.perf_counter() - t0):.1f} images/s "
                  "(decode + resize + encode + write)")
            for w in args.workers[:2]:
                rate = time_loader(small, sub, pc, args.batch_size, w, latents=cached, epochs=3)
                print(f"  reading cached latents, workers={w}: {rate:7.1f} images/s")


if __name__ == "__main__":
    main()
