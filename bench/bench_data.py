"""The training data path, measured.

    python bench/bench_data.py [throughput] ...   # decode + resize + batch with 0/1/2 workers, latent cache, VAE cost
    python bench/bench_data.py generate --root /tmp/ef-data --sizes 1000,10000,100000,1000000
    python bench/bench_data.py scale --root /tmp/ef-data --sizes 1000,10000,100000 --procs 1,2 \\
        --baseline /tmp/embedforge-main --json /tmp/scale.json

``throughput`` (the default): images/s of the data path against the training step rate; a step at batch b needs b
images, so the data path keeps up when images/s > b x steps/s (the tiny model trains at 20-50 steps/s on CPU; real
SD at 512 px does ~1-3 steps/s per GPU at batch 1-4).

``generate``: N 64 px JPEGs with a caption each, written once as a folder (N <= 100k), WebDataset tars and parquet
files (about 1000 rows per file, at least 2 and at most 200 files). Past 20,000 the pictures repeat, each copy made
distinct by its index appended after the JPEG's end marker (decoders ignore it; cache keys see different bytes).

``scale``: the whole ``train_textual_inversion.py`` as a user runs it (tiny model, 64 px, batch 4 per process,
latents cached in memory by default), for every data set, format and process count, on this tree and optionally on
another checkout (``--baseline``) side by side: time from the model being loaded to the first step, from the launch
to the first step, the largest gap between two steps across an epoch boundary (a second run that resumes an
embedding a few steps before the end of epoch 0, so the boundary comes quickly at any N), and the peak RSS of the
largest process. Timestamps come from a thin wrapper (``_run``) around the real script: it records when
``load_model_for_training`` returns and when ``LoaderSource.iter_epoch`` hands the loop each batch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOLDER_MAX = 100_000
DISTINCT = 20_000  # distinct pictures made by `generate`
FORMATS = ("folder", "wds", "parquet")


# ---------------------------------------------------------------------------------------------------------------------
# throughput


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
    loader.close()
    return n / (time.perf_counter() - t0)


def throughput(args) -> None:
    import torch

    from utils.data import DataConfig, PromptConfig, TrainLoader, scan_dataset
    from utils.latents import LatentConfig, LatentStore, vae_identity
    from utils.training_setup import LoaderSource

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
        print(f"scan: {summary.num_examples / (time.perf_counter() - t0):.0f} images/s")

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

        with tempfile.TemporaryDirectory() as cache:
            store = LatentStore.for_vae(vae, LatentConfig("once", cache_dir=cache), identity=vae_identity(vae))
            source = LoaderSource(TrainLoader(summary, cfg, pc, batch_size=args.batch_size, latents=store), vae, 0,
                                  False, "once")
            t0 = time.perf_counter()
            n = sum(len(b["prompts"]) for b in source.iter_epoch(0, 0))
            print(f"first epoch, latents encoded as met and written to disk: {n / (time.perf_counter() - t0):.1f} "
                  "images/s (decode + resize + encode + write)")
            for w in args.workers[:2]:
                rate = time_loader(summary, cfg, pc, args.batch_size, w, latents=store, epochs=3)
                print(f"  later epochs, reading cached latents, workers={w}: {rate:7.1f} images/s")


# ---------------------------------------------------------------------------------------------------------------------
# generate


def _jpeg(i: int, rng, xx, yy) -> bytes:
    base = np.stack([(xx * (i % 13 + 1)) % 256, (yy * 3 + i) % 256, (xx + yy + 40 * i) % 256], -1).astype(np.float32)
    img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def generate(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    yy, xx = np.mgrid[0:64, 0:64]
    for n in args.sizes:
        root = Path(args.root)
        files = int(np.clip(n // 1000, 2, 200))
        per = n // files
        folder = root / f"folder-{n}" if n <= FOLDER_MAX else None
        wds, pqd = root / f"wds-{n}", root / f"parquet-{n}"
        if (pqd / "done").is_file():
            print(f"{n}: already there")
            continue
        for d in (folder, wds, pqd):
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
        rng, i, t0, pictures = np.random.default_rng(n), 0, time.perf_counter(), []
        for s in range(files):
            images, captions = [], []
            with tarfile.open(wds / f"shard-{s:05d}.tar", "w") as t:
                for _ in range(per):
                    if i < DISTINCT:
                        pictures.append(_jpeg(i, rng, xx, yy))
                    data = pictures[i % DISTINCT] + i.to_bytes(4, "big")
                    caption = f"tag{i % 7}, gradient, noise, number {i}"
                    for ext, blob in (("jpg", data), ("txt", caption.encode())):
                        info = tarfile.TarInfo(f"{i:07d}.{ext}")
                        info.size = len(blob)
                        t.addfile(info, io.BytesIO(blob))
                    if folder is not None:
                        (folder / f"{i:07d}.jpg").write_bytes(data)
                        (folder / f"{i:07d}.txt").write_text(caption)
                    images.append({"bytes": data, "path": None})
                    captions.append(caption)
                    i += 1
            pq.write_table(pa.table({"image": images, "text": captions}), pqd / f"part-{s:05d}.parquet",
                           row_group_size=1000)
        (pqd / "done").write_text(str(n))
        print(f"{n}: {n} images as {'folder, ' if folder else ''}{files} tars, {files} parquet files "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# scale


def _run(impl: str, out: str, argv: list[str]) -> None:
    """Inside each process: the real script, with timestamps taken around two of its calls."""
    sys.path.insert(0, impl)
    import atexit

    import utils.training_setup as ts

    marks: dict = {"batches": []}
    load = ts.load_model_for_training
    iter_epoch = ts.LoaderSource.iter_epoch

    def timed_load(*a, **k):
        model = load(*a, **k)
        marks["model_loaded"] = time.time()
        return model

    def timed_iter(self, epoch, skip):
        for batch in iter_epoch(self, epoch, skip):
            marks["batches"].append((epoch, time.time()))
            yield batch

    def write():
        status = Path("/proc/self/status").read_text()
        marks["peak_rss_mb"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
        rank = os.environ.get("RANK", "0")
        Path(out, f"rank{rank}.json").write_text(json.dumps(marks))

    ts.load_model_for_training = timed_load
    ts.LoaderSource.iter_epoch = timed_iter
    atexit.register(write)
    import train_textual_inversion as tti
    from utils.errors import exit_on_user_error

    with exit_on_user_error("train_textual_inversion.py"):
        tti.main(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_file(path: Path, model: Path, step: int) -> Path:
    """An A1111 .pt embedding at ``step`` (the trainer continues its step counter)."""
    import torch

    width = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, width)}, "name": "bench",
                "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


def _source_args(fmt: str, root: Path, n: int) -> list[str]:
    if fmt == "folder":
        return ["--train_data_dir", str(root / f"folder-{n}")]
    return ["--dataset_name", str(root / f"{fmt}-{n}")]


def one_run(impl: str, fmt: str, n: int, procs: int, args, model: Path, boundary: bool) -> dict:
    batch = args.batch_size
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        marks = tmp / "marks"
        marks.mkdir()
        per_epoch = n // (batch * procs)
        train = ["--pretrained_model_name_or_path", str(model), *_source_args(fmt, Path(args.root), n),
                 "--placeholder_token", "bench", "--initializer_token", "object", "--resolution", "64",
                 "--train_batch_size", str(batch), "--output_dir", str(tmp / "out"), "--no_previews",
                 "--save_every", "0", "--checkpointing_steps", "0", "--report_to", "none", "--seed", "0"]
        if boundary:  # start a few steps before the end of epoch 0
            start = per_epoch - args.steps // 2
            train += ["--resume_embedding", str(_resume_file(tmp / "start.pt", model, start)),
                      "--max_train_steps", str(start + args.steps)]
        else:
            train += ["--max_train_steps", str(args.steps)]
        cmd = [sys.executable, str(Path(__file__).resolve()), "_run", impl, str(marks), "--", *train]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if procs > 1:
            accelerate = str(Path(sys.executable).parent / "accelerate")
            cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   *cmd[1:]]
            env["ACCELERATE_USE_CPU"] = "true"
        load = os.getloadavg()[0]
        launched = time.time()
        try:
            p = subprocess.run(cmd, cwd=impl, env=env, capture_output=True, text=True, timeout=args.timeout)
            rc, log = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = "timeout", str(e.stdout or "")[-2000:]
        wall = time.time() - launched
        ranks = [json.loads(f.read_text()) for f in sorted(marks.glob("rank*.json"))]
    row = {"impl": impl, "format": fmt, "n": n, "procs": procs, "run": "boundary" if boundary else "start",
           "load": round(load, 2), "rc": rc, "wall_s": round(wall, 1)}
    if rc != 0 or not ranks or not all(r["batches"] for r in ranks):
        row["error"] = log.strip().splitlines()[-1][:300] if isinstance(log, str) and log.strip() else str(rc)
        return row
    first = max(r["batches"][0][1] for r in ranks)
    row["model_to_first_step_s"] = round(first - max(r["model_loaded"] for r in ranks), 2)
    row["launch_to_first_step_s"] = round(first - launched, 2)
    row["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in ranks))
    gaps, boundary_gaps = [], []
    for r in ranks:
        b = r["batches"]
        for (e0, t0), (e1, t1) in zip(b, b[1:]):
            (boundary_gaps if e1 != e0 else gaps).append(t1 - t0)
    row["step_gap_median_s"] = round(statistics.median(gaps), 3) if gaps else None
    if boundary:
        row["epoch_boundary_gap_s"] = round(max(boundary_gaps), 3) if boundary_gaps else None
    return row


def scale(args) -> None:
    from utils.tiny_models import tiny_model_path

    model = Path(args.model or tiny_model_path("sd1"))
    impls = ([str(ROOT)] if not args.baseline_only else []) + \
        ([str(Path(args.baseline).resolve())] if args.baseline else [])
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else []
    for n in args.sizes:
        for fmt in args.formats:
            if fmt == "folder" and n > FOLDER_MAX:
                continue
            for procs in args.procs:
                for impl in impls:
                    for boundary in (False, True):
                        if boundary and n > args.boundary_max or not boundary and args.boundary_only:
                            continue
                        row = one_run(impl, fmt, n, procs, args, model, boundary)
                        row["impl"] = "this tree" if impl == str(ROOT) else "baseline"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.json:
                            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))


def print_table(args) -> None:
    rows = [r for f in args.files for r in json.loads(Path(f).read_text())]
    print(table(rows))


def table(rows: list[dict]) -> str:
    """One line per (format, N, processes): baseline and this tree side by side."""
    def cell(r, k, fmt="{:.2f}"):
        if r is None:
            return "-"
        if "error" in r:
            if r["rc"] != "timeout":
                return "failed"
            return f"> {r['wall_s']:.0f}" if k.endswith("_s") else "-"
        v = r.get(k)
        return "-" if v is None else fmt.format(v)

    keys = sorted({(r["format"], r["n"], r["procs"]) for r in rows}, key=lambda k: (k[1], FORMATS.index(k[0]), k[2]))
    out = ["| N | format | procs | load | model -> 1st step, s (base / new) | launch -> 1st step, s (base / new) | "
           "epoch-boundary gap, s (base / new) | step, s | peak RSS MB (base / new) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for fmt, n, procs in keys:
        get = {(r["impl"], r["run"]): r for r in rows if (r["format"], r["n"], r["procs"]) == (fmt, n, procs)}
        b, t = get.get(("baseline", "start")), get.get(("this tree", "start"))
        bb, tb = get.get(("baseline", "boundary")), get.get(("this tree", "boundary"))
        loads = [r["load"] for r in (b, t, bb, tb) if r]
        out.append(f"| {n} | {fmt} | {procs} | {min(loads):.1f}-{max(loads):.1f} | "
                   f"{cell(b, 'model_to_first_step_s')} / {cell(t, 'model_to_first_step_s')} | "
                   f"{cell(b, 'launch_to_first_step_s')} / {cell(t, 'launch_to_first_step_s')} | "
                   f"{cell(bb, 'epoch_boundary_gap_s')} / {cell(tb, 'epoch_boundary_gap_s')} | "
                   f"{cell(t, 'step_gap_median_s', '{:.3f}')} | "
                   f"{cell(b, 'peak_rss_mb', '{:.0f}')} / {cell(t, 'peak_rss_mb', '{:.0f}')} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        sep = sys.argv.index("--")
        return _run(sys.argv[2], sys.argv[3], sys.argv[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode")
    t = sub.add_parser("throughput", help="decode/resize throughput, latent cache, VAE cost (the default)")
    for p in (ap, t):
        p.add_argument("--num_images", type=int, default=64, help="images to generate (default 64)")
        p.add_argument("--image_size", type=int, nargs=2, default=(768, 512), metavar=("W", "H"),
                       help="size of the generated images (default 768 512)")
        p.add_argument("--format", default="jpg", choices=("jpg", "png", "webp"), help="file format of the images")
        p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
        p.add_argument("--batch_size", type=int, default=4, help="per-process batch size (default 4)")
        p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
        p.add_argument("--center_crop", action="store_true", help="center crop instead of A1111's stretch")
        p.add_argument("--vae", default=None,
                       help="diffusers model folder whose vae/ to time (default: the tiny offline SD-1)")
        p.add_argument("--encode_images", type=int, default=8, help="images to push through the VAE (default 8)")
    sizes = lambda s: [int(float(x)) for x in s.split(",")]  # noqa: E731
    g = sub.add_parser("generate", help="write the scaling data sets (64 px JPEG + caption; folder, tars, parquet)")
    g.add_argument("--root", required=True)
    g.add_argument("--sizes", type=sizes, default=[1000, 10000, 100000])
    s = sub.add_parser("scale", help="the whole trainer at growing N: first step, epoch-boundary gap, peak RSS")
    s.add_argument("--root", required=True, help="where `generate` wrote the data sets")
    s.add_argument("--sizes", type=sizes, default=[1000, 10000, 100000])
    s.add_argument("--formats", type=lambda v: v.split(","), default=list(FORMATS))
    s.add_argument("--procs", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    s.add_argument("--baseline", help="another checkout of the project to run side by side (e.g. main)")
    s.add_argument("--model", help="diffusers model folder (default: the tiny offline SD-1)")
    s.add_argument("--batch_size", type=int, default=4)
    s.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    s.add_argument("--boundary_max", type=int, default=100_000,
                   help="largest N whose epoch boundary is measured (a stream is re-read up to it on resume)")
    s.add_argument("--timeout", type=float, default=600, help="seconds before a run counts as 'timeout'")
    s.add_argument("--tmp", default=None, help="where runs write their outputs")
    s.add_argument("--baseline_only", action="store_true", help="run only the --baseline checkout")
    s.add_argument("--boundary_only", action="store_true", help="only the epoch-boundary runs")
    s.add_argument("--json", help="add every run's numbers to this file (kept across invocations)")
    tb = sub.add_parser("table", help="the side-by-side table from `scale --json` files")
    tb.add_argument("files", nargs="+")
    args = ap.parse_args()
    {"generate": generate, "scale": scale, "table": print_table}.get(args.mode, throughput)(args)


if __name__ == "__main__":
    main()
