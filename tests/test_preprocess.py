"""preprocess.py end to end on generated folders: names, sizes, counts, captions, bad input, resume, workers."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import preprocess
from utils.captioning import Captioner, CaptionerConfig, build_tiny_blip, caption_for_filename, caption_from_filename

NAME = re.compile(r"^(\d{5})-(\d+)-(.+)\.png$")


def noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def make_src(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h)) in enumerate(sizes.items()):
        noise(w, h, seed=i).save(folder / name)
    return folder


def run(src: Path, dst: Path, *extra: str) -> dict:
    return preprocess.main(["--src", str(src), "--dst", str(dst), "--width", "64", "--height", "64", *extra])


def outputs(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.glob("*.png"))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def trainer_caption(png: Path) -> str:
    """What A1111's dataset (and ours) reads as a picture's caption: the .txt beside it, else the cleaned stem."""
    txt = png.with_suffix(".txt")
    return txt.read_text(encoding="utf-8") if txt.is_file() else caption_from_filename(png.stem)


# ---------------------------------------------------------------------------------------------------- the basics


def test_default_crop_names_sizes_and_source_untouched(tmp_path):
    src = make_src(tmp_path / "src", {"cat.png": (120, 80), "dog.jpg": (50, 90), "tree.webp": (64, 64)})
    (src / "cat.txt").write_text("a cat on a mat", encoding="utf-8")
    before = tree_digest(src)
    summary = run(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert outputs(dst) == ["00000-0-cat.png", "00001-0-dog.png", "00002-0-tree.png"]
    assert all(Image.open(dst / n).size == (64, 64) for n in outputs(dst))
    assert not list(dst.glob("*.txt"))  # --existing_caption ignore, no caption model: nothing to write
    assert tree_digest(src) == before
    assert summary["sources"] == 3 and summary["processed"] == 3 and summary["written"] == 3
    assert summary["skipped"] == {}
    assert json.loads((dst / "preprocess_summary.json").read_text()) == summary
    # A trainer reading this folder gets the source stems back as captions.
    assert [trainer_caption(dst / n) for n in outputs(dst)] == ["cat", "dog", "tree"]
    # Only pictures, captions, the summary and the hidden resume folder: nothing else a trainer could trip on.
    assert {p.name for p in dst.iterdir() if p.suffix not in (".png", ".txt")} == {"preprocess_summary.json", ".preprocess"}


@pytest.mark.parametrize("action, expected", [
    ("ignore", None), ("copy", "a cat on a mat"), ("prepend", "a cat on a mat"), ("append", "a cat on a mat"),
])
def test_existing_caption_without_a_model(tmp_path, action, expected):
    src = make_src(tmp_path / "src", {"cat.png": (80, 80)})
    (src / "cat.txt").write_text("a cat on a mat\n", encoding="utf-8")
    run(src, tmp_path / "dst", "--existing_caption", action)
    txt = tmp_path / "dst" / "00000-0-cat.txt"
    assert (txt.read_text(encoding="utf-8") if txt.exists() else None) == expected


def test_split_flip_keep_original_counts_and_names(tmp_path):
    src = make_src(tmp_path / "src", {"tall.png": (200, 600), "wide.png": (300, 200)})
    summary = run(src, tmp_path / "dst", "--split_oversized", "--flip", "horizontal", "--keep_original_size")
    dst = tmp_path / "dst"
    # tall: ratio 1/3 -> 4 tiles (A1111 rule) + the original, each with its mirror = 10; wide: ratio 2/3 > 0.5 -> no
    # split, only the original and its mirror (keep_original replaces the default crop).
    names = outputs(dst)
    assert names == [f"00000-{i}-tall.png" for i in range(10)] + ["00001-0-wide.png", "00001-1-wide.png"]
    assert [Image.open(dst / f"00000-{i}-tall.png").size for i in range(10)] == [(64, 64)] * 8 + [(200, 600)] * 2
    tile = np.asarray(Image.open(dst / "00000-2-tall.png"))
    assert np.array_equal(np.asarray(Image.open(dst / "00000-3-tall.png")), tile[:, ::-1])
    scaled = Image.open(src / "tall.png").resize((64, 192), Image.Resampling.LANCZOS)
    assert np.array_equal(tile, np.asarray(scaled.crop((0, 42, 64, 106))))  # second tile at offset 42
    assert summary["written"] == 12


def test_vertical_and_both_flips(tmp_path):
    src = make_src(tmp_path / "src", {"a.png": (64, 64)})
    run(src, tmp_path / "dst", "--flip", "vertical", "both")
    dst = tmp_path / "dst"
    base = np.asarray(Image.open(dst / "00000-0-a.png"))
    assert np.array_equal(np.asarray(Image.open(dst / "00000-1-a.png")), base[::-1])
    assert np.array_equal(np.asarray(Image.open(dst / "00000-2-a.png")), base[::-1, ::-1])


def test_autosized_and_focal_debug(tmp_path):
    src = tmp_path / "src"
    make_src(src, {"a.png": (900, 600), "b.png": (1000, 100)})
    summary = run(src, tmp_path / "dst", "--autosized_crop", "--autosized_max_area", str(704 * 512),
                  "--autosized_objective", "min_error")
    assert Image.open(tmp_path / "dst" / "00000-0-a.png").size == (576, 384)
    assert summary["skipped"] == {"no auto-sized crop fits the size limits and error threshold": 1}
    assert outputs(tmp_path / "dst") == ["00000-0-a.png"]

    summary = run(src, tmp_path / "dst2", "--focal_crop", "--focal_debug", "--focal_face_weight", "0")
    dst2 = tmp_path / "dst2"
    assert outputs(dst2) == ["00000-0-a.png", "00001-0-b.png"]
    assert sorted(p.name for p in (dst2 / "focal_debug").iterdir()) == ["00000-0-a.png", "00001-0-b.png"]
    assert Image.open(dst2 / "focal_debug" / "00000-0-a.png").size == (96, 64)  # the scaled picture, annotated


# ---------------------------------------------------------------------------------------------------- bad input


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR claiming w x h pixels, with a tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_inputs_are_skipped_with_their_reason(tmp_path, capsys):
    src = make_src(tmp_path / "src", {"good.png": (80, 60)})
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_bytes(b"this is not a picture")
    (src / "README.md").write_text("# my pictures\n")
    buf = io.BytesIO()
    noise(64, 64).save(buf, format="PNG")
    (src / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    noise(64, 64).save(buf, format="JPEG")
    (src / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (src / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (src / ".hidden.png").write_bytes(b"")  # hidden files are not sources

    summary = run(src, tmp_path / "dst")
    assert outputs(tmp_path / "dst") == ["00003-0-good.png"]  # index = position among sorted sources
    assert summary["sources"] == 7 and summary["processed"] == 1
    assert summary["skipped"] == {"corrupt or truncated image": 2, "empty file": 1, "image too large": 1,
                                  "not an image": 2}
    reasons = {s["file"]: s["reason"] for s in summary["skipped_files"]}
    assert set(reasons) == {"empty.png", "notes.png", "README.md", "truncated.png", "truncated.jpg", "bomb.png"}
    assert reasons["bomb.png"].startswith("image too large") and "pixels" in reasons["bomb.png"]
    err = capsys.readouterr().err
    assert "skipped bomb.png: image too large" in err and "Traceback" not in err


def test_every_image_mode(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # left opaque red, right fully transparent
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    Image.fromarray(rgba[:, :, [0, 3]], "LA").save(src / "la.png")
    noise(32, 32).convert("P").save(src / "p.png")
    p_t = Image.new("P", (32, 32), 0)
    p_t.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    p_t.save(src / "p_transparent.png", transparency=0)
    noise(32, 32).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 65535 // 2, dtype=np.uint16)).save(src / "grey16.png")
    noise(32, 32).convert("1").save(src / "bits.png")
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 255, 0), (255, 0, 255))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display: stored 40x20, shown 20x40
    Image.new("RGB", (40, 20), (200, 200, 200)).save(src / "rotated.jpg", exif=exif)

    summary = preprocess.main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--keep_original_size"])
    dst = tmp_path / "dst"
    assert summary["processed"] == 9 and summary["skipped"] == {}

    def px(stem: str) -> np.ndarray:
        (name,) = [n for n in outputs(dst) if n.endswith(f"-{stem}.png")]
        im = Image.open(dst / name)
        assert im.mode == "RGB"
        return np.asarray(im)

    assert tuple(px("rgba")[0, 0]) == (255, 0, 0) and tuple(px("rgba")[0, 31]) == (255, 255, 255)
    assert tuple(px("p_transparent")[5, 5]) == (255, 255, 255)  # transparent index composited over white
    assert abs(int(px("grey16")[0, 0, 0]) - 128) <= 1  # 16-bit scaled to 8, not clipped
    assert tuple(px("anim")[0, 0]) == (0, 255, 0)  # first frame
    assert px("rotated").shape == (40, 20, 3)  # EXIF orientation applied
    assert set(np.unique(px("bits"))) <= {0, 255}


# ---------------------------------------------------------------------------------------------------- resume


def test_rerun_skips_complete_sources_and_redoes_incomplete_ones(tmp_path):
    src = make_src(tmp_path / "src", {"a.png": (80, 60), "b.png": (60, 80), "c.png": (70, 70)})
    dst = tmp_path / "dst"
    first = run(src, dst, "--flip", "horizontal")
    assert first["written"] == 6
    state = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dst.glob("*.png")}

    second = run(src, dst, "--flip", "horizontal")
    assert second["written"] == 0 and second["processed"] == 0
    assert second["skipped"] == {"already done": 3}
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dst.glob("*.png")} == state

    # An interrupted source (its marker never written, one output missing) is redone, and only it.
    (dst / ".preprocess" / "b.png.json").unlink()
    (dst / "00001-1-b.png").unlink()
    third = run(src, dst, "--flip", "horizontal")
    assert third["processed"] == 1 and third["written"] == 2 and third["skipped"] == {"already done": 2}
    assert outputs(dst) == sorted(state)
    # A deleted output makes its source incomplete even with the marker present.
    (dst / "00002-0-c.png").unlink()
    assert run(src, dst, "--flip", "horizontal")["processed"] == 1

    # Other settings: only with --overwrite (test_rerun_with_other_settings_never_deletes_silently); then everything
    # is redone and outputs the new settings no longer make are removed.
    fourth = run(src, dst, "--overwrite")
    assert fourth["processed"] == 3 and outputs(dst) == ["00000-0-a.png", "00001-0-b.png", "00002-0-c.png"]
    # A changed source is redone (replacing its outputs needs --overwrite too).
    noise(90, 60, seed=9).save(src / "a.png")
    assert run(src, dst, "--overwrite")["processed"] == 1


def test_rerun_with_other_settings_never_deletes_silently(tmp_path, capsys):
    """The reported case: a rerun into the same --dst with other settings deleted every earlier output, captions
    included. Now it stops before touching anything and says what would go; --overwrite allows it."""
    src = make_src(tmp_path / "src", {f"{c}.png": (80, 60) for c in "abcd"})
    for c in "ab":
        (src / f"{c}.txt").write_text(f"a photo of {c}", encoding="utf-8")
    dst = tmp_path / "dst"
    first = run(src, dst, "--flip", "horizontal", "--existing_caption", "copy")
    assert first["written"] == 8 and first["captions_written"] == 4
    (dst / "00000-0-a.txt").write_text("a photo of a, edited by hand", encoding="utf-8")
    (dst / "my-notes.txt").write_text("not ours", encoding="utf-8")
    before = tree_digest(dst)
    capsys.readouterr()

    with pytest.raises(SystemExit) as e:
        run(src, dst, "--existing_caption", "copy")  # no flips now: half the pictures would go
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert "12 file(s) (8 pictures, 4 captions: 00000-0-a.png, 00000-0-a.txt, 00000-1-a.png, ...)" in err
    assert tree_digest(dst) == before  # nothing touched, not even the summary

    # The same settings as before are no change at all: nothing is redone, nothing asked.
    assert run(src, dst, "--flip", "horizontal", "--existing_caption", "copy")["processed"] == 0
    assert tree_digest(dst) == {**before, "preprocess_summary.json": tree_digest(dst)["preprocess_summary.json"]}

    second = run(src, dst, "--existing_caption", "copy", "--overwrite")
    assert second["processed"] == 4
    assert "replacing or deleting 12 file(s)" in capsys.readouterr().err
    assert outputs(dst) == ["00000-0-a.png", "00001-0-b.png", "00002-0-c.png", "00003-0-d.png"]
    assert (dst / "my-notes.txt").read_text(encoding="utf-8") == "not ours"  # never a file we did not write


def test_two_workers_write_the_same_files(tmp_path):
    src = make_src(tmp_path / "src", {f"{i:02d}.png": (60 + 4 * i, 90 - 3 * i) for i in range(8)})
    run(src, tmp_path / "one", "--flip", "horizontal", "--split_oversized", "--split_threshold", "0.9")
    summary = run(src, tmp_path / "two", "--flip", "horizontal", "--split_oversized", "--split_threshold", "0.9",
                  "--workers", "2")
    assert summary["processed"] == 8
    one = {k: v for k, v in tree_digest(tmp_path / "one").items() if not k.startswith(("preprocess_summary",))}
    two = {k: v for k, v in tree_digest(tmp_path / "two").items() if not k.startswith(("preprocess_summary",))}
    assert one == two and len([k for k in one if k.endswith(".png")]) > 8


# ---------------------------------------------------------------------------------------------------- captions


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def blip_captioner(tiny_blip):
    return Captioner(CaptionerConfig(model=str(tiny_blip), max_new_tokens=6, device="cpu"))


def test_blip_captions_combined_with_existing(tmp_path, tiny_blip, blip_captioner):
    src = make_src(tmp_path / "src", {"cat.png": (80, 60), "dog.png": (64, 64)})
    (src / "cat.txt").write_text("my cat", encoding="utf-8")
    common = ["--caption_model", str(tiny_blip), "--caption_max_tokens", "6", "--caption_batch_size", "2",
              "--flip", "horizontal"]
    summary = run(src, tmp_path / "dst", *common, "--existing_caption", "prepend")
    dst = tmp_path / "dst"
    names = outputs(dst)
    assert names == ["00000-0-cat.png", "00000-1-cat.png", "00001-0-dog.png", "00001-1-dog.png"]
    generated = blip_captioner([Image.open(dst / n) for n in names])
    assert all(generated)
    expected = [f"my cat {generated[0]}", f"my cat {generated[1]}", generated[2], generated[3]]
    assert [trainer_caption(dst / n) for n in names] == expected
    assert summary["captions_written"] == 4

    run(src, tmp_path / "app", *common, "--existing_caption", "append")
    assert (tmp_path / "app" / "00000-0-cat.txt").read_text(encoding="utf-8") == f"{generated[0]} my cat"
    run(src, tmp_path / "copy", *common, "--existing_caption", "copy")
    assert (tmp_path / "copy" / "00000-0-cat.txt").read_text(encoding="utf-8") == "my cat"
    assert (tmp_path / "copy" / "00001-0-dog.txt").read_text(encoding="utf-8") == generated[2]


def test_caption_in_filename_old_layout(tmp_path, tiny_blip, blip_captioner):
    src = make_src(tmp_path / "src", {"cat.png": (80, 60), "dog.png": (64, 64)})
    run(src, tmp_path / "dst", "--caption_model", str(tiny_blip), "--caption_max_tokens", "6", "--caption_in_filename")
    dst = tmp_path / "dst"
    names = outputs(dst)
    assert not list(dst.glob("*.txt"))
    captions = blip_captioner([Image.open(dst / n) for n in names])
    assert names == sorted(f"{i:05}-0-{caption_for_filename(c)}.png" for i, c in enumerate(captions))
    # A1111's filename rule recovers the caption from the name.
    assert [trainer_caption(dst / n) for n in names] == [caption_for_filename(c) for c in captions]
    assert all(NAME.match(n) for n in names)


# ---------------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("extra, message", [
    (["--width", "100"], "--width must be a positive multiple of 8"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--face_model", "/nonexistent/yunet.onnx"], "is not a file"),
    (["--tagger", "/nonexistent/tagger"], "does not exist"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    src = make_src(tmp_path / "src", {"a.png": (64, 64)})
    with pytest.raises(SystemExit) as e:
        run(src, tmp_path / "dst", *extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_same_src_and_dst_refused(tmp_path, capsys):
    src = make_src(tmp_path / "src", {"a.png": (64, 64)})
    before = tree_digest(src)
    with pytest.raises(SystemExit):
        preprocess.main(["--src", str(src), "--dst", str(src / ".." / "src")])
    assert "must be different" in capsys.readouterr().err
    assert tree_digest(src) == before
    with pytest.raises(SystemExit):
        preprocess.main(["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "dst")])
    assert "is not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- a trainer reads it


def test_output_is_a_training_set_the_data_loader_reads(tmp_path, tiny_blip, blip_captioner):
    from utils.data import DataConfig, PromptConfig, TrainLoader, scan_dataset

    src = make_src(tmp_path / "src", {"cat.png": (80, 60), "dog.png": (200, 600)})
    (src / "cat.txt").write_text("my cat", encoding="utf-8")
    dst = tmp_path / "dst"
    run(src, dst, "--caption_model", str(tiny_blip), "--caption_max_tokens", "6", "--existing_caption", "prepend",
        "--split_oversized", "--flip", "horizontal")
    names = outputs(dst)
    assert len(names) == 2 + 8  # cat: crop + mirror; dog: 4 tiles + mirrors
    cfg = DataConfig(train_data_dir=str(dst), width=64, height=64, verify_images=True)
    summary = scan_dataset(cfg)
    assert summary.num_examples == len(names) and summary.skipped == [] and summary.has_captions
    by_name = {Path(e.path).name: e for e in summary.examples}
    assert sorted(by_name) == names
    assert all(e.size == (64, 64) and e.has_caption_file for e in by_name.values())
    assert all(by_name[n].caption == trainer_caption(dst / n) for n in names)
    assert by_name["00000-0-cat.png"].caption.startswith("my cat ")
    loader = TrainLoader(summary, cfg, PromptConfig(placeholder="<tok>", template_file="subject_filewords"),
                         batch_size=2)
    batch = next(iter(loader))
    assert tuple(batch["pixel_values"].shape) == (2, 3, 64, 64)
    assert all("<tok>" in p for p in batch["prompts"]) and set(batch["captions"]) <= {e.caption for e in summary.examples}

    # Old layout: no .txt files, the caption comes back from the file name.
    old = tmp_path / "old"
    run(src, old, "--caption_model", str(tiny_blip), "--caption_max_tokens", "6", "--caption_in_filename")
    summary = scan_dataset(DataConfig(train_data_dir=str(old), width=64, height=64))
    expected = {caption_for_filename(c) for c in blip_captioner([Image.open(p) for p in sorted(old.glob("*.png"))])}
    assert {e.caption for e in summary.examples} == expected and not any(e.has_caption_file for e in summary.examples)


def test_unloadable_caption_model_is_refused_before_writing(tmp_path, capsys):
    src = make_src(tmp_path / "src", {"a.png": (64, 64)})
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(SystemExit) as e:
        run(src, tmp_path / "dst", "--caption_model", str(tmp_path / "empty_model"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load caption model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "dst").exists()
