"""train_textual_inversion.py end to end on the tiny models: outputs, compatibility, resume, DDP, trackers, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_textual_inversion as tti
from utils.embeddings import load_embedding
from two_processes import run_two_processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        arr = (torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(arr).save(d / f"{i:02d}.png")
        (d / f"{i:02d}.txt").write_text(f"a picture number {i}")
    return d


def _args(model, data, out, *extra, previews=False):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--placeholder_token", "my-emb", "--initializer_token", "object", "--num_vectors", "2",
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "0.01", "--max_train_steps", "6",
            "--save_every", "3", "--checkpointing_steps", "3", *([] if previews else ["--no_previews"]),
            *map(str, extra)]


def _run(*argv):
    assert tti.main(list(argv)) == 0


def test_outputs_and_formats(tiny_sd1, data_dir, tmp_path):
    out = tmp_path / "o"
    _run(*_args(tiny_sd1, data_dir, out, "--save_image_embeddings", "--preview_every", "3", "--preview_steps", "2",
                previews=True))
    final = load_embedding(out / "my-emb.pt")
    assert final.name == "my-emb" and final.step == 6 and final.num_vectors == 2 and final.width == 32
    assert final.sd_checkpoint and final.sd_checkpoint_name  # the model it was trained on
    copy3 = load_embedding(out / "embeddings" / "my-emb-3.pt")
    assert copy3.step == 3 and not torch.equal(copy3.vectors, final.vectors)
    card = load_embedding(out / "image_embeddings" / "my-emb-3.png")
    assert card.name == "my-emb-3" and torch.allclose(card.vectors, copy3.vectors)
    diffusers_file = load_embedding(out / "learned_embeds.safetensors")
    assert torch.equal(diffusers_file.vectors, final.vectors)
    assert not (out / "learned_embeds.bin").exists()  # the pickle-format copy only with --no_safe_serialization
    rows = (out / "textual_inversion_loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate" and [r.split(",")[0] for r in rows[1:]] == \
        [str(s) for s in range(1, 7)]
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["embedding_name"] == "my-emb" and settings["final_step"] == 6
    previews = sorted(p.name for p in (out / "images").iterdir())
    assert previews == ["my-emb-3-0.png", "my-emb-6-0.png"]
    from utils.infotext import read_infotext

    info = read_infotext(out / "images" / "my-emb-6-0.png")
    assert "a photo of my-emb" in info and "Steps: 2" in info


def test_diffusers_loads_the_result_and_it_changes_the_image(tiny_sd1, data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    _run(*_args(tiny_sd1, data_dir, tmp_path / "o", "--learning_rate", "0.5"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def render(prompt):
        return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = render("a photo of <my-emb>")
    pipe.load_textual_inversion(str(tmp_path / "o" / "learned_embeds.safetensors"))
    after = render("a photo of <my-emb>")
    assert len(pipe.tokenizer) == 49408 + 2  # "<my-emb>" and "<my-emb>_1", one per vector
    rows = pipe.text_encoder.get_input_embeddings().weight[49408:].detach()
    assert torch.equal(rows, load_embedding(tmp_path / "o" / "my-emb.pt").vectors)
    assert abs(after - before).max() > 1e-3


def test_resume_from_checkpoint_matches_uninterrupted(tiny_sd1, data_dir, tmp_path):
    _run(*_args(tiny_sd1, data_dir, tmp_path / "full"))
    # Interrupted after step 3 (max 3), then continued to 6 from the checkpoint.
    _run(*_args(tiny_sd1, data_dir, tmp_path / "cut", "--max_train_steps", "3"))
    _run(*_args(tiny_sd1, data_dir, tmp_path / "cut", "--resume_from_checkpoint", "latest"))
    a = load_embedding(tmp_path / "full" / "my-emb.pt")
    b = load_embedding(tmp_path / "cut" / "my-emb.pt")
    assert b.step == 6 and torch.equal(a.vectors, b.vectors)
    assert (tmp_path / "full" / "textual_inversion_loss.csv").read_text() == \
        (tmp_path / "cut" / "textual_inversion_loss.csv").read_text()


def test_resume_embedding_continues_its_step(tiny_sd1, data_dir, tmp_path):
    _run(*_args(tiny_sd1, data_dir, tmp_path / "a", "--max_train_steps", "3"))
    start = load_embedding(tmp_path / "a" / "my-emb.pt")
    _run(*_args(tiny_sd1, data_dir, tmp_path / "b", "--resume_embedding", tmp_path / "a" / "my-emb.pt",
                "--max_train_steps", "5"))
    cont = load_embedding(tmp_path / "b" / "my-emb.pt")
    assert cont.step == 5 and not torch.equal(cont.vectors, start.vectors)
    rows = (tmp_path / "b" / "textual_inversion_loss.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["4", "5"]


def test_config_file_and_flags(tiny_sd1, data_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"pretrained_model_name_or_path: {tiny_sd1}\ntrain_data_dir: {data_dir}\n"
                   f"placeholder_token: cfg-emb\nresolution: 64\nmax_train_steps: 2\nno_previews: true\n"
                   f"train_batch_size: 2\n")
    _run("--config", str(cfg), "--output_dir", str(tmp_path / "o"), "--max_train_steps", "3")
    emb = load_embedding(tmp_path / "o" / "cfg-emb.pt")
    assert emb.step == 3  # the command line wins over the file


def test_schedule_string_stops_early(tiny_sd1, data_dir, tmp_path):
    _run(*_args(tiny_sd1, data_dir, tmp_path / "o", "--learning_rate", "0.01:2, 0.005:4", "--max_train_steps", "100"))
    assert load_embedding(tmp_path / "o" / "my-emb.pt").step == 4


def test_bf16_keeps_vectors_float32(tiny_sd1, data_dir, tmp_path):
    _run(*_args(tiny_sd1, data_dir, tmp_path / "o", "--mixed_precision", "bf16", "--max_train_steps", "2",
                "--gradient_checkpointing"))
    emb = load_embedding(tmp_path / "o" / "my-emb.pt")
    assert emb.vectors.dtype == torch.float32 and torch.isfinite(emb.vectors).all() and emb.step == 2


def test_sd2_v_prediction(tiny_sd2, data_dir, tmp_path):
    _run(*_args(tiny_sd2, data_dir, tmp_path / "o", "--max_train_steps", "2"))
    emb = load_embedding(tmp_path / "o" / "my-emb.pt")
    assert emb.width == 1024 and emb.step == 2
    settings = json.loads((tmp_path / "o" / "training_settings.json").read_text())
    assert settings["model_name"]


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "0.01:1e3"], "Invalid learning rate schedule"),
    (["--train_data_dir", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--num_vectors", "0"], "1..75"),
    (["--pretrained_model_name_or_path", "/no/such/model"], "model not found"),
])
def test_bad_input_is_one_line(tiny_sd1, data_dir, tmp_path, argv, message):
    cmd = [sys.executable, str(ROOT / "train_textual_inversion.py"), *_args(tiny_sd1, data_dir, tmp_path / "o"),
           *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_sd1, data_dir, tmp_path):
    """2 processes x batch 1 train the same vectors as 1 process x batch 2; all ranks agree (checked by the loop)."""
    _run(*_args(tiny_sd1, data_dir, tmp_path / "one", "--train_batch_size", "2"))
    r = run_two_processes("train_textual_inversion.py", *_args(tiny_sd1, data_dir, tmp_path / "two"),
                          "--train_batch_size", "1")
    assert "all 2 processes hold identical trained weights" in r.stdout + r.stderr
    one = load_embedding(tmp_path / "one" / "my-emb.pt")
    two = load_embedding(tmp_path / "two" / "my-emb.pt")
    assert two.step == one.step == 6
    torch.testing.assert_close(two.vectors, one.vectors, rtol=1e-4, atol=1e-5)


def test_diffusers_example_command_line_runs_unchanged(tiny_sd1, data_dir, tmp_path):
    """A command line written for diffusers' examples/textual_inversion/textual_inversion.py."""
    _run("--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(data_dir),
         "--learnable_property", "object", "--placeholder_token", "<cat-toy>", "--initializer_token", "toy",
         "--num_vectors", "1", "--repeats", "2", "--resolution", "64", "--center_crop", "--train_batch_size", "2",
         "--gradient_accumulation_steps", "2", "--max_train_steps", "2", "--learning_rate", "5.0e-04", "--scale_lr",
         "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--output_dir", str(tmp_path / "o"),
         "--save_steps", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--seed", "1",
         "--mixed_precision", "no", "--report_to", "tensorboard", "--logging_dir", "tb",
         "--validation_prompt", "a <cat-toy> on a table", "--validation_steps", "1", "--num_validation_images", "1",
         "--gradient_checkpointing", "--no_safe_serialization")
    out = tmp_path / "o"
    emb = load_embedding(out / "cat-toy.pt")  # A1111's file name drops the characters it cannot hold
    assert emb.step == 2 and emb.num_vectors == 1
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # total limit 1
    assert (out / "learned_embeds.bin").is_file() and (out / "learned_embeds.safetensors").is_file()
    # a copy at every multiple of --save_steps, the last step included (A1111's rule, and diffusers' example's)
    assert sorted(p.name for p in (out / "embeddings").glob("*.pt")) == ["cat-toy-1.pt", "cat-toy-2.pt"]
    assert any((out / "tb").rglob("events.out.tfevents*"))  # TensorBoard logs under --logging_dir
    from utils.infotext import read_infotext

    assert "a <cat-toy> on a table" in read_infotext(out / "images" / "cat-toy-2-0.png")


def test_resume_refuses_a_checkpoint_of_another_embedding(tiny_sd1, data_dir, tmp_path):
    from utils.errors import UserError

    _run(*_args(tiny_sd1, data_dir, tmp_path / "o", "--max_train_steps", "3"))
    other = _args(tiny_sd1, data_dir, tmp_path / "o", "--resume_from_checkpoint", "latest")
    other[other.index("my-emb")] = "other-emb"
    with pytest.raises(UserError, match="belongs to another run"):
        tti.main(other)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [None, "deterministic", "random"])
def test_no_cache_latents_trains_what_the_cache_trains(tiny_sd1, data_dir, tmp_path, sampling):
    """--no_cache_latents with each --latent_sampling (None: the default, once) draws the samples a cached run draws,
    across an epoch boundary (the cached run reads its latents back in the second epoch)."""
    extra = ("--max_train_steps", "4", *(("--latent_sampling", sampling) if sampling else ()))
    _run(*_args(tiny_sd1, data_dir, tmp_path / "cached", *extra))
    _run(*_args(tiny_sd1, data_dir, tmp_path / "uncached", *extra, "--no_cache_latents"))
    cached = load_embedding(tmp_path / "cached" / "my-emb.pt")
    uncached = load_embedding(tmp_path / "uncached" / "my-emb.pt")
    assert cached.step == uncached.step == 4
    torch.testing.assert_close(uncached.vectors, cached.vectors, rtol=1e-4, atol=1e-5)
