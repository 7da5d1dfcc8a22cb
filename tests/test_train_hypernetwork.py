"""train_hypernetwork.py end to end on the tiny SD-1 model: A1111 files, resume, frozen UNet, DDP, inference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_hypernetwork as thn
from utils.hypernetwork import load_hypernetwork, load_optimizer_sidecar
from two_processes import run_two_processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hndata")
    rng = torch.Generator().manual_seed(3)
    for i in range(4):
        Image.fromarray((torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy()).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"a square thing {i}")
    return d


def _args(model, data, out, *extra, previews=False):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--hypernetwork_name", "hn", "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "0.001",
            "--max_train_steps", "6", "--save_every", "3", "--checkpointing_steps", "3",
            *([] if previews else ["--no_previews"]),
            "--layer_structure", "1, 2, 1", "--activation_func", "relu", "--layer_norm", *map(str, extra)]


def _weights(path):
    hn = load_hypernetwork(path)
    return {f"{d}.{i}.{k}": v for d, pair in hn.layers.items() for i, m in enumerate(pair)
            for k, v in m.state_dict().items()}


def test_files_and_frozen_unet(tiny_sd1, data_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "o"
    assert thn.main(_args(tiny_sd1, data_dir, out, "--save_optimizer_state", "--offload_text_encoder",
                          "--preview_every", "3", "--preview_steps", "2", previews=True)) == 0
    hn = load_hypernetwork(out / "hn.pt")
    assert hn.name == "hn" and hn.step == 6 and sorted(hn.layers) == [32, 64]  # text width + attention width
    assert hn.options.activation_func == "relu" and hn.options.is_layer_norm
    assert hn.sd_checkpoint and hn.sd_checkpoint_name
    copy3 = load_hypernetwork(out / "hypernetworks" / "hn-3.pt")
    assert copy3.name == "hn" and copy3.step == 3  # A1111 keeps the base name in periodic copies
    assert _weights(out / "hn.pt").keys() == _weights(out / "hn.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(_weights(out / "hn.pt").values(),
                                                 _weights(out / "hn.safetensors").values()))
    assert load_optimizer_sidecar(out / "hn.pt") is not None
    from utils.infotext import read_infotext

    assert sorted(p.name for p in (out / "images").iterdir()) == ["hn-3-0.png", "hn-6-0.png"]
    assert "Hypernet: hn, Hypernet step: 6" in read_infotext(out / "images" / "hn-6-0.png")
    rows = (out / "hypernetwork_loss.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("step,epoch")
    # the UNet file on disk is untouched, and training changed the hypernetwork away from its init
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(_weights(out / "hn.pt").values(), _weights(copy3.filename).values()))


def test_exact_resume_and_continue_file(tiny_sd1, data_dir, tmp_path):
    assert thn.main(_args(tiny_sd1, data_dir, tmp_path / "full")) == 0
    assert thn.main(_args(tiny_sd1, data_dir, tmp_path / "cut", "--max_train_steps", "3")) == 0
    assert thn.main(_args(tiny_sd1, data_dir, tmp_path / "cut", "--resume_from_checkpoint", "latest")) == 0
    a, b = _weights(tmp_path / "full" / "hn.pt"), _weights(tmp_path / "cut" / "hn.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # continuing a file keeps its architecture and step counter
    assert thn.main(_args(tiny_sd1, data_dir, tmp_path / "more", "--resume_hypernetwork",
                          tmp_path / "full" / "hn.pt", "--max_train_steps", "8", "--activation_func", "linear")) == 0
    more = load_hypernetwork(tmp_path / "more" / "hn.pt")
    assert more.step == 8 and more.options.activation_func == "relu"


def test_trained_file_changes_the_image(tiny_sd1, data_dir, tmp_path):
    import inference

    assert thn.main(_args(tiny_sd1, data_dir, tmp_path / "o", "--learning_rate", "0.05")) == 0
    hn_dir = tmp_path / "hns"
    hn_dir.mkdir()
    (hn_dir / "hn.pt").write_bytes((tmp_path / "o" / "hn.pt").read_bytes())
    common = ["--pretrained_model_name_or_path", str(tiny_sd1), "--steps", "2", "--width", "64", "--height", "64",
              "--seed", "1", "--hypernetwork_dir", str(hn_dir), "--embeddings_dir", str(hn_dir)]
    inference.main([*common, "--prompt", "a square thing", "--outdir", str(tmp_path / "plain")])
    inference.main([*common, "--prompt", "a square thing <hypernet:hn:1>", "--outdir", str(tmp_path / "with")])
    inference.main([*common, "--prompt", "a square thing <hypernet:hn:0>", "--outdir", str(tmp_path / "zero")])

    def pixels(folder):
        files = sorted(p for p in Path(folder).glob("*.png") if not p.name.startswith("grid"))
        return torch.tensor(list(Image.open(files[0]).getdata()), dtype=torch.float32)

    assert (pixels(tmp_path / "with") - pixels(tmp_path / "plain")).abs().max() > 0
    assert torch.equal(pixels(tmp_path / "zero"), pixels(tmp_path / "plain"))  # multiplier 0 = stock model


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_sd1, data_dir, tmp_path):
    # A larger Adam epsilon keeps the update proportional to the gradient. With the default 1e-8, Adam's sign-like
    # first steps turn float summation-order noise in near-zero gradients into lr-sized differences (measured:
    # 1.3e-4 at lr 1e-3), which says nothing about whether the gradients were synchronised.
    # Linear, no LayerNorm: A1111 initialises LayerNorm weights near 0, which starves the layers before it of
    # gradient, the same amplification again.
    extra = ["--adam_epsilon", "1e-4", "--activation_func", "linear"]
    assert thn.main(_args(tiny_sd1, data_dir, tmp_path / "one")[:-3] + extra) == 0
    r = run_two_processes("train_hypernetwork.py", *_args(tiny_sd1, data_dir, tmp_path / "two")[:-3], *extra,
                          "--train_batch_size", "1")
    assert "all 2 processes hold identical trained weights" in r.stdout + r.stderr
    a, b = _weights(tmp_path / "one" / "hn.pt"), _weights(tmp_path / "two" / "hn.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bad_layer_structure_is_one_line(tiny_sd1, data_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train_hypernetwork.py"),
                        *_args(tiny_sd1, data_dir, tmp_path / "o", "--layer_structure", "2, 1")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error:" in ln]) == 1
