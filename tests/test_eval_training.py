"""The evaluation inside real training runs (both trainers): trajectory untouched, stop and resume, files, flags."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_hypernetwork as thn
import train_textual_inversion as tti
from utils.embeddings import load_embedding
from utils.errors import UserError

from test_image_scores import tiny_clip, tiny_vit  # noqa: F401 (fixtures: tiny random CLIP and ViT)
from test_train_textual_inversion import data_dir  # noqa: F401 (fixture: 4 captioned 64 px pictures)
from two_processes import run_two_processes

ROOT = Path(__file__).resolve().parent.parent




def _ti(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--placeholder_token", "my-emb", "--initializer_token", "object", "--num_vectors", "2",
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "0.05", "--max_train_steps", "6",
            "--save_every", "0", "--checkpointing_steps", "0", "--no_previews", "--eval_set_size", "4",
            *map(str, extra)]


def _hn(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--hypernetwork_name", "hn", "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "0.001",
            "--max_train_steps", "6", "--save_every", "0", "--checkpointing_steps", "0", "--no_previews",
            "--layer_structure", "1, 2, 1", "--activation_func", "relu", "--dropout_structure", "0, 0.5, 0",
            "--eval_set_size", "4", *map(str, extra)]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_ti_trajectory_is_bit_identical_with_evaluation_on_and_off(tiny_sd1, data_dir, tmp_path):
    assert tti.main(_ti(tiny_sd1, data_dir, tmp_path / "off", "--eval_every", "0")) == 0
    assert tti.main(_ti(tiny_sd1, data_dir, tmp_path / "on", "--eval_every", "1")) == 0
    off, on = load_embedding(tmp_path / "off" / "my-emb.pt"), load_embedding(tmp_path / "on" / "my-emb.pt")
    assert torch.equal(off.vectors, on.vectors)
    csv_name = "textual_inversion_loss.csv"
    assert (tmp_path / "off" / csv_name).read_text() == (tmp_path / "on" / csv_name).read_text()
    rows = _rows(tmp_path / "on" / "evaluation.csv")
    assert [int(r["step"]) for r in rows] == list(range(7))  # the starting point, then every step
    assert {"eval_loss", "norm/0", "norm/1"} <= set(rows[0])
    assert not (tmp_path / "off" / "evaluation.csv").exists()


def test_hn_trajectory_is_bit_identical_with_evaluation_on_and_off(tiny_sd1, data_dir, tmp_path):
    # With dropout: an evaluation forward pass in training mode would draw from the global RNG training uses.
    assert thn.main(_hn(tiny_sd1, data_dir, tmp_path / "off", "--eval_every", "0")) == 0
    assert thn.main(_hn(tiny_sd1, data_dir, tmp_path / "on", "--eval_every", "2", "--early_stopping", "dvar")) == 0
    off = torch.load(tmp_path / "off" / "hn.pt", weights_only=False)
    on = torch.load(tmp_path / "on" / "hn.pt", weights_only=False)
    for key in off:
        if isinstance(key, int):
            for a, b in zip(off[key], on[key]):
                assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "on" / "hn-best.pt").is_file() and (tmp_path / "on" / "hn-best.safetensors").is_file()


def _stop_args(tmp, *extra):
    # DVAR over every step's evaluation, its loss rule alone: on this model and data it fires at step 9. Latents
    # are the posterior means: with A1111's 'once' sampling the draws follow the data folder's path.
    return ("--latent_sampling", "deterministic", "--eval_every", "1", "--early_stopping", "dvar", "--dvar_window", "3", "--dvar_threshold", "0.1",
            "--dvar_direction", "none", "--max_train_steps", "40", "--checkpointing_steps", "1", *extra)


def test_early_stop_is_the_same_after_an_interruption(tiny_sd1, data_dir, tmp_path):
    assert tti.main(_ti(tiny_sd1, data_dir, tmp_path / "full", *_stop_args(tmp_path))) == 0
    full = json.loads((tmp_path / "full" / "evaluation.json").read_text())
    stop = full["stopped_at"]
    assert stop is not None and 5 < stop < 40
    assert load_embedding(tmp_path / "full" / "my-emb.pt").step == stop
    # Interrupted two steps before the stop (after the rule has seen several evaluations), then resumed.
    cut = tmp_path / "cut"
    assert tti.main(_ti(tiny_sd1, data_dir, cut, *_stop_args(tmp_path, "--max_train_steps", stop - 2))) == 0
    assert json.loads((cut / "evaluation.json").read_text())["stopped_at"] is None
    assert tti.main(_ti(tiny_sd1, data_dir, cut, *_stop_args(tmp_path, "--resume_from_checkpoint", "latest"))) == 0
    resumed = json.loads((cut / "evaluation.json").read_text())
    assert resumed["stopped_at"] == stop and resumed["best_step"] == full["best_step"]
    assert resumed["history"] == full["history"]
    assert (cut / "evaluation.csv").read_text() == (tmp_path / "full" / "evaluation.csv").read_text()
    assert torch.equal(load_embedding(cut / "my-emb-best.pt").vectors,
                       load_embedding(tmp_path / "full" / "my-emb-best.pt").vectors)
    # A run resumed from the stop's own checkpoint has nothing left to do.
    assert tti.main(_ti(tiny_sd1, data_dir, cut, *_stop_args(tmp_path, "--resume_from_checkpoint", "latest"))) == 0
    assert load_embedding(cut / "my-emb.pt").step == stop


def test_outputs_best_file_csv_plot_and_summary(tiny_sd1, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert tti.main(_ti(tiny_sd1, data_dir, out, "--eval_every", "2", "--norm_warn_factor", "0.01",
                        "--report_to", "tensorboard")) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    best = report["best_step"]
    assert best in (2, 4, 6) and f"Best step {best}: the lowest eval_loss (" in said
    losses = {h["step"]: h["eval_loss"] for h in report["history"]}
    assert losses[best] == min(v for s, v in losses.items() if s > 0)  # the starting point is never the pick
    emb = load_embedding(out / "my-emb-best.pt")
    assert emb.step == best and emb.name == "my-emb-best"
    assert torch.equal(load_embedding(out / "my-emb-best.safetensors").vectors, emb.vectors)
    from safetensors.torch import load_file

    # its own diffusers token, as periodic copies have: loaded beside my-emb.safetensors, the two do not collide
    assert list(load_file(out / "my-emb-best.safetensors")) == ["<my-emb-best>"]
    with Image.open(out / "evaluation.png") as im:
        assert im.size[0] > 200
    rows = _rows(out / "evaluation.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6]
    assert float(rows[2]["eval_loss"]) == pytest.approx(losses[4], rel=1e-6)
    # TensorBoard: every evaluation's metrics; the norms every step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["eval_loss"] == [0, 2, 4, 6] and steps["eval_loss_t750-999"] == [0, 2, 4, 6]
    assert sorted(set(steps["norm/1"])) == list(range(7))
    # The norm watch: a warning once per vector, naming the step.
    warnings = [line for line in said.splitlines() if line.startswith("Warning: step") and "norm" in line]
    assert len(warnings) == 2 and "vector 0" in warnings[0] and "vector 1" in warnings[1]


def test_image_scores_pick_the_best_and_leave_training_alone(tiny_sd1, data_dir, tmp_path, tiny_clip, tiny_vit):
    assert tti.main(_ti(tiny_sd1, data_dir, tmp_path / "off", "--eval_every", "0", "--max_train_steps", "4")) == 0
    out = tmp_path / "on"
    assert tti.main(_ti(tiny_sd1, data_dir, out, "--eval_every", "2", "--max_train_steps", "4",
                        "--eval_clip_model", tiny_clip, "--eval_dino_model", tiny_vit, "--select_best", "clip_i",
                        "--eval_num_images", "2", "--preview_steps", "2")) == 0
    assert torch.equal(load_embedding(tmp_path / "off" / "my-emb.pt").vectors,
                       load_embedding(out / "my-emb.pt").vectors)
    rows = _rows(out / "evaluation.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert all(-1 <= float(r[k]) <= 1 for r in rows for k in ("clip_i", "clip_t", "dino"))
    scores = {int(r["step"]): float(r["clip_i"]) for r in rows}
    report = json.loads((out / "evaluation.json").read_text())
    assert report["best_metric"] == "clip_i" and report["best_step"] == max((2, 4), key=scores.get)
    assert load_embedding(out / "my-emb-best.pt").step == report["best_step"]


def test_two_processes_share_the_evaluation_and_decide_alike(tiny_sd1, data_dir, tmp_path):
    """Each process evaluates its share of the set; summed, every process holds all the losses: the history, the
    stop and the best step are those of one process (up to float rounding of the trained vectors)."""
    extra = ("--eval_every", "1", "--early_stopping", "patience", "--patience", "2", "--max_train_steps", "12",
             "--latent_sampling", "deterministic")
    assert tti.main(_ti(tiny_sd1, data_dir, tmp_path / "one", *extra)) == 0
    r = run_two_processes("train_textual_inversion.py", *_ti(tiny_sd1, data_dir, tmp_path / "two", *extra),
                          "--train_batch_size", "1")
    one = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert two["stopped_at"] == one["stopped_at"] and two["best_step"] == one["best_step"]
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]]
    for a, b in zip(one["history"], two["history"]):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    assert "Early stop at step" in r.stdout and r.stdout.count("Best step") == 1  # said once, by the main process


@pytest.mark.parametrize("script, argv, message", [
    (tti, ["--eval_every", "-1"], "--eval_every must be >= 0"),
    (tti, ["--eval_data_dir", "/no/such/eval"], "--eval_data_dir /no/such/eval: no such folder"),
    (tti, ["--select_best", "accuracy"], "--select_best accuracy: not a metric"),
    (tti, ["--select_best", "clip_i"], "--select_best clip_i needs --eval_clip_model"),
    (tti, ["--early_stopping", "patience", "--patience_metric", "dino"], "needs --eval_dino_model"),
    (tti, ["--early_stopping", "dvar", "--dvar_threshold", "2"], "threshold must be between 0 and 1"),
    (tti, ["--early_stopping", "dvar", "--dvar_window", "1"], "window must be at least 2"),
    (tti, ["--early_stopping", "patience", "--patience", "0"], "patience must be at least 1"),
    (tti, ["--early_stopping", "dvar", "--eval_every", "0"], "needs the evaluation (--eval_every > 0)"),
    (tti, ["--eval_set_size", "0"], "--eval_set_size must be >= 1"),
    (tti, ["--norm_warn_factor", "nan"], "--norm_warn_factor must be a finite number"),
    (tti, ["--eval_clip_model", "./no/such/clip"], "--eval_clip_model ./no/such/clip: no such folder"),
    (thn, ["--select_best", "eval_loss_tx"], "not a metric"),
])
def test_bad_eval_flags_fail_in_one_line_before_the_model_loads(tiny_sd1, data_dir, tmp_path, monkeypatch, script,
                                                                 argv, message):
    import utils.training_setup

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(utils.training_setup, "load_model_for_training", no_model)
    build = _ti if script is tti else _hn
    with pytest.raises(UserError) as e:
        script.main(build(tiny_sd1, data_dir, tmp_path / "o", *argv))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_tinyworld_stop_lands_in_the_target_window(tinyworld, tmp_path):
    """A tiny-world concept trained with the defaults and --early_stopping dvar: the stop fires where the classifier
    (the independent judge) already sees the concept in >= 80% of samples, no later than twice the first step that
    reached 0.8, and the best step's accuracy is >= 0.9 of the best seen (bench/bench_learning.py, one concept)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_learning.py"
    spec = importlib.util.spec_from_file_location("bench_learning_for_eval_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tw_data = bench._module(tinyworld / "data.py", "tinyworld_data")
    classify = bench._module(tinyworld / "classify.py", "tinyworld_classify").classify
    data, out = tmp_path / "data", tmp_path / "out"
    bench.write_concept(tw_data, data, "blue", "triangle", None)
    argv = ["--pretrained_model_name_or_path", str(tinyworld), "--train_data_dir", str(data), "--placeholder_token",
            bench.NAME, "--initializer_token", bench.INIT_WORD, "--resolution", "64", "--max_train_steps", "3000",
            "--output_dir", str(out), "--save_every", "25", "--checkpointing_steps", "0", "--no_previews",
            "--early_stopping", "dvar", "--latent_sampling", "deterministic"]  # not the temp folder's path
    assert tti.main(argv) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["stopped_at"] is not None and report["stopped_at"] <= 600  # >= 80% of the budget saved
    scorer = bench.Scorer(classify)
    rows = []
    for step, src in bench.saved_steps(out).items():
        folder = tmp_path / f"step{step}"
        folder.mkdir()
        (folder / src.name).write_bytes(src.read_bytes())
        rows.append({"step": step, **scorer.rates(f"a photo of a {src.stem}", folder, 16, "blue", "triangle")})
    summary = bench.stop_summary(out / "evaluation.json", "eval_loss", rows)
    assert summary["stop_ok"] and summary["best_ok"], (summary, rows)
    assert summary["best"] == report["best_step"]
