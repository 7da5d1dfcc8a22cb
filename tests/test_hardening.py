"""Hostile files, bad input and full disks, each as a user meets them: nothing runs code from a file, every refusal is
one line naming the file, and a failed write keeps every earlier file. The hostile files are made here by the tests."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.embeddings import Embedding
from utils.errors import UserError, exit_on_user_error

ROOT = Path(__file__).resolve().parent.parent


class RunsCode:
    """Pickles as a call of os.system: loading it with a code-running unpickler creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text.strip(), repr(text)
    return text


# ---------------------------------------------------------------------------------------------------------------
# 1. Checkpoints: no pickle that runs code, a manifest that catches missing or altered files


class SynthSource:
    """A few random latents, the same every run (positions are global sample indices)."""

    def __init__(self, n=4, batch=2):
        self.latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        self.n, self.b = n, batch
        self.micro_batches_per_epoch = n // batch

    def iter_epoch(self, epoch, skip):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch)).tolist()
        for j in range(skip, self.micro_batches_per_epoch):
            positions = list(range(j * self.b, (j + 1) * self.b))
            yield {"latents": self.latents[[perm[p] for p in positions]].clone(),
                   "prompts": ["a photo of myemb"] * self.b, "positions": positions}


def _train(model_dir, out: Path, steps: int, resume=None, ckpt=2):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from utils.trainers.textual_inversion import TextualInversion
    from utils.training import LoopConfig, OptimConfig, Outputs, make_accelerator, train

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    init = pipe.text_encoder.get_input_embeddings().weight[[320, 1125]].detach().clone()
    ti = TextualInversion.build(pipe, Embedding("myemb", init))
    acc = make_accelerator(out, "no", 1, "none", 0)
    cfg = LoopConfig(output_dir=out, max_train_steps=steps, train_batch_size=2, checkpointing_steps=ckpt,
                     save_every=0, preview_every=0, resume_from_checkpoint=resume,
                     optim=OptimConfig(learning_rate="0.01"))
    train(acc, ti, SynthSource(), DDPMScheduler.from_config(pipe.scheduler.config), cfg,
          Outputs(save=lambda s: [], final=lambda s, o: []))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return ti.state_dict()["vectors.0"]


@pytest.fixture(scope="module")
def trained(tiny_sd1, tmp_path_factory):
    """A run of 4 steps (the reference) and a run stopped at step 2 with its checkpoint, to copy and tamper with."""
    base = tmp_path_factory.mktemp("ckpt")
    full = _train(tiny_sd1, base / "full", 4)
    _train(tiny_sd1, base / "cut", 2)
    return base / "cut", full


def _copy(trained_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(trained_dir, out)
    return out, out / "checkpoint-2"


def _to_old_format(ckpt: Path) -> None:
    """What main wrote before manifests: the loop state as accelerate's custom_checkpoint_0.pkl (a torch.save)."""
    if (ckpt / "trainer_state.json").exists():
        state = json.loads((ckpt / "trainer_state.json").read_text())
        torch.save(state, ckpt / "custom_checkpoint_0.pkl")
        (ckpt / "trainer_state.json").unlink()
        (ckpt / "manifest.json").unlink()


def _rewrite_manifest(ckpt: Path) -> None:
    """An attacker who edits a file can edit the manifest too: safety must not rest on it."""
    if (ckpt / "manifest.json").exists():
        from utils.checkpoints import write_manifest

        write_manifest(ckpt)


def _resume_error(model_dir, out: Path) -> str:
    with pytest.raises(UserError) as e:
        _train(model_dir, out, 4, resume="latest")
    return one_line(e.value)


def test_checkpoint_has_manifest_and_json_state_and_resumes_bit_identically(tiny_sd1, trained, tmp_path):
    out, ckpt = _copy(trained[0], tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"trainable.pt", "optimizer.bin", "random_states_0.pkl", "trainer_state.json", "progress.json"} <= set(
        manifest["files"])
    assert not list(ckpt.glob("custom_checkpoint_*"))
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert torch.equal(_train(tiny_sd1, out, 4, resume="latest"), trained[1])


def test_old_format_checkpoint_still_resumes_exactly(tiny_sd1, trained, tmp_path):
    out, ckpt = _copy(trained[0], tmp_path)
    _to_old_format(ckpt)
    assert torch.equal(_train(tiny_sd1, out, 4, resume="latest"), trained[1])


def test_code_in_an_old_format_state_pickle_is_refused_not_run(tiny_sd1, trained, tmp_path):
    out, ckpt = _copy(trained[0], tmp_path)
    _to_old_format(ckpt)
    marker = tmp_path / "PWNED"
    torch.save({"step": RunsCode(marker)}, ckpt / "custom_checkpoint_0.pkl")
    message = _resume_error(tiny_sd1, out)
    assert not marker.exists()
    assert "custom_checkpoint_0.pkl" in message and "refused" in message and "system" in message


def test_a_planted_state_pickle_is_never_read(tiny_sd1, trained, tmp_path):
    out, ckpt = _copy(trained[0], tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"step": RunsCode(marker)}, ckpt / "custom_checkpoint_0.pkl")
    assert torch.equal(_train(tiny_sd1, out, 4, resume="latest"), trained[1])
    assert not marker.exists()


@pytest.mark.parametrize("name", ["trainable.pt", "optimizer.bin", "random_states_0.pkl"])
def test_code_in_any_checkpoint_pickle_is_refused_even_with_a_matching_manifest(tiny_sd1, trained, tmp_path, name):
    out, ckpt = _copy(trained[0], tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"state": RunsCode(marker)}, ckpt / name)
    _rewrite_manifest(ckpt)
    message = _resume_error(tiny_sd1, out)
    assert not marker.exists()
    assert str(ckpt / name) in message and "refused" in message


def test_an_altered_random_state_file_is_an_error_not_a_silent_change(tiny_sd1, trained, tmp_path):
    out, ckpt = _copy(trained[0], tmp_path)
    states = torch.load(ckpt / "random_states_0.pkl", weights_only=False)
    states["torch_manual_seed"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(states, ckpt / "random_states_0.pkl")
    message = _resume_error(tiny_sd1, out)
    assert str(ckpt / "random_states_0.pkl") in message and "altered" in message


def test_an_unreadable_random_state_file_in_an_old_checkpoint_is_an_error(tiny_sd1, trained, tmp_path):
    out, ckpt = _copy(trained[0], tmp_path)
    _to_old_format(ckpt)
    (ckpt / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    message = _resume_error(tiny_sd1, out)
    assert str(ckpt / "random_states_0.pkl") in message


@pytest.mark.parametrize("name", ["optimizer.bin", "trainable.pt", "trainer_state.json"])
def test_a_missing_file_is_one_line_naming_it(tiny_sd1, trained, tmp_path, name):
    out, ckpt = _copy(trained[0], tmp_path)
    (ckpt / name).unlink()
    message = _resume_error(tiny_sd1, out)
    assert str(ckpt / name) in message and "missing" in message


def test_a_truncated_file_is_one_line_naming_it(tiny_sd1, trained, tmp_path):
    out, ckpt = _copy(trained[0], tmp_path)
    data = (ckpt / "optimizer.bin").read_bytes()
    (ckpt / "optimizer.bin").write_bytes(data[: len(data) // 2])
    message = _resume_error(tiny_sd1, out)
    assert str(ckpt / "optimizer.bin") in message and "altered" in message


# ---------------------------------------------------------------------------------------------------------------
# Helpers: crafted images, tmpfs mounts, scripts run as the user runs them


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but which holds almost no pixel data (a header bomb)."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(path, options) -> path: a tmpfs there for the test (skipped where mounting is not permitted)."""
    mounted = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                               text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot run mount here ({e})")
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip() or r.returncode}); needs root")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill_disk(folder: Path, leave: int = 0) -> None:
    """Write a filler file until the file system is full, then free ``leave`` bytes again."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def run_main(main, argv: list[str], prog: str, capsys, only_errors: bool = False) -> tuple[int, list[str]]:
    """main(argv) exactly as the script's ``__main__`` block runs it: (exit status, the lines on stderr; with
    ``only_errors`` the error lines, leaving out the progress bars of a run that got going)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, exit_on_user_error(prog):
        main(argv)
        raise SystemExit(0)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return e.value.code, [line for line in lines if "error" in line.lower()] if only_errors else lines


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
        (d / f"{i:02d}.txt").write_text(f"a picture number {i}")
    return d


# ---------------------------------------------------------------------------------------------------------------
# 2. PNG cards: a decode budget, no full-size copies, unchanged folders not read again


@pytest.mark.parametrize("side", [5000, 16384])  # over our budget but under Pillow's limits; the red team's size
def test_a_huge_picture_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch, side):
    from PIL import ImageFile

    from utils.embeddings import EmbeddingError, load_embedding

    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(side, side))  # 16384: 268M pixels, 800 MB decoded, more with copies

    def no_decode(self, *a, **k):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(EmbeddingError) as e:
        load_embedding(path)
    assert str(path) in one_line(e.value) and "too large" in str(e.value)


def test_a_card_text_chunk_is_read_from_the_header_whatever_the_picture_size(tmp_path, monkeypatch):
    from PIL import ImageFile
    from PIL.PngImagePlugin import PngInfo

    from utils.embeddings import load_embedding
    from utils.png_embedding import encode_text_payload

    info = PngInfo()
    info.add_text("sd-ti-embedding", encode_text_payload({"string_to_param": {"*": torch.ones(2, 8)}, "name": "big"}))
    Image.new("RGB", (4100, 4100), (9, 9, 9)).save(tmp_path / "card.png", pnginfo=info)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: (_ for _ in ()).throw(AssertionError))
    emb = load_embedding(tmp_path / "card.png")
    assert emb.name == "big" and torch.equal(emb.vectors, torch.ones(2, 8))


def test_reading_a_pixel_card_makes_no_full_size_copy(tmp_path):
    import tracemalloc

    from utils.embeddings import save_png_card
    from utils.png_embedding import read_image_payload

    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    picture = Image.fromarray(np.random.default_rng(1).integers(1, 255, (2048, 2048, 3), dtype=np.uint8))
    path = save_png_card(Embedding("card", vectors), tmp_path / "card.png", picture)
    with Image.open(path) as im:  # keep only the pixel copy of the payload
        im.load()
        im.convert("RGB").save(tmp_path / "pixels.png")
        full_size = im.width * im.height * 3
    tracemalloc.start()
    try:
        data, source = read_image_payload(tmp_path / "pixels.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert source == "pixels"
    assert torch.equal(next(iter(data["string_to_param"].values())).float(), vectors)
    # The decoded picture itself lives in Pillow's memory; what we allocate on top (bands of rows, the two small data
    # blocks, the payload) stays far below one RGB copy of the picture.
    assert peak < full_size / 4, (peak, full_size)


def test_unchanged_folders_are_not_read_again_and_failures_are_remembered(tmp_path, monkeypatch):
    import utils.embeddings as embeddings
    from utils.prompts import EmbeddingDatabase

    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "huge.png").write_bytes(png_header_only(16384, 16384))
    (folder / "evil.pt").write_bytes(b"garbage")
    torch.save({"string_to_param": {"*": torch.ones(1, 32)}, "name": "good"}, folder / "good.pt")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "photo.png")
    opened = []
    real = embeddings.load_embedding
    monkeypatch.setattr(embeddings, "load_embedding", lambda p: opened.append(Path(p).name) or real(p))
    db = EmbeddingDatabase([folder])
    for _ in range(3):  # a prompt file of three prompts
        db.refresh(32)
    assert sorted(opened) == ["evil.pt", "good.pt", "huge.png", "photo.png"]
    assert set(db.loaded) == {"good"} and len(db.errors) == 2
    torch.save({"string_to_param": {"*": torch.ones(2, 32)}, "name": "good"}, folder / "good.pt")
    db.refresh(32)
    assert sorted(opened) == ["evil.pt", "good.pt", "good.pt", "huge.png", "photo.png"]


# ---------------------------------------------------------------------------------------------------------------
# 3. Non-finite vectors and weights are refused by every reader


def _nan_vectors(n=2, width=32, where=(0, 3)):
    v = torch.randn(n, width)
    v[where] = float("nan")
    return v


def _write_nan_files(folder: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    from utils.png_embedding import encode_text_payload, insert_pixel_payload

    folder.mkdir(exist_ok=True)
    files = {}
    files["a1111"] = folder / "a1111.pt"
    torch.save({"string_to_param": {"*": _nan_vectors()}, "name": "a1111", "step": 3}, files["a1111"])
    files["diffusers"] = folder / "diffusers.safetensors"
    save_file({"<diffusers>": _nan_vectors()}, files["diffusers"])
    files["diffusers-bin"] = folder / "diffusers.bin"
    torch.save({"<bin>": torch.full((1, 32), float("inf"))}, files["diffusers-bin"])
    files["kohya-sdxl"] = folder / "kohya.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": _nan_vectors(width=1280)}, files["kohya-sdxl"])
    payload = {"string_to_param": {"*": _nan_vectors()}, "name": "card"}
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sd-ti-embedding", encode_text_payload(payload))
    files["png-text"] = folder / "text.png"
    Image.new("RGB", (64, 64), (50, 60, 70)).save(files["png-text"], pnginfo=info)
    files["png-pixels"] = folder / "pixels.png"
    insert_pixel_payload(Image.new("RGB", (64, 64), (50, 60, 70)), payload).save(files["png-pixels"])
    return files


def test_every_embedding_format_refuses_nan_or_inf_vectors(tmp_path):
    from utils.embeddings import EmbeddingError, load_embedding

    for kind, path in _write_nan_files(tmp_path / "emb").items():
        with pytest.raises(EmbeddingError) as e:
            load_embedding(path)
        message = one_line(e.value)
        assert str(path) in message and "NaN or infinite" in message, (kind, message)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_hypernetworks_with_nan_weights_are_refused(tmp_path, suffix):
    from utils.hypernetwork import Hypernetwork, load_hypernetwork, save_hypernetwork, save_hypernetwork_safetensors

    hn = Hypernetwork.create("broken", [32])
    with torch.no_grad():
        hn.layers[32][1].linear[0].weight[0, 0] = float("nan")
    path = tmp_path / f"broken{suffix}"
    (save_hypernetwork if suffix == ".pt" else save_hypernetwork_safetensors)(hn, path)
    with pytest.raises(UserError) as e:
        load_hypernetwork(path)
    assert str(path) in one_line(e.value) and "NaN or infinite" in str(e.value)


def test_resume_embedding_with_nan_is_one_line_before_the_model_loads(data_dir, tmp_path, capsys, monkeypatch):
    import train_textual_inversion as tti
    import utils.training_setup

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", _no_model)
    path = tmp_path / "broken.pt"
    torch.save({"string_to_param": {"*": _nan_vectors()}, "name": "broken", "step": 5}, path)
    code, err = run_main(tti.main, [*_ti_args(data_dir, tmp_path), "--resume_embedding", str(path)], tti.PROG, capsys)
    assert code == 2 and len(err) == 1 and str(path) in err[0] and "NaN" in err[0], err


def test_resume_hypernetwork_with_nan_is_one_line_before_the_model_loads(data_dir, tmp_path, capsys, monkeypatch):
    import train_hypernetwork as thn
    import utils.training_setup
    from utils.hypernetwork import Hypernetwork, save_hypernetwork

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", _no_model)
    hn = Hypernetwork.create("broken", [32])
    with torch.no_grad():
        hn.layers[32][0].linear[1].bias[0] = float("inf")
    path = save_hypernetwork(hn, tmp_path / "broken.pt")
    code, err = run_main(thn.main, [*_hn_args(data_dir, tmp_path), "--resume_hypernetwork", str(path)], thn.PROG,
                         capsys)
    assert code == 2 and len(err) == 1 and str(path) in err[0] and "NaN" in err[0], err


# ---------------------------------------------------------------------------------------------------------------
# 4. A training picture whose header declares 100000 x 100000


def test_a_header_bomb_in_the_training_data_is_skipped_with_one_report_line(tmp_path):
    from utils.data import DataConfig, scan_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(png_header_only(100000, 100000))
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "ok.png")
    report = tmp_path / "skipped_images.txt"
    summary = scan_dataset(DataConfig(train_data_dir=str(folder), width=64, height=64), report_file=report)
    assert summary.num_examples == 1
    lines = report.read_text().splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith(str(folder / "bomb.png")) and "too large" in lines[0], lines


def test_a_header_bomb_does_not_stop_the_trainer(data_dir, tmp_path, capsys, monkeypatch):
    import train_textual_inversion as tti
    import utils.training_setup

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", _no_model)
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "bomb.png").write_bytes(png_header_only(100000, 100000))
    code, err = run_main(tti.main, _ti_args(data, tmp_path), tti.PROG, capsys)
    assert code == 2 and len(err) == 1 and "the model was loaded" in err[0], err  # got as far as the model
    report = (tmp_path / "o" / "skipped_images.txt").read_text().splitlines()[1:]
    assert len(report) == 1 and "bomb.png" in report[0] and "too large" in report[0]


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad flags: one line, status 2, before the model loads


def _no_model(*args, **kwargs):
    raise UserError("the model was loaded")


def _ti_args(data: Path, tmp_path: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", "/nonexistent/model", "--train_data_dir", str(data), "--output_dir",
            str(tmp_path / "o"), "--placeholder_token", "my-emb", "--resolution", "64", "--train_batch_size", "1",
            "--max_train_steps", "4", "--no_previews", *map(str, extra)]


def _hn_args(data: Path, tmp_path: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", "/nonexistent/model", "--train_data_dir", str(data), "--output_dir",
            str(tmp_path / "o"), "--hypernetwork_name", "my-hn", "--resolution", "64", "--train_batch_size", "1",
            "--max_train_steps", "4", "--no_previews", *map(str, extra)]


TRAINER_FLAGS = [
    (["--learning_rate", "nan"], "--learning_rate 'nan'"),
    (["--learning_rate", "0.01:2, inf"], "inf is not a usable rate"),
    (["--ddp_timeout", "-5"], "--ddp_timeout must be a finite number > 0"),
    (["--lr_scheduler", "bogus"], "--lr_scheduler 'bogus'"),
    (["--resume_from_checkpoint", "/nonexistent"], "--resume_from_checkpoint /nonexistent: no such folder"),
    (["--gradient_accumulation_steps", "100"], "fewer than --gradient_accumulation_steps 100"),
    (["--preview_cfg_scale", "nan"], "--preview_cfg_scale must be a finite number"),
    (["--adam_beta1", "1.5"], "--adam_beta1 must be a finite number in [0, 1)"),
]


@pytest.mark.parametrize("flags, message", TRAINER_FLAGS + [
    (["--num_vectors", "0"], "--num_vectors must be 1..75"),
    (["--num_vectors", "1000"], "--num_vectors must be 1..75"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_textual_inversion_flags_fail_before_the_model(data_dir, tmp_path, capsys, monkeypatch, flags, message):
    import train_textual_inversion as tti
    import utils.training_setup

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", _no_model)
    code, err = run_main(tti.main, _ti_args(data_dir, tmp_path, *flags), tti.PROG, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("flags, message", TRAINER_FLAGS + [
    (["--sizes", "abc"], "--sizes 'abc'"),
    (["--activation_func", "bogus"], "unsupported hypernetwork activation function 'bogus'"),
    (["--layer_structure", "1, nan, 1"], "must contain only positive numbers"),
    (["--dropout_structure", "0, 1.5, 0"], "dropout probability 1.5"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_hypernetwork_flags_fail_before_the_model(data_dir, tmp_path, capsys, monkeypatch, flags, message):
    import train_hypernetwork as thn
    import utils.training_setup

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", _no_model)
    code, err = run_main(thn.main, _hn_args(data_dir, tmp_path, *flags), thn.PROG, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_output_dir_that_is_a_file_fails_before_the_model(data_dir, tmp_path, capsys, monkeypatch):
    import train_textual_inversion as tti
    import utils.training_setup

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", _no_model)
    (tmp_path / "o").write_text("a file where the output folder should be")
    code, err = run_main(tti.main, _ti_args(data_dir, tmp_path), tti.PROG, capsys)
    assert code == 2 and len(err) == 1 and "is an existing file" in err[0], err


def test_output_dir_on_a_read_only_disk_fails_before_the_model(data_dir, tmp_path, capsys, monkeypatch, tmpfs):
    import train_hypernetwork as thn
    import utils.training_setup

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", _no_model)
    tmpfs(tmp_path / "o", "ro,size=1m")
    code, err = run_main(thn.main, _hn_args(data_dir, tmp_path), thn.PROG, capsys)
    assert code == 2 and len(err) == 1 and "read-only file system" in err[0] and "--output_dir" in err[0], err


def test_the_script_itself_exits_2_with_one_line(data_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train_hypernetwork.py"), *_hn_args(data_dir, tmp_path),
                        "--sizes", "abc"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--sizes 'abc'" in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--cfg_scale", "nan"], "cfg scale must be a finite number"),
    (["--width", "100"], "width must be a positive multiple of 8"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--sampler", "bogus"], "bogus"),
    (["--embeddings_dir", "/nonexistent/folder"], "--embeddings_dir /nonexistent/folder"),
    (["--hypernetwork", "x:abc"], "multiplier must be a number"),
    (["--device", "nonsense"], "--device nonsense"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_inference_flags_fail_before_the_model(tmp_path, capsys, monkeypatch, flags, message):
    import inference

    monkeypatch.setattr(inference, "load_pipeline", _no_model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        inference.main(["--pretrained_model_name_or_path", "/nonexistent/model", "--prompt", "a cat", "--outdir",
                        str(tmp_path / "out"), *flags])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and message in err[0] and "model" not in err[0], err


# ---------------------------------------------------------------------------------------------------------------
# 6. A full disk or a folder we may not write: one line naming the file and what to do, earlier files intact


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device; free some space"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied; make the folder writable"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system; choose a folder on a writable disk"),
    (type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: No space left on device (os "
                                               "error 28)"), "no space left on the device"),
    (RuntimeError("basic_ios::clear: iostream error"), "cannot write"),
])
def test_a_refused_write_is_one_line_and_keeps_the_old_file(tmp_path, error, words):
    from utils.fileio import WriteError, atomic_path

    target = tmp_path / "file.pt"
    target.write_bytes(b"old")
    with pytest.raises(WriteError) as e:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise error
    assert str(target) in one_line(e.value) and words in str(e.value)
    assert isinstance(e.value, OSError)  # code that tolerates unwritable caches still catches it
    assert target.read_bytes() == b"old" and temp_files(tmp_path) == []


def test_other_errors_inside_a_write_pass_through(tmp_path):
    from utils.fileio import atomic_path

    with pytest.raises(ValueError, match="a bug"):
        with atomic_path(tmp_path / "x.pt"):
            raise ValueError("a bug")
    with pytest.raises(RuntimeError, match="size mismatch"):
        with atomic_path(tmp_path / "x.pt"):
            raise RuntimeError("size mismatch")
    assert temp_files(tmp_path) == []


def _writers(tmp: Path):
    """(file, write(version)) for every kind of file the trainers and inference write."""
    from utils.embeddings import save_embedding
    from utils.hypernetwork import Hypernetwork, save_hypernetwork, save_hypernetwork_safetensors
    from utils.infotext import save_png
    from utils.training import LossLog
    from utils.outputs import write_settings

    def emb(v):
        return Embedding("e", torch.full((2, 32), float(v)), step=v)

    hn = Hypernetwork.create("h", [32])
    log = LossLog(tmp / "loss.csv", None)

    def csv_rows(v):  # more than the slack in the file's last page of the disk
        for step in range(v * 1000, v * 1000 + 500):
            log.add(step, 0, step, 0.5, 0.01)
        log.flush()

    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    return [
        (tmp / "e.pt", lambda v: save_embedding(emb(v), tmp / "e.pt")),
        (tmp / "e.safetensors", lambda v: save_embedding(emb(v), tmp / "e.safetensors")),
        (tmp / "card.png", lambda v: save_embedding(emb(v), tmp / "card.png", image=Image.fromarray(noise))),
        (tmp / "h.pt", lambda v: save_hypernetwork(hn, tmp / "h.pt")),
        (tmp / "h.safetensors", lambda v: save_hypernetwork_safetensors(hn, tmp / "h.safetensors")),
        (tmp / "training_settings.json", lambda v: write_settings(tmp, {"x": "y" * 50_000}, v)),
        (tmp / "preview.png", lambda v: save_png(Image.fromarray(noise), tmp / "preview.png", f"step {v}")),
        (tmp / "loss.csv", csv_rows),
    ]


def test_every_writer_on_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, tmpfs):
    from utils.fileio import WriteError

    disk = tmpfs(tmp_path / "disk", "size=3m")
    writers = _writers(disk)
    for _, write in writers:
        write(1)
    before = {path: path.read_bytes() for path, _ in writers}
    fill_disk(disk)
    for path, write in writers:
        with pytest.raises(WriteError) as e:
            write(2)
        message = one_line(e.value)
        assert str(path) in message and "no space left on the device; free some space" in message, message
        assert path.read_bytes() == before[path], path
    assert temp_files(disk) == []


def _ti_run_args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--placeholder_token", "my-emb", "--initializer_token", "object", "--resolution", "64",
            "--train_batch_size", "2", "--learning_rate", "0.01", "--max_train_steps", "8", "--save_every", "2",
            "--checkpointing_steps", "2", "--no_previews", *map(str, extra)]


def test_a_checkpoint_the_disk_refuses_ends_the_run_with_one_line(tiny_sd1, data_dir, tmp_path, capsys, monkeypatch):
    import train_textual_inversion as tti

    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, f, *a, **k):  # the disk fills up while checkpoint-4 is written
        if ".checkpoint-4.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, err = run_main(tti.main, _ti_run_args(tiny_sd1, data_dir, out), tti.PROG, capsys, only_errors=True)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{tti.PROG}: error: "), err
    assert str(out / "checkpoint-4") in err[0] and "no space left" in err[0] and "checkpoint-2 is intact" in err[0]
    from utils.checkpoints import verify

    assert [p.name for p in out.glob("*checkpoint*")] == ["checkpoint-2"] and verify(out / "checkpoint-2")
    assert temp_files(out) == []


def test_training_onto_a_disk_that_fills_up(tiny_sd1, data_dir, tmp_path, capsys, tmpfs):
    """The whole trainer with its output folder on a 3 MB disk that fills up part way through."""
    import train_textual_inversion as tti
    from utils.checkpoints import verify
    from utils.embeddings import load_embedding

    out = tmpfs(tmp_path / "out", "size=3m")
    fill_disk(out, leave=120_000)
    code, err = run_main(tti.main, _ti_run_args(tiny_sd1, data_dir, out, "--save_image_embeddings",
                                                "--checkpointing_steps", "1", "--save_every", "1"), tti.PROG, capsys,
                         only_errors=True)
    assert code == 2 and len(err) == 1 and "no space left on the device; free some space" in err[0], err
    assert str(out) in err[0] and err[0].startswith(f"{tti.PROG}: error: ")  # not glued to a progress bar
    assert temp_files(out) == []
    for ckpt in out.glob("checkpoint-*"):
        assert verify(ckpt)
    for path in [*out.glob("embeddings/*"), *out.glob("image_embeddings/*"), *out.glob("*.pt")]:
        assert load_embedding(path) is not None, path


# ---------------------------------------------------------------------------------------------------------------
# 7. Refused embeddings are named when generating; inspect gives each file's reason; a frozen rank is one line


def test_generating_with_a_refused_embedding_says_so_once_per_file(tiny_sd1, tmp_path, capsys):
    import inference

    folder = tmp_path / "emb"
    folder.mkdir()
    torch.save({"string_to_param": {"*": _nan_vectors()}, "name": "broken"}, folder / "broken.pt")
    torch.save({"x": RunsCode(tmp_path / "PWNED")}, folder / "evil.pt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of broken\na painting of evil\n")
    capsys.readouterr()
    assert inference.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--embeddings_dir", str(folder),
                           "--prompt_file", str(prompts), "--seed", "1", "--steps", "1", "--width", "64",
                           "--height", "64", "--outdir", str(tmp_path / "out")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 2, warnings
    assert any(str(folder / "broken.pt") in w and "NaN" in w for w in warnings)
    assert any(str(folder / "evil.pt") in w and "refused" in w for w in warnings)
    assert not (tmp_path / "PWNED").exists()


def test_training_a_hypernetwork_with_a_refused_embedding_says_so_once_per_file(tiny_sd1, data_dir, tmp_path, capsys):
    import train_hypernetwork as thn

    folder = tmp_path / "emb"
    folder.mkdir()
    torch.save({"string_to_param": {"*": _nan_vectors()}, "name": "broken"}, folder / "broken.pt")
    torch.save({"x": RunsCode(tmp_path / "PWNED")}, folder / "evil.pt")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    (folder / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    args = _hn_args(data_dir, tmp_path, "--max_train_steps", "1", "--embeddings_dir", folder)
    args[1] = str(tiny_sd1)
    code, err = run_main(thn.main, args, thn.PROG, capsys)
    warnings = [line for line in err if "warning:" in line]
    assert code == 0 and (tmp_path / "o" / "my-hn.pt").exists(), err
    assert len(warnings) == 3 and all(w.startswith(f"{thn.PROG}: warning: ") for w in warnings), warnings
    for name, reason in (("broken.pt", "NaN"), ("evil.pt", "refused"), ("cut.png", "not a readable image")):
        assert any(str(folder / name) in w and reason in w for w in warnings), (name, warnings)
    assert not (tmp_path / "PWNED").exists()


def test_inspect_gives_the_reason_for_each_hostile_file(tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    files = {
        "evil.pt": None, "nan.pt": "NaN", "bomb.png": "too large", "huge.png": "too large",
        "cut.png": "not a readable image", "junk.safetensors": "not a readable safetensors file",
    }
    torch.save({"string_to_param": {"*": RunsCode(tmp_path / "PWNED")}}, folder / "evil.pt")
    torch.save({"string_to_param": {"*": _nan_vectors()}, "name": "nan"}, folder / "nan.pt")
    (folder / "bomb.png").write_bytes(png_header_only(100000, 100000))
    (folder / "huge.png").write_bytes(png_header_only(16384, 16384))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "whole.png")
    (folder / "cut.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    (folder / "junk.safetensors").write_bytes(b"\xff" * 64)
    r = subprocess.run([sys.executable, "-m", "tools.embeddings", "inspect", *(str(folder / n) for n in files)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "PWNED").exists(), r.stderr
    assert len(lines) == len(files) + 1 and "6 of 6 files" in lines[-1], lines
    for line, (name, reason) in zip(lines, files.items()):
        assert str(folder / name) in line and (reason or "refused") in line, (name, line)


FROZEN_RANK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torch
from utils.errors import exit_on_user_error
from utils.training import make_accelerator

with exit_on_user_error("worker"):
    acc = make_accelerator(Path(sys.argv[2]), "no", 1, "none", 0, ddp_timeout=3.0)
    for i in range(100000):
        if i == 3 and acc.process_index == 1:
            print("rank 1 frozen", flush=True)
            time.sleep(600)
        acc.reduce(torch.ones(1), "sum")
"""


@pytest.mark.slow
def test_a_frozen_rank_ends_the_others_with_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(FROZEN_RANK)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                        str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port),
                        str(script), str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=150, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "rank 1 frozen" in out, out[-3000:]
    ours = [line for line in out.splitlines() if line.startswith("worker: error:")]
    assert len(ours) == 1 and "process 0 waited longer than --ddp_timeout" in ours[0], out[-3000:]
    assert "[rank0]: Traceback" not in out  # the launcher's own report of the failed child may follow; ours is one line
