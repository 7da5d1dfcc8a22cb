"""inference.py --embeddings_dir pointed at a training run's output folder: which files count as embeddings, which
file is used when several give one name (and that the PNG's TI hash is that file's), and the model's own image size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import inference
import train_textual_inversion as tti
from utils.embeddings import duplicate_note, list_embedding_files, load_embedding
from utils.hashes import sha256_file
from utils.infotext import parse_infotext, read_infotext
from utils.prompts import EmbeddingDatabase

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "examples" / "sample_images"


@pytest.fixture(scope="module")
def run_dir(tiny_sd1, tmp_path_factory) -> Path:
    """A finished run's output folder with everything a run can leave: periodic copies, PNG cards, previews,
    checkpoints, diffusers copies, and a full pipeline (--save_as_full_pipeline)."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert tti.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(SAMPLES),
                     "--output_dir", str(out), "--placeholder_token", "red-ball", "--initializer_token", "ball",
                     "--num_vectors", "2", "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "4",
                     "--save_every", "2", "--checkpointing_steps", "2", "--preview_every", "2", "--preview_steps", "1",
                     "--save_image_embeddings", "--save_as_full_pipeline", "--no_safe_serialization"]) == 0
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


def test_only_embedding_files_of_a_run_count(run_dir):
    assert (run_dir / "checkpoint-2" / "trainable.pt").is_file() and (run_dir / "text_encoder").is_dir()
    found = sorted(p.relative_to(run_dir).as_posix() for p in list_embedding_files(run_dir))
    # Periodic copies at every multiple of --save_every, the last step included (as A1111).
    assert found == ["embeddings/red-ball-2.pt", "embeddings/red-ball-2.safetensors", "embeddings/red-ball-4.pt",
                     "embeddings/red-ball-4.safetensors", "image_embeddings/red-ball-2.png",
                     "image_embeddings/red-ball-4.png", "images/red-ball-2-0.png", "images/red-ball-4-0.png",
                     "red-ball.pt", "red-ball.safetensors"]
    db = EmbeddingDatabase([run_dir])
    db.refresh(32)
    assert list(db.loaded) == ["red-ball", "red-ball-2", "red-ball-4"] and not db.skipped and not db.errors
    assert db.duplicates == {
        "red-ball": [str(run_dir / "red-ball.pt"), str(run_dir / "red-ball.safetensors")],
        "red-ball-2": [str(run_dir / "embeddings" / "red-ball-2.pt"), str(run_dir / "embeddings" /
                                                                       "red-ball-2.safetensors"),
                       str(run_dir / "image_embeddings" / "red-ball-2.png")],
        "red-ball-4": [str(run_dir / "embeddings" / "red-ball-4.pt"), str(run_dir / "embeddings" /
                                                                       "red-ball-4.safetensors"),
                       str(run_dir / "image_embeddings" / "red-ball-4.png")]}
    assert db.loaded["red-ball"].filename == str(run_dir / "red-ball.pt")


def test_listing_rules(tmp_path):
    # A diffusers concept downloaded on its own still loads, named as A1111 names it.
    (tmp_path / "concept").mkdir()
    (tmp_path / "concept" / "learned_embeds.bin").write_bytes(b"")
    # Training state and model folders do not, wherever they are.
    for rel in ("run/checkpoint-10/trainable.pt", "run/.checkpoint-20.tmp/trainable.pt", "run/learned_embeds.bin",
                "run/learned_embeds_2.safetensors", "run/x.pt", "run/training_settings.json",
                "model/text_encoder/model.safetensors", "model/unet/diffusion_pytorch_model.safetensors",
                "model/extra/y.pt", "checkpoint-notanumber/z.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "X", "unet": ["diffusers", "U"], '
                                                         '"text_encoder": ["transformers", "T"]}')
    found = sorted(p.relative_to(tmp_path).as_posix() for p in list_embedding_files(tmp_path))
    assert found == ["checkpoint-notanumber/z.pt", "concept/learned_embeds.bin", "model/extra/y.pt", "run/x.pt"]


def test_collision_note_says_which_and_why():
    assert duplicate_note("a", ["d/a.pt", "d/a.safetensors", "e/a.png"]) == (
        "3 files give the embedding name 'a': using d/a.pt (A1111 .pt before .safetensors before .bin before "
        "embedding images), not d/a.safetensors, e/a.png")
    assert "(the later one in folder order)" in duplicate_note("a", ["e/a.pt", "d/a.pt"])


def test_collision_rule_is_deterministic_and_the_png_carries_the_used_files_hash(run_dir, tiny_sd1, tmp_path,
                                                                                  capsys):
    # Two files of one name with different vectors: the .pt is used whatever the folder order.
    emb_dir = tmp_path / "emb"
    (emb_dir / "a").mkdir(parents=True)
    (emb_dir / "z").mkdir()
    shutil.copy(run_dir / "embeddings" / "red-ball-2.safetensors", emb_dir / "a" / "red-ball.safetensors")
    shutil.copy(run_dir / "red-ball.pt", emb_dir / "z" / "red-ball.pt")
    shutil.copy(run_dir / "embeddings" / "red-ball-2.safetensors", emb_dir / "z" / "red-ball.safetensors")
    out = tmp_path / "images"
    assert inference.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--embeddings_dir", str(emb_dir),
                           "--prompt", "a photo of red-ball", "--steps", "1", "--seed", "1",
                           "--outdir", str(out)]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: 3 files give the embedding name 'red-ball': using {emb_dir / 'z' / 'red-ball.pt'} "
                     f"(A1111 .pt before .safetensors before .bin before embedding images), not "
                     f"{emb_dir / 'z' / 'red-ball.safetensors'}, {emb_dir / 'a' / 'red-ball.safetensors'}"]
    (png,) = out.glob("*.png")
    _, _, params = parse_infotext(read_infotext(png))
    assert params["TI hashes"] == f"red-ball: {sha256_file(emb_dir / 'z' / 'red-ball.pt')[:12]}"
    assert not torch.equal(load_embedding(emb_dir / "z" / "red-ball.pt").vectors,
                           load_embedding(emb_dir / "a" / "red-ball.safetensors").vectors)


def test_a_training_output_dir_works_as_embeddings_dir_at_the_models_own_size(run_dir, tiny_sd1, tmp_path, capsys):
    out = tmp_path / "images"
    assert inference.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--embeddings_dir", str(run_dir),
                           "--prompt", "a photo of red-ball-2", "--steps", "1", "--seed", "3",
                           "--outdir", str(out)]) == 0
    (png,) = out.glob("*.png")
    _, _, params = parse_infotext(read_infotext(png))
    assert params["Size"] == "64x64"  # the tiny model is made for 64 px: UNet sample size 8 x VAE factor 8
    assert params["TI hashes"] == f"red-ball-2: {sha256_file(run_dir / 'embeddings' / 'red-ball-2.pt')[:12]}"
    err = capsys.readouterr().err
    assert "trainable" not in err and "learned_embeds" not in err and "error" not in err.lower()
    assert sum(line.startswith("note: ") for line in err.splitlines()) == 3  # red-ball, red-ball-2, red-ball-4

    inference.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--embeddings_dir", str(run_dir),
                    "--list_embeddings"])
    text = capsys.readouterr().out
    assert "Loaded embeddings (3)" in text and "Not embeddings" not in text
    assert "Names given by several files (3):" in text


def test_help_says_where_the_default_size_comes_from():
    text = inference.build_parser().format_help()
    assert "UNet sample size x VAE factor" in " ".join(text.split())
