"""--concepts / --sweep: K embeddings in one run, each exactly what its own run gives (vectors, files, logs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_textual_inversion as tti
from utils.embeddings import load_embedding
from utils.errors import UserError
from two_processes import run_two_processes

STEPS = 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """Three concepts with 4, 6 and 8 pictures: with batch 2 their epochs are 2, 3 and 4 steps long."""
    root = tmp_path_factory.mktemp("concepts")
    rng = torch.Generator().manual_seed(3)
    out = []
    for k, n in enumerate((4, 6, 8)):
        d = root / f"c{k}"
        d.mkdir()
        for i in range(n):
            arr = (torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy()
            Image.fromarray(arr).save(d / f"{i:02d}.png")
        out.append(d)
    return out


CONCEPTS = [("alpha-thing", "object", 1, "0.01"), ("beta-thing", "cat", 2, "0.02"), ("gamma-thing", "dog", 1, "0.01")]

# How close "the same as its own run" is. The joint run pushes 6 pictures through the UNet where each single run pushes
# 2, so the matrix kernels block differently and round differently; AdamW then divides every gradient element by its
# own size, and an element whose gradient is near zero keeps a relative rounding error of about 1e-3 through the steps
# (measured: up to 1.45e-6 on the CI machine, 3.5e-7 on ours). Any real mix-up -- another embedding's pictures, rate or
# loss share -- moves elements by the order of the learning rate (1e-2 per step), four orders above this bound.
VECTOR_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _common(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "2", "--learning_rate", "0.01", "--max_train_steps", str(STEPS), "--seed", "5",
            "--save_every", "3", "--checkpointing_steps", "0", "--no_previews", *map(str, extra)]


def _single(model, data, out, name, init, vectors, lr, *extra):
    # The evaluation as the flags leave it (on by default: each embedding's folder then holds its evaluation files,
    # as the single run's does, and the vectors must still match).
    assert tti.main(_common(model, out, "--train_data_dir", data, "--placeholder_token", name,
                            "--initializer_token", init, "--num_vectors", vectors, "--learning_rate", lr,
                            *extra)) == 0


def _concepts_file(path: Path, folders) -> Path:
    lines = []
    for (name, init, vectors, lr), d in zip(CONCEPTS, folders):
        lines.append(f"- name: {name}\n  train_data_dir: {d}\n  init_text: {init}\n  num_vectors: {vectors}\n"
                     f"  learning_rate: {lr}\n")
    path.write_text("".join(lines))
    return path


def _losses(path: Path) -> list[tuple[int, int, int, float, float]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [(int(s), int(e), int(es), float(loss), float(lr)) for s, e, es, loss, lr in rows]


@pytest.fixture(scope="module")
def singles(tiny_sd1, folders, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("singles")
    out = {}
    for (name, init, vectors, lr), d in zip(CONCEPTS, folders):
        _single(tiny_sd1, d, root / name, name, init, vectors, lr)
        out[name] = root / name
    return out


def test_each_embedding_is_what_its_own_run_gives(tiny_sd1, folders, singles, tmp_path):
    """THE test: for K = 3 (different pictures, epoch lengths, vector counts and learning rates), each embedding's
    vectors after N steps match its separate run with the same seed and data, and so does its loss log."""
    out = tmp_path / "many"
    assert tti.main(_common(tiny_sd1, out, "--concepts", _concepts_file(tmp_path / "c.yaml", folders))) == 0
    for name, _, vectors, lr in CONCEPTS:
        mine, theirs = load_embedding(out / name / f"{name}.pt"), load_embedding(singles[name] / f"{name}.pt")
        assert mine.name == name and mine.step == STEPS and mine.num_vectors == vectors
        start = load_embedding(singles[name] / "embeddings" / f"{name}-3.pt").vectors
        moved = (theirs.vectors - start).abs().max()
        assert moved > 1e-4  # the comparison below is not between two untrained tables
        torch.testing.assert_close(mine.vectors, theirs.vectors, **VECTOR_TOLERANCE)
        copy3 = load_embedding(out / name / "embeddings" / f"{name}-3.pt")
        torch.testing.assert_close(copy3.vectors, start, **VECTOR_TOLERANCE)
        a, b = _losses(out / name / "textual_inversion_loss.csv"), _losses(singles[name] / "textual_inversion_loss.csv")
        assert [r[:3] for r in a] == [r[:3] for r in b]  # steps and each embedding's own epochs
        assert [r[4] for r in a] == [r[4] for r in b]  # its own learning rate
        assert [r[3] for r in a] == pytest.approx([r[3] for r in b], rel=1e-4, abs=1e-6)
        # the same files as the single run, in its own folder
        single_files = sorted(p.name for p in singles[name].iterdir() if p.is_file() and p.name != "README.md")
        my_files = sorted(p.name for p in (out / name).iterdir() if p.is_file() and p.name != "README.md")
        assert my_files == single_files
        settings = json.loads((out / name / "training_settings.json").read_text())
        assert settings["embedding_name"] == name and settings["learning_rate"] == lr
        assert settings["num_vectors"] == vectors and settings["final_step"] == STEPS
    with open(out / "embeddings_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [c[0] for c in CONCEPTS] and all(r["steps"] == str(STEPS) for r in rows)


def test_sweep_variants_have_their_own_vectors(tiny_sd1, folders, tmp_path):
    out = tmp_path / "sweep"
    assert tti.main(_common(tiny_sd1, out, "--train_data_dir", folders[0], "--placeholder_token", "sw",
                            "--initializer_token", "object", "--max_train_steps", "2",
                            "--sweep", "learning_rate=0.005,0.02 num_vectors=1,2", "--learning_rate", "0.005")) == 0
    got = {p.name: load_embedding(p / f"{p.name}.pt") for p in out.iterdir() if p.is_dir() and p.name.startswith("sw")}
    assert sorted(got) == ["sw-lr0p005-v1", "sw-lr0p005-v2", "sw-lr0p02-v1", "sw-lr0p02-v2"]
    assert [got[n].num_vectors for n in sorted(got)] == [1, 2, 1, 2]
    assert not torch.equal(got["sw-lr0p005-v1"].vectors, got["sw-lr0p02-v1"].vectors)
    rates = {n: _losses(out / n / "textual_inversion_loss.csv")[0][4] for n in got}
    assert rates == {"sw-lr0p005-v1": 0.005, "sw-lr0p005-v2": 0.005, "sw-lr0p02-v1": 0.02, "sw-lr0p02-v2": 0.02}


@pytest.mark.parametrize("extra, message", [
    (["--resume_embedding", "x.pt"], "--resume_embedding continues one file"),
    (["--enable_buckets"], "--enable_buckets"),
    (["--max_grad_norm", "1"], "joint norm"),
    (["--sweep", "speed=1"], "unknown key 'speed'"),
    (["--eval_data_dir", "."], "--eval_data_dir: one folder cannot hold every embedding's held-out pictures; "
                                "give each concept its own eval_data_dir"),
    (["--eval_clip_model", "openai/clip"], "--eval_clip_model: one scoring model per embedding"),
    (["--eval_dino_model", "facebook/dino"], "--eval_dino_model: one scoring model per embedding"),
    (["--eval_every", "0", "--early_stopping", "dvar"], "concept 'x-v1': --early_stopping dvar needs the evaluation"),
    (["--early_stopping", "patience", "--patience_metric", "clip_i"], "concept 'x-v1': .*needs --eval_clip_model"),
])
def test_refused_combinations_are_one_line_errors(folders, tmp_path, extra, message):
    with pytest.raises(UserError, match=message) as e:
        tti.main(_common("no-model-needed", tmp_path / "o", "--train_data_dir", folders[0], "--placeholder_token",
                         "x", "--sweep", "num_vectors=1,2", *extra))
    assert "\n" not in str(e.value)


def test_one_concept_is_bit_identical_to_its_own_run(tiny_sd1, folders, singles, tmp_path):
    """With K = 1 the batch layout is the single run's: the vectors and the loss log are bit-identical."""
    out = tmp_path / "one"
    path = _concepts_file(tmp_path / "c.yaml", folders[:1])  # the first concept only
    assert tti.main(_common(tiny_sd1, out, "--concepts", path)) == 0
    name = CONCEPTS[0][0]
    assert torch.equal(load_embedding(out / name / f"{name}.pt").vectors,
                       load_embedding(singles[name] / f"{name}.pt").vectors)
    assert _losses(out / name / "textual_inversion_loss.csv") == _losses(singles[name] / "textual_inversion_loss.csv")


def test_the_loss_is_the_sum_of_each_embeddings_mean():
    """Each sample's gradient is 1 / (its embedding's sample count): the gradient its own run's mean gives. (AdamW
    hides a wrong scale almost completely, so the reduction is pinned here directly.)"""
    from utils.embeddings import Embedding
    from utils.trainers.many_embeddings import ManyEmbeddings

    embs = [Embedding(f"e{k}", torch.zeros(1, 4)) for k in range(4)]
    many = ManyEmbeddings(embs, prompt_tokens=None, model=None, lr_factors=[1.0] * 4)
    per_sample = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0, 5.0], requires_grad=True)
    batch = {"embedding_index": torch.tensor([2, 2, 0, 0, 0, 3])}  # embedding 1 has no sample here
    loss = many.reduce_loss(per_sample, batch)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(2.0 + 4.0 + 5.0)
    assert per_sample.grad.tolist() == pytest.approx([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0])
    many.reduce_loss(torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0, 1.0]), batch)
    assert many.take_step_losses().tolist() == pytest.approx([(4.0 + 0.0) / 2, 0.0, (2.0 + 3.0) / 2, (5.0 + 1.0) / 2])
    assert many.take_step_losses() is None


def test_resume_continues_every_embedding_exactly(tiny_sd1, folders, singles, tmp_path):
    """Stopped at step 3 (a checkpoint) and resumed: every embedding ends as its own uninterrupted run, and each
    loss log is whole (steps 1..5, no row twice)."""
    out = tmp_path / "many"
    concepts = _concepts_file(tmp_path / "c.yaml", folders)
    assert tti.main(_common(tiny_sd1, out, "--concepts", concepts, "--max_train_steps", "3",
                            "--checkpointing_steps", "3")) == 0
    assert tti.main(_common(tiny_sd1, out, "--concepts", concepts, "--resume_from_checkpoint", "latest")) == 0
    for name, *_ in CONCEPTS:
        torch.testing.assert_close(load_embedding(out / name / f"{name}.pt").vectors,
                                   load_embedding(singles[name] / f"{name}.pt").vectors, **VECTOR_TOLERANCE)
        assert [r[0] for r in _losses(out / name / "textual_inversion_loss.csv")] == list(range(1, STEPS + 1))


def test_a_changed_concept_list_does_not_resume(tiny_sd1, folders, tmp_path):
    out = tmp_path / "many"
    assert tti.main(_common(tiny_sd1, out, "--concepts", _concepts_file(tmp_path / "c.yaml", folders),
                            "--max_train_steps", "1", "--checkpointing_steps", "1")) == 0
    with pytest.raises(UserError, match="belongs to another run"):
        tti.main(_common(tiny_sd1, out, "--concepts", _concepts_file(tmp_path / "c2.yaml", folders[:2]),
                         "--resume_from_checkpoint", "latest"))


@pytest.mark.slow
def test_two_processes_match_the_single_runs(tiny_sd1, folders, singles, tmp_path):
    """2 processes x batch 1 per embedding: each rank takes its share of every embedding's batch; the result is
    each embedding's own 1-process run, and its loss log is the mean over both ranks."""
    concepts = _concepts_file(tmp_path / "c.yaml", folders)
    r = run_two_processes("train_textual_inversion.py", *_common(tiny_sd1, tmp_path / "two", "--concepts", concepts),
                          "--train_batch_size", "1")
    assert "all 2 processes hold identical trained weights" in r.stdout + r.stderr
    for name, *_ in CONCEPTS:
        torch.testing.assert_close(load_embedding(tmp_path / "two" / name / f"{name}.pt").vectors,
                                   load_embedding(singles[name] / f"{name}.pt").vectors, rtol=1e-4, atol=1e-5)
        a = _losses(tmp_path / "two" / name / "textual_inversion_loss.csv")
        b = _losses(singles[name] / "textual_inversion_loss.csv")
        assert [r[3] for r in a] == pytest.approx([r[3] for r in b], rel=1e-4, abs=1e-6)


def test_previews_cards_and_optimizer_sidecars_per_embedding(tiny_sd1, folders, tmp_path):
    """Each embedding's folder holds what a single run writes with these flags: previews of its own prompt ([name]
    becomes its name), PNG cards that load as it, and an A1111 .pt.optim with only its own optimizer state."""
    out = tmp_path / "o"
    argv = _common(tiny_sd1, out, "--concepts", _concepts_file(tmp_path / "c.yaml", folders[:2]),
                   "--max_train_steps", "2", "--save_every", "2", "--save_image_embeddings", "--save_optimizer_state",
                   "--preview_every", "2", "--preview_steps", "2", "--preview_prompt", "a [name] on a table")
    argv.remove("--no_previews")
    assert tti.main(argv) == 0
    from utils.infotext import read_infotext

    for name, _, vectors, _ in CONCEPTS[:2]:
        folder = out / name
        assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{name}-2-0.png"]
        assert f"a {name} on a table" in read_infotext(folder / "images" / f"{name}-2-0.png")
        card = load_embedding(folder / "image_embeddings" / f"{name}-2.png")
        assert card.name == f"{name}-2" and torch.allclose(card.vectors, load_embedding(folder / f"{name}.pt").vectors)
        sidecar = torch.load(folder / f"{name}.pt.optim", weights_only=False)["optimizer_state_dict"]
        assert len(sidecar["param_groups"]) == 1 and sidecar["param_groups"][0]["params"] == [0]
        assert sidecar["state"][0]["exp_avg"].shape == (vectors, 32)
        # A1111 loads it into an AdamW over the one vector table
        table = torch.nn.Parameter(torch.zeros(vectors, 32))
        torch.optim.AdamW([table]).load_state_dict(sidecar)


def test_sdxl_embeddings_train_side_by_side(tiny_sdxl, folders, tmp_path):
    out = tmp_path / "o"
    assert tti.main(_common(tiny_sdxl, out, "--concepts", _concepts_file(tmp_path / "c.yaml", folders[:2]),
                            "--max_train_steps", "2")) == 0
    for name, _, vectors, _ in CONCEPTS[:2]:
        emb = load_embedding(out / name / f"{name}.safetensors")
        assert emb.is_sdxl and emb.num_vectors == vectors and emb.step == 2
        assert (out / name / "learned_embeds.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Each embedding's own evaluation, early stop and best step

# The mean latents: the stop steps must not depend on the pictures' file times ("once" draws from the cache key).
EVAL = ["--latent_sampling", "deterministic", "--eval_every", "1", "--eval_set_size", "4", "--early_stopping",
        "patience", "--patience", "3"]
EVAL_STEPS = 10


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "embeddings_summary.csv", newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def _vectors(path: Path) -> torch.Tensor:
    return load_embedding(path).vectors


@pytest.fixture(scope="module")
def stopping(tiny_sd1, folders, tmp_path_factory):
    """K = 2 with patience 3: the two embeddings stop at different steps. Also the same run without the evaluation,
    with a copy of every step."""
    root = tmp_path_factory.mktemp("stopping")
    concepts = _concepts_file(root / "c.yaml", folders[:2])
    from diffusers import UNet2DConditionModel

    runs, unet_batches, eval_batches = {}, [], []
    forward = UNet2DConditionModel.forward

    def counting_forward(self, sample, *args, **kwargs):  # the UNet batch sizes of training steps and evaluations
        (unet_batches if torch.is_grad_enabled() else eval_batches).append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    for label, flags in (("eval", EVAL), ("plain", ["--latent_sampling", "deterministic", "--eval_every", "0"])):
        runs[label] = root / label
        with pytest.MonkeyPatch.context() as mp:
            if label == "eval":
                mp.setattr(UNet2DConditionModel, "forward", counting_forward)
            assert tti.main(_common(tiny_sd1, runs[label], "--concepts", concepts, "--max_train_steps", EVAL_STEPS,
                                    "--save_every", "1", *flags)) == 0
    stops = {n: int(r["stop_step"]) for n, r in _summary(runs["eval"]).items()}
    first, other = sorted(stops, key=stops.get)
    assert stops[first] < stops[other] < EVAL_STEPS  # the test needs one to stop while the other trains on
    assert len(unet_batches) == stops[other]  # one training forward per step (accumulation 1)
    # both embeddings' 4-sample evaluation sets in one forward pass while both train (the start and steps 1..first
    # stop), then the other's alone
    s = stops[first]
    assert eval_batches == [8] * (1 + s) + [4] * (stops[other] - s)
    return concepts, runs, stops, first, other, unet_batches


def test_a_stopped_embedding_stays_fixed_while_the_other_trains_on(stopping):
    _, runs, stops, first, other, unet_batches = stopping
    out, plain = runs["eval"], runs["plain"]
    s = stops[first]
    frozen = _vectors(out / first / f"{first}.pt")
    assert torch.equal(frozen, _vectors(out / first / "embeddings" / f"{first}-{s}.pt"))
    assert load_embedding(out / first / f"{first}.pt").step == s
    # without the stop it would have moved on
    assert not torch.equal(_vectors(plain / first / "embeddings" / f"{first}-{s}.pt"),
                           _vectors(plain / first / "embeddings" / f"{first}-{s + 1}.pt"))
    # up to its stop it is exactly the run without evaluation
    assert torch.equal(frozen, _vectors(plain / first / "embeddings" / f"{first}-{s}.pt"))
    # the other one: bit-identical to the run without evaluation up to the first stop (the evaluation draws nothing
    # from the training's generators); after it, the stopped one's samples have left the batch, so the other's
    # samples, seeds and losses are the same in a smaller batch: equal within float rounding, until its own stop
    for step in range(1, stops[other] + 1):
        mine, plains = (_vectors(out / other / "embeddings" / f"{other}-{step}.pt"),
                        _vectors(plain / other / "embeddings" / f"{other}-{step}.pt"))
        if step <= s:
            assert torch.equal(mine, plains), step
        else:
            torch.testing.assert_close(mine, plains, **VECTOR_TOLERANCE)
    assert torch.equal(_vectors(out / other / f"{other}.pt"),
                       _vectors(out / other / "embeddings" / f"{other}-{stops[other]}.pt"))
    # the run ended when both had stopped; the stopped one's log ends at its stop
    assert [r[0] for r in _losses(out / first / "textual_inversion_loss.csv")] == list(range(1, s + 1))
    assert [r[0] for r in _losses(out / other / "textual_inversion_loss.csv")] == list(range(1, stops[other] + 1))
    assert not (out / first / "embeddings" / f"{first}-{s + 1}.pt").exists()
    # the summed loss the optimizer saw after the stop is the other's alone
    summed = _losses(out / "many_embeddings_loss.csv")
    theirs = {r[0]: r[3] for r in _losses(out / other / "textual_inversion_loss.csv")}
    assert [r[3] for r in summed if r[0] > s] == pytest.approx([theirs[r[0]] for r in summed if r[0] > s], rel=1e-6)
    # the stopped one's samples left the batch: after the stop the UNet ran on the other's pictures alone
    assert unet_batches[:s] == [4] * s and unet_batches[s:] == [2] * (stops[other] - s)


def test_each_embedding_has_its_own_best_files_and_report(stopping):
    _, runs, stops, *_ = stopping
    out = runs["eval"]
    rows = _summary(out)
    for name, row in rows.items():
        report = json.loads((out / name / "evaluation.json").read_text())
        assert report["stopped_at"] == stops[name] == int(row["steps"])
        assert row["stop_reason"] == report["stop_reason"] and "did not improve" in row["stop_reason"]
        best = report["best_step"]
        assert int(row["best_step"]) == best and row["best_metric"].startswith("eval_loss=")
        copy = _vectors(out / name / "embeddings" / f"{name}-{best}.pt")
        for suffix in (".pt", ".safetensors"):
            assert torch.equal(_vectors(out / name / f"{name}-best{suffix}"), copy)
        assert (out / name / "evaluation.png").is_file()
        with open(out / name / "evaluation.csv", newline="") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f)]
        assert steps == list(range(0, stops[name] + 1))  # evaluated every step until its stop, then no more
        # its norm watch follows its own vectors only (one column per vector of its own)
        own = _vectors(out / name / f"{name}.pt")
        last = report["history"][-1]
        assert sorted(k for k in last if k.startswith("norm/")) == [f"norm/{i}" for i in range(len(own))]
        assert [last[f"norm/{i}"] for i in range(len(own))] == pytest.approx(own.norm(dim=1).tolist(), rel=1e-5)


def test_resume_across_a_stop_makes_the_same_decisions(tiny_sd1, stopping, tmp_path):
    concepts, runs, stops, first, other, _ = stopping
    out = tmp_path / "resumed"
    half = stops[first] + 1  # a checkpoint after the first stop, before the second
    assert tti.main(_common(tiny_sd1, out, "--concepts", concepts, "--max_train_steps", half, "--save_every", "1",
                            "--checkpointing_steps", half, *EVAL)) == 0
    assert tti.main(_common(tiny_sd1, out, "--concepts", concepts, "--max_train_steps", EVAL_STEPS, "--save_every",
                            "1", "--resume_from_checkpoint", "latest", *EVAL)) == 0
    rows = _summary(out)
    assert {n: int(r["stop_step"]) for n, r in rows.items()} == stops
    assert {n: int(r["steps"]) for n, r in rows.items()} == stops
    for name in (first, other):
        assert torch.equal(_vectors(out / name / f"{name}.pt"), _vectors(runs["eval"] / name / f"{name}.pt"))
        report = json.loads((out / name / "evaluation.json").read_text())
        assert report["stopped_at"] == stops[name]
        # the resumed run knows who stopped: no evaluation or log row after an embedding's stop
        assert [h["step"] for h in report["history"]] == list(range(0, stops[name] + 1))
        assert [r[0] for r in _losses(out / name / "textual_inversion_loss.csv")] == list(range(1, stops[name] + 1))


def test_a_stopped_embeddings_samples_give_no_gradient():
    from utils.embeddings import Embedding
    from utils.trainers.many_embeddings import ManyEmbeddings

    many = ManyEmbeddings([Embedding(f"e{k}", torch.zeros(1, 4)) for k in range(3)], prompt_tokens=None, model=None,
                          lr_factors=[1.0] * 3)
    many.stopped[1] = 4
    per_sample = torch.tensor([1.0, 3.0, 2.0, 4.0], requires_grad=True)
    loss = many.reduce_loss(per_sample, {"embedding_index": torch.tensor([0, 1, 1, 2])})
    loss.backward()
    assert float(loss.detach()) == pytest.approx(1.0 + 4.0)
    assert per_sample.grad.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert many.take_step_losses().tolist() == pytest.approx([1.0, 2.5, 4.0])  # its loss is still measured


@pytest.mark.slow
def test_two_processes_go_on_after_an_embedding_leaves(tiny_sd1, stopping, tmp_path):
    """Under DDP every process's backward must reach every parameter: after one embedding stops (its samples gone
    from the batch), the run goes on to the other's stop on both processes, with identical weights."""
    concepts, *_ = stopping
    out = tmp_path / "two"
    r = run_two_processes("train_textual_inversion.py",
                          *_common(tiny_sd1, out, "--concepts", concepts, "--max_train_steps", EVAL_STEPS,
                                   "--save_every", "1", *EVAL), "--train_batch_size", "1")
    assert "all 2 processes hold identical trained weights" in r.stdout + r.stderr
    stops = {n: int(row["stop_step"]) for n, row in _summary(out).items()}
    first, other = sorted(stops, key=stops.get)
    assert stops[first] < stops[other] < EVAL_STEPS  # one left while the other trained on, on both processes
    assert torch.equal(_vectors(out / first / f"{first}.pt"),
                       _vectors(out / first / "embeddings" / f"{first}-{stops[first]}.pt"))
    assert not torch.equal(_vectors(out / other / "embeddings" / f"{other}-{stops[first]}.pt"),
                           _vectors(out / other / f"{other}.pt"))


def test_a_concept_is_evaluated_on_its_own_held_out_pictures(tiny_sd1, folders, tmp_path, capsys):
    """eval_data_dir in the concepts file: that embedding's evaluation set comes from its held-out folder (as its
    single run's --eval_data_dir); the other keeps its own pictures."""
    concepts = tmp_path / "c.yaml"
    (name_a, *_), (name_b, *_) = CONCEPTS[:2]
    concepts.write_text(f"- name: {name_a}\n  train_data_dir: {folders[0]}\n  eval_data_dir: {folders[2]}\n"
                        f"- name: {name_b}\n  train_data_dir: {folders[1]}\n")
    assert tti.main(_common(tiny_sd1, tmp_path / "o", "--concepts", concepts, "--max_train_steps", "1",
                            "--eval_every", "1", "--eval_set_size", "4")) == 0
    out = capsys.readouterr().out
    assert f"picture(s) of {folders[2]}," in out  # alpha's held-out folder
    assert f"picture(s) of {folders[1]}," in out  # beta: its own training pictures
    assert f"picture(s) of {folders[0]}," not in out
