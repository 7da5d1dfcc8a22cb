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

    from utils.textual_inversion import TextualInversion
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
