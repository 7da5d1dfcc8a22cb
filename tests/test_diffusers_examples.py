"""diffusers' own textual-inversion command lines run through train_textual_inversion.py, and the diffusers flags
they and their docs use mean what they mean there: --push_to_hub / --hub_model_id / --hub_token,
--save_as_full_pipeline, --tokenizer_name, --validation_epochs.

The command lines are copied from diffusers' examples/textual_inversion/README.md and README_sdxl.md as written there;
only $MODEL_NAME / $DATA_DIR point at the tiny model and the sample images, and two flags are appended so that a run
takes seconds instead of an hour (--max_train_steps, --resolution: argparse takes the last value).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

import train_textual_inversion as tti
from utils.embeddings import load_embedding

from test_hub import TOKEN, FakeHub  # the Hub's two network calls, replaced

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "examples" / "sample_images"
QUICK = ["--max_train_steps=2", "--resolution=64"]

# examples/textual_inversion/README.md, "Cat toy example"
README_CAT_TOY = r'''
export MODEL_NAME="runwayml/stable-diffusion-v1-5"
export DATA_DIR="./cat"

accelerate launch textual_inversion.py \
  --pretrained_model_name_or_path=$MODEL_NAME \
  --train_data_dir=$DATA_DIR \
  --learnable_property="object" \
  --placeholder_token="<cat-toy>" \
  --initializer_token="toy" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --max_train_steps=3000 \
  --learning_rate=5.0e-04 \
  --scale_lr \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --push_to_hub \
  --output_dir="textual_inversion_cat"
'''
# The same README: "To use multiple embedding vectors ... e.g.:"
README_MULTI_VECTOR = "--num_vectors 5"

# examples/textual_inversion/README_sdxl.md
README_SDXL = r'''
export MODEL_NAME="stabilityai/stable-diffusion-xl-base-1.0"
export DATA_DIR="./cat"

accelerate launch textual_inversion_sdxl.py \
  --pretrained_model_name_or_path=$MODEL_NAME \
  --train_data_dir=$DATA_DIR \
  --learnable_property="object" \
  --placeholder_token="<cat-toy>" \
  --initializer_token="toy" \
  --mixed_precision="bf16" \
  --resolution=768 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --max_train_steps=500 \
  --learning_rate=5.0e-04 \
  --scale_lr \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --save_as_full_pipeline \
  --output_dir="./textual_inversion_cat_sdxl"
'''
# diffusers' training guide (docs/source/en/training/text_inversion.md): "Add the following parameters"
GUIDE_VALIDATION = '''
--validation_prompt="A <cat-toy> train"
--num_validation_images=4
--validation_steps=100
'''


def readme_argv(block: str, model: Path, data: Path) -> list[str]:
    """The script's arguments in a README block, as bash would pass them (exports applied, lines joined)."""
    env = dict(re.findall(r'^export (\w+)="([^"]*)"$', block, flags=re.M))
    env.update(MODEL_NAME=str(model), DATA_DIR=str(data))
    command = " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines()
                       if line.strip() and not line.startswith("export "))
    words = shlex.split(re.sub(r"\$(\w+)", lambda m: shlex.quote(env[m.group(1)]), command))
    assert words[:2] == ["accelerate", "launch"] and words[2].endswith(".py")
    return words[3:]


def test_cat_toy_readme_command_runs_with_diffusers_meaning(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeHub(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = readme_argv(README_CAT_TOY, tiny_sd1, SAMPLES) + shlex.split(README_MULTI_VECTOR) + \
        shlex.split(GUIDE_VALIDATION)

    parsed = tti.parse_args(argv)  # as written: every flag known, with diffusers' values
    assert (parsed.placeholder_token, parsed.initializer_token, parsed.learnable_property) == \
        ("<cat-toy>", "toy", "object")
    assert (parsed.resolution, parsed.train_batch_size, parsed.gradient_accumulation_steps, parsed.max_train_steps) \
        == (512, 1, 4, 3000)
    assert (float(parsed.learning_rate), parsed.scale_lr, parsed.lr_scheduler, parsed.lr_warmup_steps) == \
        (5e-4, True, "constant", 0)
    assert (parsed.push_to_hub, parsed.hub_model_id, parsed.output_dir, parsed.num_vectors) == \
        (True, None, "textual_inversion_cat", 5)
    assert (parsed.preview_prompt, parsed.num_preview_images, parsed.preview_every) == ("A <cat-toy> train", 4, 100)

    assert tti.main(argv + QUICK + ["--preview_steps=2"]) == 0
    out = tmp_path / "textual_inversion_cat"
    emb = load_embedding(out / "cat-toy.pt")  # A1111 names cannot hold < >
    assert emb.step == 2 and emb.num_vectors == 5
    rates = {row.split(",")[4] for row in (out / "textual_inversion_loss.csv").read_text().splitlines()[1:]}
    assert {float(r) for r in rates} == {5e-4 * 1 * 4}  # --scale_lr: x batch x accumulation x processes
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"cat-toy-2-{k}.png" for k in range(4)]
    (up,) = fake.uploads
    assert up["repo_id"] == "tester/textual_inversion_cat" and Path(up["folder_path"]).resolve() == out
    assert "cat-toy.pt" in up["files"] and "README.md" in up["files"]


@pytest.mark.slow
def test_sdxl_readme_command_saves_a_full_pipeline_that_knows_the_word(tiny_sdxl, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.chdir(tmp_path)
    argv = readme_argv(README_SDXL, tiny_sdxl, SAMPLES)
    assert tti.parse_args(argv).save_as_full_pipeline and tti.parse_args(argv).mixed_precision == "bf16"
    assert tti.main(argv + QUICK + ["--no_previews"]) == 0

    out = tmp_path / "textual_inversion_cat_sdxl"
    emb = load_embedding(out / "cat-toy.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)  # the folder is now the whole model
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                    (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
        assert "<cat-toy>" in tokenizer.tokenize("A <cat-toy> backpack")  # the token our diffusers files carry
        row = tokenizer.convert_tokens_to_ids("<cat-toy>")
        assert torch.equal(encoder.get_input_embeddings().weight.detach()[row], emb.vectors[key][0])
    # Every original weight is saved unchanged.
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for name in ("unet", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    vocab = base.text_encoder.get_input_embeddings().weight.shape[0]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[:vocab],
                       base.text_encoder.get_input_embeddings().weight)
    # The card tells diffusers users to load the folder itself.
    assert f'StableDiffusionXLPipeline.from_pretrained("path/to/this/folder"' in (out / "README.md").read_text()


def test_validation_epochs_previews_every_n_epochs(tiny_sd1, tmp_path):
    out = tmp_path / "o"
    # 6 sample images, batch 2: 3 optimizer steps per epoch.
    assert tti.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(SAMPLES),
                     "--output_dir", str(out), "--placeholder_token", "x", "--initializer_token", "ball",
                     "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "7",
                     "--validation_epochs", "1", "--preview_steps", "1", "--checkpointing_steps", "0"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["x-3-0.png", "x-6-0.png", "x-7-0.png"]


def test_tokenizer_name(tiny_sd1, tmp_path, capsys):
    from utils.models import ModelSource, load_pipeline
    from utils.tokenizer import build_clip_tokenizer

    folder = tmp_path / "tok"
    build_clip_tokenizer().save_pretrained(folder)
    loaded = load_pipeline(ModelSource(str(tiny_sd1), tokenizer=str(folder)))
    assert Path(loaded.pipeline.tokenizer.name_or_path) == folder and loaded.pipeline.tokenizer.model_max_length == 77
    out = tmp_path / "o"
    assert tti.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(SAMPLES),
                     "--output_dir", str(out), "--placeholder_token", "x", "--resolution", "64",
                     "--max_train_steps", "1", "--no_previews", "--tokenizer_name", str(tiny_sd1)]) == 0
    assert json.loads((out / "training_settings.json").read_text())["tokenizer_name"] == str(tiny_sd1)
    from utils.errors import UserError

    with pytest.raises(UserError, match="--tokenizer_name .*cannot load a CLIP tokenizer"):
        load_pipeline(ModelSource(str(tiny_sd1), tokenizer=str(tmp_path / "missing")))
