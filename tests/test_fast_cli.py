"""--help and flag errors answer before torch, diffusers or transformers are imported (README "Start-up"), and the
trainers' flags become one typed config (utils/config.py) with no flag left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "datasets", "accelerate")

# Runs the script as `python SCRIPT ARGS...` does, then prints which heavy modules it imported.
PROBE = """
import json, runpy, sys
sys.path.insert(0, {root!r})
sys.argv = [{script!r}] + {args!r}
code = None
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""

CASES = [
    ("train_textual_inversion.py", ["--help"], 0),
    ("train_textual_inversion.py", ["--no_such_flag"], 2),
    ("train_textual_inversion.py", ["--placeholder_token", "x", "--learning_rate", "fast"], 2),
    ("train_textual_inversion.py", ["--placeholder_token", "x", "--train_batch_size", "0"], 2),
    ("train_textual_inversion.py", ["--placeholder_token", "x", "--adam_beta1", "nan"], 2),
    ("train_textual_inversion.py", ["--placeholder_token", "x", "--lr_scheduler", "bogus"], 2),
    ("train_textual_inversion.py", ["--output_dir", "o"], 2),  # neither --placeholder_token nor --resume_embedding
    ("train_textual_inversion.py", ["--placeholder_token", "x", "--resume_from_checkpoint", "no-such-dir"], 2),
    ("train_textual_inversion.py", ["--placeholder_token", "x", "--resume_from_checkpoint", "."], 2),  # no progress.json
    ("train_textual_inversion.py", ["--demo", "--learning_rate", "fast"], 2),
    ("train_textual_inversion.py", ["--demo", "--resume_from_checkpoint", "no-such-dir"], 2),
    ("train_hypernetwork.py", ["--help"], 0),
    ("train_hypernetwork.py", ["--weight_init", "Zeros"], 2),
    ("train_hypernetwork.py", ["--hypernetwork_name", "h", "--sizes", "768, x"], 2),
    ("train_hypernetwork.py", ["--hypernetwork_name", "h", "--save_every", "-1"], 2),
    ("train_hypernetwork.py", ["--hypernetwork_name", "h", "--activation_func", "bogus"], 2),
    ("train_hypernetwork.py", ["--hypernetwork_name", "h", "--activation_func", "threshold"], 2),
    ("train_hypernetwork.py", ["--hypernetwork_name", "h", "--layer_structure", "2, 1"], 2),
    ("train_hypernetwork.py", ["--hypernetwork_name", "h", "--dropout_structure", "0, 1.5, 0"], 2),
    ("train_hypernetwork.py", ["--hypernetwork_name", "h", "--resume_from_checkpoint", "no-such-dir"], 2),
    ("inference.py", ["--help"], 0),
    ("inference.py", ["--prompt", "a"], 2),  # no model given
    ("inference.py", ["--pretrained_model_name_or_path", "m", "--prompt", "a", "--width", "60"], 2),
    ("inference.py", ["--pretrained_model_name_or_path", "m", "--prompt", "a", "--sampler", "nope"], 2),
    ("preprocess.py", ["--help"], 0),
    ("preprocess.py", ["--no_such_flag"], 2),
]


@pytest.mark.parametrize("script,args,code", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_help_and_flag_errors_import_no_heavy_library(script, args, code, tmp_path):
    probe = PROBE.format(root=str(ROOT), script=str(ROOT / script), args=args, heavy=HEAVY)
    env = {**os.environ, "EMBEDFORGE_CACHE": str(tmp_path / "cache")}  # --demo: its tiny model not yet built
    p = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["code"] == code, p.stderr[-2000:]
    assert result["heavy"] == [], f"{script} {args} imported {result['heavy']} before answering"
    if code == 2:
        last = p.stderr.strip().splitlines()[-1]  # argparse's errors follow its usage lines
        assert last.startswith(f"{script}: error: ") and "Traceback" not in p.stderr, p.stderr


def test_a_damaged_checkpoint_is_refused_before_torch(tmp_path):
    """--resume_from_checkpoint latest checks the newest checkpoint's files against its manifest, standard library
    only: a checkpoint without one is a one-line error before any heavy import."""
    (tmp_path / "o" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "o" / "checkpoint-3" / "progress.json").write_text("{}")
    args = ["--hypernetwork_name", "h", "--output_dir", "o", "--resume_from_checkpoint", "latest"]
    probe = PROBE.format(root=str(ROOT), script=str(ROOT / "train_hypernetwork.py"), args=args, heavy=HEAVY)
    p = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "heavy": []}, p.stderr[-2000:]
    assert "checkpoint-3/manifest.json: missing" in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["train_textual_inversion", "train_hypernetwork", "inference"])
def test_every_flag_has_one_config_field(script):
    """A flag added to a parser without a field in its config would be lost: config.resolve refuses, and so does
    this (and a field without a flag would be a setting nobody can change)."""
    import importlib

    from utils.config import HypernetworkConfig, InferenceConfig, TextualInversionConfig, field_names

    module = importlib.import_module(script)
    cls = {"train_textual_inversion": TextualInversionConfig, "train_hypernetwork": HypernetworkConfig,
           "inference": InferenceConfig}[script]
    dests = {a.dest for a in module.build_parser()._actions if a.dest not in ("help", "config")}
    assert dests == field_names(cls)


def test_config_resolves_flags_file_and_demo_once(tmp_path):
    import train_textual_inversion as tti

    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"output_dir": "from-file", "learning_rate": 0.01, "wandb_tags": ["a", "b"],
                                "seed": 7, "hub_token": "hf_secret"}))
    cfg = tti.resolve_config(["--config", str(conf), "--seed", "3", "--placeholder_token", "cat"])
    assert cfg.saving.output_dir == "from-file" and cfg.training.seed == 3  # the file over defaults, flags over both
    assert cfg.optim.learning_rate == "0.01" and cfg.tracking.wandb_tags == ["a", "b"]
    settings = cfg.settings()
    assert "hub_token" not in settings and "hf_secret" not in json.dumps(settings)
    assert settings["output_dir"] == "from-file" and settings["placeholder_token"] == "cat"
    demo = tti.resolve_config(["--demo", "--num_vectors", "4"])  # demo defaults; explicit flags still win
    assert (demo.embedding.placeholder_token, demo.embedding.num_vectors, demo.data.resolution) == ("red-ball", 4, 64)
    assert tti.resolve_config(["--wandb_tags", "x, y,,z"]).tracking.wandb_tags == ["x", "y", "z"]


def test_loop_config_carries_each_value_from_the_config(tmp_path):
    import train_hypernetwork as thn
    from utils import cli

    cfg = thn.resolve_config(["--output_dir", str(tmp_path), "--gradient_accumulation_steps", "3", "--seed", "5",
                              "--report_to", "tensorboard", "--wandb_tags", "t1,t2", "--hub_token", "hf_x",
                              "--validation_epochs", "2"])
    loop = cli.loop_config(cfg, 100, "epsilon", cfg.settings(), micro_batches_per_epoch=12)
    assert (loop.output_dir, loop.gradient_accumulation_steps, loop.seed, loop.report_to) == \
        (tmp_path, 3, 5, "tensorboard")
    assert loop.wandb_tags == ["t1", "t2"] and loop.optim is cfg.optim and loop.preview_every == 2 * (12 // 3)
    assert "hub_token" not in loop.tracker_config and loop.tracker_config["seed"] == 5
