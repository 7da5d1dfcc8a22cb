#!/usr/bin/env python
"""Turn a folder of raw pictures into a training set, as A1111's "Preprocess images" tab did.

Each source picture becomes one or more `width x height` PNGs named `00000-0-<source stem>.png` (source index, output
index) with the caption in a `.txt` beside it: split into tiles, focal-point crop, auto-sized crop, original size, or
(default) scale-to-cover and centre crop; optional mirrored copies; captions from an image-to-text model and/or a tagger,
combined with existing `<stem>.txt` files. The source folder is only read.

Safe to interrupt: every file is written atomically and a source counts as done only once a marker listing all its
outputs is written (in `<dst>/.preprocess/`), so a rerun with the same settings skips it. A rerun with other settings
(or after sources changed) stops before touching anything and lists the earlier outputs it would replace or delete,
unless --overwrite is given. Files it did not write are never touched.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from utils.captioning import (
    EXISTING_CAPTION_ACTIONS,
    CaptionerConfig,
    caption_for_filename,
    combine_caption,
)
from utils.crops import AUTOSIZE_OBJECTIVES, FLIP_MODES, AutosizeConfig, CropConfig, FocalConfig, SplitConfig
from utils.errors import UserError, exit_on_user_error
from utils.fileio import write_bytes_atomic, write_text_atomic

PROG = "preprocess.py"
MARKER_DIR = ".preprocess"
SUMMARY_FILE = "preprocess_summary.json"
FOCAL_DEBUG_DIR = "focal_debug"
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
MARKER_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="folder of source pictures (not recursive; never modified)")
    p.add_argument("--dst", required=True, help="output folder (must differ from --src); created if missing")
    p.add_argument("--width", type=int, default=512, help="output width in pixels, a multiple of 8 (default 512)")
    p.add_argument("--height", type=int, default=512, help="output height in pixels, a multiple of 8 (default 512)")
    p.add_argument("--existing_caption", choices=EXISTING_CAPTION_ACTIONS, default="ignore",
                   help="what to do with a <source stem>.txt beside a picture: ignore it, copy it as the caption, "
                        "prepend it to or append it after the generated caption (default ignore)")
    p.add_argument("--keep_original_size", action="store_true",
                   help="also save the picture at its own size, uncropped")
    p.add_argument("--flip", nargs="+", choices=FLIP_MODES, default=[],
                   help="extra mirrored copy of every output per mode given: horizontal, vertical, both "
                        "(both = mirrored on both axes, i.e. turned 180 degrees)")
    g = p.add_argument_group("split oversized pictures into overlapping tiles")
    g.add_argument("--split_oversized", action="store_true",
                   help="cut pictures much longer than the target aspect into overlapping tiles")
    g.add_argument("--split_threshold", type=float, default=0.5,
                   help="split when (short/long aspect relative to the target) is at most this, 0..1 (default 0.5)")
    g.add_argument("--overlap_ratio", type=float, default=0.2,
                   help="fraction of a tile that overlaps the next one, 0..0.9 (default 0.2)")
    g = p.add_argument_group("focal-point crop (faces, detail, edges)")
    g.add_argument("--focal_crop", action="store_true", help="crop non-square pictures around their focal point")
    g.add_argument("--focal_face_weight", type=float, default=0.9, help="weight of detected faces (default 0.9)")
    g.add_argument("--focal_entropy_weight", type=float, default=0.15,
                   help="weight of the most detailed (highest-entropy) window (default 0.15)")
    g.add_argument("--focal_edges_weight", type=float, default=0.5, help="weight of corner points (default 0.5)")
    g.add_argument("--focal_debug", action="store_true",
                   help=f"also write a picture with the points and crop drawn, into <dst>/{FOCAL_DEBUG_DIR}/")
    g.add_argument("--face_model", default=None,
                   help="YuNet face detector .onnx (e.g. face_detection_yunet_2023mar.onnx); default: the Haar "
                        "cascades bundled with OpenCV 4.x")
    g = p.add_argument_group("auto-sized crop (pick the best size on a 64-px grid)")
    g.add_argument("--autosized_crop", action="store_true", help="crop each picture to its best-fitting size")
    g.add_argument("--autosized_min_dim", type=int, default=384, help="smallest width/height (default 384)")
    g.add_argument("--autosized_max_dim", type=int, default=768, help="largest width/height (default 768)")
    g.add_argument("--autosized_min_area", type=int, default=64 * 64, help="smallest w*h (default 4096)")
    g.add_argument("--autosized_max_area", type=int, default=640 * 640, help="largest w*h (default 409600)")
    g.add_argument("--autosized_objective", choices=AUTOSIZE_OBJECTIVES, default="max_area",
                   help="max_area: largest size within the error threshold; min_error: closest aspect (default max_area)")
    g.add_argument("--autosized_threshold", type=float, default=0.1,
                   help="largest accepted aspect error 1-min(r,1/r) (default 0.1)")
    g = p.add_argument_group("captions")
    g.add_argument("--caption", choices=["blip"], default=None,
                   help=f"caption every output with BLIP ({DEFAULT_BLIP} unless --caption_model is given)")
    g.add_argument("--caption_model", default=None,
                   help="hub id or folder of any image-to-text model transformers can load (implies captioning)")
    g.add_argument("--caption_prompt", default=None, help="text prompt for caption models that take one")
    g.add_argument("--caption_batch_size", type=int, default=8, help="pictures per captioning batch (default 8)")
    g.add_argument("--caption_max_tokens", type=int, default=40, help="longest generated caption in tokens (default 40)")
    g.add_argument("--caption_beams", type=int, default=1, help="beam-search width for captions (default 1)")
    g.add_argument("--tagger", default=None,
                   help="booru-style tagger: a transformers image-classification folder, or an ONNX tagger "
                        "(model.onnx + selected_tags.csv; needs onnxruntime); tags follow the caption after ', '")
    g.add_argument("--tagger_threshold", type=float, default=0.35, help="keep tags at least this likely (default 0.35)")
    g.add_argument("--caption_in_filename", action="store_true",
                   help="old A1111 layout: put the caption in the file name (00000-0-<caption>.png), no .txt files")
    g.add_argument("--device", default=None, help="device for caption models (default: cuda when present, else cpu)")
    p.add_argument("--workers", type=int, default=1, help="processes cropping pictures in parallel (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow this run to replace or delete files an earlier run wrote into --dst with other settings "
                        "(or for sources changed since); without it such a run stops first and lists what would go")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@dataclass
class Job:
    """Everything a worker needs to turn one source picture into output PNGs."""

    crop: CropConfig
    read_existing_caption: bool


@dataclass
class SourceResult:
    index: int
    name: str  # source file name
    pngs: list[bytes] = field(default_factory=list)
    debug_pngs: list[bytes] = field(default_factory=list)
    existing_caption: str | None = None
    skip_reason: str | None = None


# ---------------------------------------------------------------------------------------------------- checking input


def crop_config(args: argparse.Namespace) -> CropConfig:
    for flag in ("width", "height"):
        v = getattr(args, flag)
        if v < 8 or v % 8:
            raise UserError(f"--{flag} must be a positive multiple of 8 (got {v})")
    if args.autosized_crop and not (64 <= args.autosized_min_dim <= args.autosized_max_dim):
        raise UserError("--autosized_min_dim must be at least 64 and at most --autosized_max_dim")
    if args.face_model and not os.path.isfile(args.face_model):
        raise UserError(f"--face_model {args.face_model!r} is not a file")
    return CropConfig(
        width=args.width,
        height=args.height,
        split=SplitConfig(args.split_threshold, args.overlap_ratio) if args.split_oversized else None,
        focal=FocalConfig(args.focal_face_weight, args.focal_entropy_weight, args.focal_edges_weight,
                          args.face_model, args.focal_debug) if args.focal_crop else None,
        autosize=AutosizeConfig(args.autosized_min_dim, args.autosized_max_dim, args.autosized_min_area,
                                args.autosized_max_area, args.autosized_objective,
                                args.autosized_threshold) if args.autosized_crop else None,
        keep_original_size=args.keep_original_size,
        flips=tuple(args.flip),
    )


def captioner_config(args: argparse.Namespace) -> CaptionerConfig | None:
    model = args.caption_model or (DEFAULT_BLIP if args.caption == "blip" else None)
    if not model and not args.tagger:
        return None
    if args.caption_batch_size < 1:
        raise UserError("--caption_batch_size must be at least 1")
    if args.tagger and not os.path.exists(args.tagger):
        raise UserError(f"--tagger {args.tagger!r} does not exist")
    return CaptionerConfig(model=model, tagger=args.tagger, batch_size=args.caption_batch_size,
                           max_new_tokens=args.caption_max_tokens, num_beams=args.caption_beams,
                           prompt=args.caption_prompt, tagger_threshold=args.tagger_threshold, device=args.device)


def check_folders(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise UserError(f"--src {str(src)!r} is not a folder")
    if src.resolve() == dst.resolve():
        raise UserError("--src and --dst must be different folders (the source is never modified)")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {str(dst)!r} exists and is not a folder")


def list_sources(src: Path) -> list[Path]:
    """Every non-hidden file except caption .txt files, sorted so the indices in output names are stable."""
    return sorted(
        (p for p in src.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".txt"),
        key=lambda p: p.name,
    )


def reason_kind(reason: str) -> str:
    """The reason without its details ("corrupt or truncated image (...)" -> "corrupt or truncated image")."""
    return re.split(r"[(:]", reason, maxsplit=1)[0].strip() or reason


# ---------------------------------------------------------------------------------------------------- resume markers


def fingerprint(settings: dict, index: int, source: Path) -> str:
    """Changes when anything that decides this source's outputs changes: settings, index, the file, its caption."""
    st = source.stat()
    caption = source.with_suffix(".txt")
    cap_stat = caption.stat() if caption.is_file() else None
    key = {
        "v": MARKER_VERSION, "settings": settings, "index": index, "size": st.st_size, "mtime": st.st_mtime_ns,
        "caption": (cap_stat.st_size, cap_stat.st_mtime_ns) if cap_stat else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def marker_path(dst: Path, source_name: str) -> Path:
    return dst / MARKER_DIR / f"{source_name}.json"


def read_marker(dst: Path, source_name: str) -> dict | None:
    try:
        return json.loads(marker_path(dst, source_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(dst: Path, source_name: str, fp: str) -> bool:
    marker = read_marker(dst, source_name)
    return bool(marker) and marker.get("fingerprint") == fp and all((dst / f).is_file() for f in marker.get("files", []))


def outputs_at_stake(dst: Path, fingerprints: dict[str, str]) -> list[str]:
    """Files a finished earlier run wrote for sources whose settings, content or index changed since: redoing those
    sources replaces or deletes them (a caption the user edited among them). Sources without a marker never
    finished, so nothing of theirs is at stake; sources with the same fingerprint come out identical."""
    at_stake = []
    for source_name, fp in fingerprints.items():
        marker = read_marker(dst, source_name)
        if marker and marker.get("fingerprint") != fp:
            at_stake += [f for f in marker.get("files", []) if (dst / f).is_file()]
    return at_stake


def describe_files(names: list[str], examples: int = 3) -> str:
    """"46 files (38 pictures, 8 captions: 00000-0-a.png, 00000-0-a.txt, 00001-0-b.png, ...)"."""
    kinds = Counter("pictures" if n.endswith(".png") else "captions" if n.endswith(".txt") else "other files"
                    for n in names)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    shown = ", ".join(sorted(names)[:examples]) + (", ..." if len(names) > examples else "")
    return f"{len(names)} file(s) ({counts}: {shown})"


def check_nothing_lost(dst: Path, fingerprints: dict[str, str], overwrite: bool) -> None:
    """Never replace or delete what an earlier run made with other settings without being told to."""
    at_stake = outputs_at_stake(dst, fingerprints)
    if not at_stake:
        return
    what = describe_files(at_stake)
    if not overwrite:
        raise UserError(f"--dst {dst} holds {what} that an earlier run made with other settings or from sources "
                        "changed since; this run would replace or delete them. Give --overwrite to allow that, "
                        "or choose another --dst")
    print(f"{PROG}: replacing or deleting {what} from an earlier run (--overwrite)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- worker side

_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job
    try:  # one OpenCV thread per worker process; the processes are the parallelism
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # ~25% faster than the default 6 for ~8% more bytes
    return buf.getvalue()


def process_source(task: tuple[int, str]) -> SourceResult:
    """Open one source picture and make its output PNGs (runs in a worker process)."""
    from utils.crops import make_outputs
    from utils.images import ImageLoadError, open_image

    index, path = task
    source = Path(path)
    result = SourceResult(index, source.name)
    try:
        loaded = open_image(source)
    except ImageLoadError as e:
        result.skip_reason = str(e)
        return result
    except MemoryError:
        result.skip_reason = "image too large (out of memory while decoding)"
        return result
    if _JOB.read_existing_caption:
        caption = source.with_suffix(".txt")
        if caption.is_file():
            result.existing_caption = caption.read_text(encoding="utf-8", errors="replace")
    try:
        out = make_outputs(loaded.rgb, _JOB.crop)
    except Exception as e:  # one odd picture must not end a run over thousands; it is reported with the reason
        result.skip_reason = f"processing failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        return result
    result.pngs = [_png(im) for im in out.images]
    result.debug_pngs = [_png(im) for im in out.debug_images]
    if not result.pngs:
        result.skip_reason = "; ".join(out.notes) or "no output"
    return result


# ---------------------------------------------------------------------------------------------------- main side


@dataclass
class Writer:
    """Names, captions and writes the outputs of finished sources; counts what happened."""

    dst: Path
    existing_action: str
    caption_in_filename: bool
    fingerprints: dict[str, str]
    stems: dict[str, str]
    written: int = 0
    captions_written: int = 0
    processed: int = 0

    def write(self, r: SourceResult, captions: list[str]) -> None:
        stem = self.stems[r.name]
        files: list[str] = []
        for sub, (png, generated) in enumerate(zip(r.pngs, captions)):
            text = combine_caption(r.existing_caption, generated, self.existing_action)
            label = (caption_for_filename(text) or stem) if self.caption_in_filename else stem
            base = f"{r.index:05}-{sub}-{label}"
            write_bytes_atomic(self.dst / f"{base}.png", png)
            files.append(f"{base}.png")
            self.written += 1
            if text and not self.caption_in_filename:
                write_text_atomic(self.dst / f"{base}.txt", text)
                files.append(f"{base}.txt")
                self.captions_written += 1
        for k, png in enumerate(r.debug_pngs):
            name = f"{FOCAL_DEBUG_DIR}/{r.index:05}-{k}-{stem}.png"
            write_bytes_atomic(self.dst / name, png)
            files.append(name)
        self._forget_stale(r.name, files)
        marker = {"source": r.name, "fingerprint": self.fingerprints[r.name], "files": files}
        write_text_atomic(marker_path(self.dst, r.name), json.dumps(marker, indent=1))
        self.processed += 1

    def _forget_stale(self, source_name: str, files: list[str]) -> None:
        # A rerun with other settings replaces this source's outputs; drop old ones it no longer makes.
        old = read_marker(self.dst, source_name)
        for name in set(old.get("files", [])) - set(files) if old else ():
            (self.dst / name).unlink(missing_ok=True)


def make_captioner(cfg: CaptionerConfig | None):
    if cfg is None:
        return None
    from utils.captioning import Captioner

    return Captioner(cfg)


def caption_and_write(pending: list[SourceResult], captioner, writer: Writer) -> None:
    if captioner is None:
        for r in pending:
            writer.write(r, [""] * len(r.pngs))
        return
    from PIL import Image

    images = [Image.open(io.BytesIO(png)) for r in pending for png in r.pngs]
    captions = iter(captioner(images))
    for r in pending:
        writer.write(r, [next(captions) for _ in r.pngs])


def results(tasks: list[tuple[int, str]], job: Job, workers: int):
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(job)
        yield from map(process_source, tasks)
        return
    # spawn, not fork: the parent may already hold torch threads (captioning) that a fork would copy half-alive.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        yield from pool.imap(process_source, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8))))


def settings_for_fingerprint(crop: CropConfig, cap: CaptionerConfig | None, args: argparse.Namespace) -> dict:
    cap_settings = None
    if cap is not None:
        cap_settings = {k: v for k, v in asdict(cap).items() if k not in ("batch_size", "device")}
    return {"crop": asdict(crop), "caption": cap_settings, "existing_caption": args.existing_caption,
            "caption_in_filename": args.caption_in_filename}


def summarize(sources: int, writer: Writer, skipped: list[dict], done: int, elapsed: float) -> dict:
    by_reason = Counter(s["kind"] for s in skipped)
    if done:
        by_reason["already done"] = done
    return {
        "sources": sources, "processed": writer.processed, "written": writer.written,
        "captions_written": writer.captions_written, "skipped": dict(sorted(by_reason.items())),
        "skipped_files": [{"file": s["file"], "reason": s["reason"]} for s in skipped],
        "elapsed_s": round(elapsed, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error(PROG):
        # 1. Check the request before touching anything.
        src, dst = Path(args.src), Path(args.dst)
        check_folders(src, dst)
        crop = crop_config(args)
        cap = captioner_config(args)
        if args.workers < 1:
            raise UserError("--workers must be at least 1")
        if crop.focal is not None and crop.focal.face_weight > 0 and not crop.focal.face_model:
            from utils.crops import haar_cascades_available

            if not haar_cascades_available():
                print(f"{PROG}: warning: this OpenCV has no Haar face cascades; faces are not detected "
                      "(give --face_model yunet.onnx or install opencv-python-headless<5)", file=sys.stderr)
        settings = settings_for_fingerprint(crop, cap, args)
        started = time.perf_counter()

        # 2. Find the sources and which of them a previous run already finished.
        sources = list_sources(src)
        fingerprints = {p.name: fingerprint(settings, i, p) for i, p in enumerate(sources)}
        tasks = [(i, str(p)) for i, p in enumerate(sources) if not is_done(dst, p.name, fingerprints[p.name])]
        done = len(sources) - len(tasks)
        check_nothing_lost(dst, fingerprints, args.overwrite)
        captioner = make_captioner(cap) if tasks else None
        dst.mkdir(parents=True, exist_ok=True)

        # 3. Crop in worker processes; caption in batches here; write each source's files, then its done-marker.
        writer = Writer(dst, args.existing_caption, args.caption_in_filename, fingerprints,
                        {p.name: p.stem for p in sources})
        skipped: list[dict] = []
        pending: list[SourceResult] = []
        batch = cap.batch_size if cap else 1
        for r in tqdm(results(tasks, Job(crop, args.existing_caption != "ignore"), args.workers),
                      total=len(tasks), unit="img", desc="preprocess", dynamic_ncols=True):
            if r.skip_reason:
                tqdm.write(f"skipped {r.name}: {r.skip_reason}", file=sys.stderr)
                skipped.append({"file": r.name, "reason": r.skip_reason, "kind": reason_kind(r.skip_reason)})
                continue
            pending.append(r)
            if sum(len(p.pngs) for p in pending) >= batch:
                caption_and_write(pending, captioner, writer)
                pending = []
        caption_and_write(pending, captioner, writer)

        # 4. Report.
        summary = summarize(len(sources), writer, skipped, done, time.perf_counter() - started)
        write_text_atomic(dst / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
    print(f"{summary['sources']} sources: {summary['processed']} processed, {summary['written']} pictures and "
          f"{summary['captions_written']} captions written; skipped {reasons}. Summary: {dst / SUMMARY_FILE}")
    return summary


if __name__ == "__main__":
    main()
