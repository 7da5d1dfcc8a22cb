"""The deterministic evaluation set, the stopping rules and the norm statistics (utils/evaluation.py,
utils/early_stopping.py, utils/eval_report.py)."""

import json
import math

import numpy as np
import pytest
import torch

from utils.early_stopping import DVAR, BestStep, Patience, variance_ratio
from utils.eval_report import NormWatch, VocabularyNorms, norm_report, plot_curves
from utils.evaluation import band_names, build_eval_set, evaluate, stratified_timesteps, summarize


class Scheduler:
    """The part of a diffusers noise scheduler the evaluation uses, with a simple closed form."""

    class config:
        num_train_timesteps = 1000

    def add_noise(self, latents, noise, t):
        a = (1 - t.float() / 1000).view(-1, *[1] * (latents.ndim - 1))
        return a * latents + (1 - a) * noise


def pictures(n=6, shape=(4, 2, 2)):
    g = torch.Generator().manual_seed(5)
    return torch.randn((n, *shape), generator=g), [f"a photo of thing {i}" for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# The evaluation set


@pytest.mark.parametrize("n", [1, 4, 7, 64, 1000])
def test_stratified_timesteps_one_per_stratum(n):
    t = stratified_timesteps(n, 1000, torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.long
    edges = torch.arange(n + 1, dtype=torch.float64) * 1000 / n
    # each timestep inside its own stratum [k*T/n, (k+1)*T/n)
    assert bool(((t >= edges[:-1].floor()) & (t < edges[1:])).all()), t
    assert int(t.min()) >= 0 and int(t.max()) <= 999


def test_stratified_timesteps_depend_on_the_generator_only():
    a = stratified_timesteps(16, 1000, torch.Generator().manual_seed(1))
    b = stratified_timesteps(16, 1000, torch.Generator().manual_seed(1))
    c = stratified_timesteps(16, 1000, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_set_is_deterministic_and_leaves_the_global_rng_alone():
    latents, prompts = pictures()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_eval_set(latents, prompts, 1000, size=12, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_eval_set(latents, prompts, 1000, size=12, seed=3)
    for x, y in ((a.latents, b.latents), (a.noise, b.noise), (a.timesteps, b.timesteps)):
        assert torch.equal(x, y)
    assert a.prompts == b.prompts and a.fingerprint() == b.fingerprint()
    c = build_eval_set(latents, prompts, 1000, size=12, seed=4)
    assert not torch.equal(a.noise, c.noise) and a.fingerprint() != c.fingerprint()


def test_eval_set_uses_every_picture_equally_at_different_parts_of_the_schedule():
    latents, prompts = pictures(6)
    es = build_eval_set(latents, prompts, 1000, size=24, seed=0)
    counts = torch.bincount(es.picture_index, minlength=6)
    assert counts.tolist() == [4] * 6
    # the k-th use of a picture comes from the k-th quarter of the schedule: a picture is seen at 4 different bands
    for p in range(6):
        bands = sorted(int(t) // 250 for t in es.timesteps[es.picture_index == p])
        assert bands == [0, 1, 2, 3], (p, es.timesteps[es.picture_index == p])
    # latents and prompts follow the picture index
    for i, p in enumerate(es.picture_index.tolist()):
        assert torch.equal(es.latents[i], latents[p]) and es.prompts[i] == prompts[p]


def test_eval_set_smaller_than_the_pictures_uses_distinct_ones():
    latents, prompts = pictures(10)
    es = build_eval_set(latents, prompts, 1000, size=4, seed=0)
    assert len(es) == 4 and len(set(es.picture_index.tolist())) == 4
    assert sorted(int(t) // 250 for t in es.timesteps) == [0, 1, 2, 3]


def test_eval_set_rejects_mismatched_prompts():
    latents, prompts = pictures(3)
    with pytest.raises(ValueError, match="one prompt per picture"):
        build_eval_set(latents, prompts[:2], 1000)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def zero_model(noisy, t, batch):
    assert len(batch["prompts"]) == noisy.shape[0]
    return torch.zeros_like(noisy)


def test_evaluate_is_the_per_sample_mse_and_summaries_per_band():
    latents, prompts = pictures(8)
    es = build_eval_set(latents, prompts, 1000, size=16, seed=0)
    losses = evaluate(zero_model, es, Scheduler(), batch_size=5)
    expected = (es.noise ** 2).mean(dim=(1, 2, 3))  # epsilon target, zero prediction
    assert torch.allclose(losses, expected, rtol=0, atol=1e-7)
    s = summarize(es, losses)
    assert s["eval_loss"] == pytest.approx(float(expected.double().mean()), abs=1e-7)
    names = band_names(1000)
    assert names == ["t0-249", "t250-499", "t500-749", "t750-999"]
    for name, lo in zip(names, (0, 250, 500, 750)):
        inside = (es.timesteps >= lo) & (es.timesteps < lo + 250)
        assert s[f"eval_loss_{name}"] == pytest.approx(float(expected[inside].double().mean()), abs=1e-7)


def test_evaluate_shards_and_batch_sizes_agree():
    latents, prompts = pictures(8)
    es = build_eval_set(latents, prompts, 1000, size=10, seed=0)

    def model(noisy, t, batch):  # depends on the prompt, the timestep and the input
        k = torch.tensor([float(p[-1]) for p in batch["prompts"]]).view(-1, 1, 1, 1)
        return noisy * 0.5 + k * 0.01 + t.view(-1, 1, 1, 1) * 1e-4

    full = evaluate(model, es, Scheduler(), batch_size=10)
    one_by_one = evaluate(model, es, Scheduler(), batch_size=1)
    # two "ranks", each evaluating its share, put back in order
    parts = {i: v for r in range(2) for i, v in zip(range(r, 10, 2), evaluate(model, es, Scheduler(), batch_size=3,
                                                                                indices=list(range(r, 10, 2))))}
    sharded = torch.stack([parts[i] for i in range(10)])
    assert torch.allclose(full, one_by_one, rtol=1e-6, atol=0) and torch.allclose(full, sharded, rtol=1e-6, atol=0)


def test_several_sets_evaluated_together_give_each_sets_own_losses():
    """Many embeddings: their evaluators' sets go through the model in shared batches (utils.evaluator.joint_losses);
    each gets exactly its own losses, on one process or on each of two, with or without loss weights."""
    from utils.evaluator import EvalConfig, Evaluator, joint_losses

    def model(noisy, t, batch):  # depends on the prompt, the timestep and the input, sample by sample
        k = torch.tensor([float(p[-1]) for p in batch["prompts"]]).view(-1, 1, 1, 1)
        return noisy * 0.5 + k * 0.01 + t.view(-1, 1, 1, 1) * 1e-4

    evaluators = []
    for j, (n, size) in enumerate([(6, 10), (4, 3), (8, 7)]):
        latents, prompts = pictures(n)
        weights = torch.rand(n, 4, 2, 2, generator=torch.Generator().manual_seed(j)) if j == 1 else None
        es = build_eval_set(latents, prompts, 1000, size=size, seed=j, loss_weights=weights)
        evaluators.append(Evaluator(EvalConfig(eval_every=1, eval_batch_size=3), es, Scheduler()))
    for world in (1, 2):
        for rank in range(world):
            alone = [ev.losses(model, rank, world) for ev in evaluators]
            for size in (None, 4, 100):
                together = joint_losses(evaluators, model, rank, world, size)
                assert [len(t) for t in together] == [10, 3, 7]
                for a, b in zip(alone, together):
                    assert torch.equal(a, b)
    assert joint_losses([], model) == []


def test_evaluate_on_a_real_text_to_image_model_repeats_exactly(tiny_sd1):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from utils.embeddings import create_embedding
    from utils.trainers.textual_inversion import TextualInversion

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    ti = TextualInversion.build(pipe, create_embedding("thing", "object", 2, pipe.tokenizer,
                                                       pipe.text_encoder.get_input_embeddings()))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    es = build_eval_set(latents, ["a photo of thing", "thing on a table", "a thing"], 1000, size=6, seed=1)

    def predict(noisy, t, batch):
        return ti.model(noisy, t, **ti.model_inputs(batch, noisy.device))

    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = evaluate(predict, es, sched, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG is untouched
    b = evaluate(predict, es, sched, batch_size=4)
    assert torch.equal(a, b) and a.shape == (6,) and bool(torch.isfinite(a).all())
    with torch.no_grad():  # the loss follows the trained vectors
        ti.model.vectors[0].add_(1.0)
    assert not torch.equal(evaluate(predict, es, sched, batch_size=4), a)


# ---------------------------------------------------------------------------------------------------------------
# DVAR


def run_rule(rule, values, every=1):
    for i, v in enumerate(values):
        if rule.update((i + 1) * every, v):
            return (i + 1) * every
    return None


def test_dvar_stops_after_most_of_the_drop_not_while_it_falls_steeply():
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    curve = 0.02 + 0.02 * np.exp(-steps / 40) + rng.normal(0, 1e-4, steps.size)
    stop = run_rule(DVAR(window=50, threshold=0.15), curve)
    # The rule compares the window's spread with the whole history's: on an exponential decay it fires once the
    # window varies by much less than the history, here at about two time constants (87% of the drop done).
    assert stop is not None and 75 <= stop <= 90, stop
    assert curve[stop - 1] - 0.02 < 0.15 * 0.02
    # a window as long as the decay waits longer
    assert run_rule(DVAR(window=100, threshold=0.15), curve) > stop + 40


def test_fixed_window_dvar_stops_a_steady_decline_the_growing_window_does_not():
    rng = np.random.default_rng(4)
    line = (0.05 - 1e-5 * np.arange(2000) + rng.normal(0, 1e-5, 2000)).tolist()  # still improving at the end
    # the paper's fixed window: the window's variance shrinks against the history's as the run grows
    assert run_rule(DVAR(window=10, threshold=0.15), line) is not None
    # a window of half the history: the ratio stays near 0.25 on a straight line
    assert run_rule(DVAR(window=10, threshold=0.15, window_fraction=0.5), line) is None


@pytest.mark.parametrize("tau", [10, 40, 160])
def test_growing_window_stops_at_the_same_multiple_of_the_time_scale(tau):
    rng = np.random.default_rng(5)
    steps = np.arange(40 * tau)
    curve = 0.02 + 0.02 * np.exp(-steps / tau) + rng.normal(0, 2e-5, steps.size)
    stop = run_rule(DVAR(window=5, threshold=0.1, window_fraction=0.5), curve)
    # at the same multiple of tau whatever tau is (about 1.6: four fifths of the fall done)
    assert stop is not None and 1.4 * tau <= stop <= 1.8 * tau, (tau, stop)


def test_growing_window_uses_half_the_history_and_waits_for_two_windows():
    rule = DVAR(window=3, threshold=0.01, window_fraction=0.5)
    values = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # a straight line: never settles
    for i, v in enumerate(values[:5], 1):
        assert not rule.update(i, v) and rule.ratio is None  # fewer than 2 x 3 evaluations
    for i, v in enumerate(values[5:], 6):
        rule.update(i, v)
    assert rule.current_window() == 5  # ceil(9 / 2)
    assert rule.ratio == pytest.approx(np.var(values[-5:]) / np.var(values), rel=1e-12)


def test_dvar_never_stops_on_pure_noise():
    rng = np.random.default_rng(1)
    assert run_rule(DVAR(window=50, threshold=0.15), 0.03 + rng.normal(0, 1e-3, 2000)) is None


def test_dvar_ratio_is_the_paper_formula():
    rng = np.random.default_rng(2)
    values = rng.normal(size=30).tolist()
    rule = DVAR(window=7, threshold=0.01)
    for i, v in enumerate(values):
        rule.update(i + 1, v)
    assert rule.ratio == pytest.approx(np.var(values[-7:]) / np.var(values), rel=1e-12)
    assert variance_ratio([1.0, 1.0], 0.0) == 0.0


def test_dvar_waits_for_a_full_window():
    rule = DVAR(window=5, threshold=0.5)
    for step in range(1, 5):
        assert not rule.update(step, 1.0 / step) and rule.ratio is None
    rule.update(5, 0.2)
    assert rule.ratio is not None


def test_dvar_state_round_trip_makes_the_same_decision_at_the_same_step():
    rng = np.random.default_rng(3)
    curve = (0.03 + 0.02 * np.exp(-np.arange(300) / 30) + rng.normal(0, 2e-4, 300)).tolist()
    whole = DVAR(window=20, threshold=0.1)
    stop = run_rule(whole, curve, every=5)
    assert stop is not None
    first = DVAR(window=20, threshold=0.1)
    cut = 37
    for i in range(cut):
        first.update((i + 1) * 5, curve[i])
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = DVAR(window=20, threshold=0.1)
    resumed.load_state_dict(saved)
    assert resumed.update(cut * 5, curve[cut - 1]) is False  # the checkpoint's own step again: ignored
    again = next((i + 1) * 5 for i in range(cut, len(curve)) if resumed.update((i + 1) * 5, curve[i]))
    assert again == stop and resumed.state_dict() == whole.state_dict()
    other = DVAR(window=10, threshold=0.1)
    with pytest.raises(ValueError, match="other settings"):
        other.load_state_dict(saved)


def pause_then_learn(seed=6, n=80, drift_until=40):
    """Evaluations (every 10 steps): the loss settles early (a pause) while the weights still drift in one direction
    until evaluation ``drift_until``, then only jitter around where they arrived."""
    rng = np.random.default_rng(seed)
    loss = 0.02 + 0.02 * np.exp(-np.arange(n) / 3) + rng.normal(0, 1e-5, n)
    pos = np.zeros(8)
    weights = []
    for i in range(n):
        centre = np.full(8, 0.1 * min(i, drift_until))
        pos = centre + rng.normal(0, 0.01, 8) if i >= drift_until else pos + 0.1 + rng.normal(0, 0.01, 8)
        weights.append(torch.tensor(pos, dtype=torch.float32).view(2, 4))
    return loss.tolist(), weights


def test_dvar_direction_check_waits_for_the_weights_to_stop_heading_somewhere():
    loss, weights = pause_then_learn()
    plain = DVAR(window=3, threshold=0.15)
    gated = DVAR(window=3, threshold=0.15, direction_threshold=0.5)
    stop_plain = next(10 * i for i, v in enumerate(loss) if plain.update(10 * i, v))
    stop_gated = next((10 * i for i, (v, w) in enumerate(zip(loss, weights)) if gated.update(10 * i, v, w)), None)
    assert stop_plain <= 150  # the loss alone: stops during the pause
    # with the check: only once the last 3 moves are uncorrelated jitter (the drift ends at evaluation 40)
    assert stop_gated is not None and 410 <= stop_gated <= 500, stop_gated
    assert gated.persistence < 0.5 and gated.ratio < 0.15


def test_dvar_direction_of_a_steady_drift_is_one_and_of_jitter_near_zero():
    drift = DVAR(window=3, threshold=0.5, direction_threshold=0.5)
    for i in range(6):
        drift.update(i, 1.0 / (i + 1), torch.tensor([[float(i), 2.0 * i]]))
    assert drift.persistence == pytest.approx(1.0) and drift.stopped_at is None
    rng = np.random.default_rng(0)
    jitter = DVAR(window=200, threshold=0.99, direction_threshold=0.5)
    for i in range(203):
        jitter.update(i, float(rng.normal()), torch.tensor(rng.normal(size=(4, 8)), dtype=torch.float32))
    # independent positions: consecutive moves share one point, so their cosine averages -0.5
    assert jitter.persistence == pytest.approx(-0.5, abs=0.1)


def test_dvar_direction_state_round_trip_and_bad_input():
    loss, weights = pause_then_learn()
    whole = DVAR(3, 0.15, direction_threshold=0.5)
    stop = next(10 * i for i, (v, w) in enumerate(zip(loss, weights)) if whole.update(10 * i, v, w))
    part = DVAR(3, 0.15, direction_threshold=0.5)
    for i in range(30):
        part.update(10 * i, loss[i], weights[i])
    resumed = DVAR(3, 0.15, direction_threshold=0.5)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    again = next(10 * i for i in range(30, len(loss)) if resumed.update(10 * i, loss[i], weights[i]))
    assert again == stop and resumed.state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="needs the trained weights"):
        DVAR(3, 0.15, direction_threshold=0.5).update(1, 0.1)
    rule = DVAR(3, 0.15, direction_threshold=0.5)
    rule.update(1, 0.1, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="changed size"):
        rule.update(2, 0.1, torch.zeros(3, 4))
    # SDXL's two tables count as one set of weights
    sdxl = DVAR(2, 0.15, direction_threshold=0.5)
    for i in range(4):
        sdxl.update(i, 1.0 / (i + 1), {"clip_l": torch.full((1, 3), float(i)), "clip_g": torch.full((1, 5), 2.0 * i)})
    assert sdxl.persistence == pytest.approx(1.0)


@pytest.mark.parametrize("window, threshold", [(1, 0.1), (5, 0.0), (5, 1.0)])
def test_dvar_rejects_bad_settings(window, threshold):
    with pytest.raises(ValueError):
        DVAR(window, threshold)


def test_rules_refuse_non_finite_values():
    with pytest.raises(ValueError, match="finite"):
        DVAR(5, 0.1).update(1, math.nan)
    with pytest.raises(ValueError, match="finite"):
        Patience(3).update(1, math.inf)


# ---------------------------------------------------------------------------------------------------------------
# Patience and the best step


def test_patience_counts_evaluations_without_improvement():
    rule = Patience(patience=3, mode="min", min_delta=0.01)
    values = [1.0, 0.9, 0.895, 0.899, 0.85, 0.849, 0.845, 0.86]
    decisions = [rule.update(10 * (i + 1), v) for i, v in enumerate(values)]
    # 0.895 and 0.899 do not beat 0.9 by 0.01; 0.85 does; then 0.849, 0.845, 0.86 are three without improvement
    assert decisions == [False] * 7 + [True]
    assert rule.stopped_at == 80 and rule.best_step == 50 and rule.best == 0.85


def test_patience_max_mode_and_round_trip():
    values = [0.1, 0.3, 0.5, 0.45, 0.6, 0.55, 0.58, 0.59, 0.2]
    whole = Patience(patience=3, mode="max")
    stop = run_rule(whole, values)
    assert stop == 8 and whole.best_step == 5
    part = Patience(patience=3, mode="max")
    run_rule(part, values[:6])
    resumed = Patience(patience=3, mode="max")
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert [resumed.update(i + 1, values[i]) for i in range(6, 9)] == [False, True, True]
    whole.update(9, values[8])  # a stopped rule stays stopped
    assert resumed.state_dict() == whole.state_dict() and whole.stopped_at == 8
    with pytest.raises(ValueError, match="other settings"):
        Patience(patience=4, mode="max").load_state_dict(part.state_dict())


def test_best_step_keeps_the_earliest_best_and_round_trips():
    best = BestStep("eval_loss", "min")
    flags = [best.update(s, v) for s, v in [(25, 0.5), (50, 0.3), (75, 0.3), (100, 0.31)]]
    assert flags == [True, True, False, False] and best.best_step == 50
    assert "step 50" in best.describe()
    copy = BestStep("eval_loss", "min")
    copy.load_state_dict(json.loads(json.dumps(best.state_dict())))
    assert copy.update(100, 0.1) is False  # already seen
    assert copy.update(125, 0.1) is True and copy.best_step == 125
    with pytest.raises(ValueError):
        BestStep("clip_i", "max").load_state_dict(best.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Norms and the plot


def test_vocabulary_norm_statistics():
    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [6.0, 8.0]])  # norms 5, 1, 2, 10
    v = VocabularyNorms.of(weight)
    assert (v.mean, v.min, v.max, v.count) == (4.5, 1.0, 10.0, 4)
    assert v.std == pytest.approx(float(np.std([5, 1, 2, 10], ddof=1)))
    metrics, outside = norm_report(torch.tensor([[0.0, 4.0], [30.0, 40.0], [0.1, 0.0]]), v)
    assert metrics["norm/0"] == 4.0 and metrics["norm/1"] == 50.0
    assert metrics["norm_z/1"] == pytest.approx((50 - 4.5) / v.std)
    assert len(outside) == 2 and "vector 1" in outside[0] and "above" in outside[0] and "below" in outside[1]
    _, outside = norm_report(torch.tensor([[0.0, 30.0], [0.0, 50.0]]), v, factor=4.0)  # warn above 40 only
    assert len(outside) == 1 and "vector 1" in outside[0] and "4 x the largest" in outside[0]


def test_norm_watch_warns_once_per_vector_and_round_trips():
    v = VocabularyNorms.of(torch.eye(3))  # every norm 1: range [1, 1]
    watch = NormWatch(v)
    _, first = watch.check(10, torch.tensor([[1.0, 0, 0], [2.0, 0, 0]]))
    assert len(first) == 1 and first[0].startswith("step 10: vector 1")
    _, again = watch.check(20, torch.tensor([[1.0, 0, 0], [3.0, 0, 0]]))
    assert again == []
    resumed = NormWatch(v)
    resumed.load_state_dict(json.loads(json.dumps(watch.state_dict())))
    assert resumed.check(30, torch.tensor([[1.0, 0, 0], [3.0, 0, 0]]))[1] == []


def test_norm_watch_per_text_encoder():
    vocab = {"clip_l": VocabularyNorms.of(torch.eye(3)), "clip_g": VocabularyNorms.of(2 * torch.eye(5))}
    watch = NormWatch(vocab)
    metrics, warnings = watch.check(5, {"clip_l": torch.tensor([[1.0, 0, 0]]), "clip_g": torch.tensor([[3.0, 0, 0, 0, 0]])})
    assert metrics["norm_clip_l/0"] == 1.0 and metrics["norm_clip_g/0"] == 3.0
    assert len(warnings) == 1 and "clip_g vector 0" in warnings[0] and watch.max_norm == 2.0


def test_plot_marks_the_stop_and_best_steps(tmp_path):
    from PIL import Image

    curve = [(s, 0.02 + 0.02 * math.exp(-s / 40)) for s in range(0, 401, 25)]
    path = plot_curves(tmp_path / "curves.png", {"eval loss": {"overall": curve}, "norm": {"vector 0": curve}},
                       {"early stop": 200, "best": 325}, title="test", width=600)
    img = Image.open(path).convert("RGB")
    assert img.size[0] == 600 and img.size[1] > 400
    arr = np.asarray(img)
    red = np.argwhere((arr[:, :, 0] == 200) & (arr[:, :, 1] == 0) & (arr[:, :, 2] == 0))
    green = np.argwhere((arr[:, :, 0] == 0) & (arr[:, :, 1] == 140) & (arr[:, :, 2] == 0))
    assert red.size and green.size
    # the stop and best lines at steps 200 and 325 of an axis from 0 to 400 (+2% margin)
    left, plot_w = 70, 600 - 70 - 160
    assert abs(np.median(red[:, 1]) - (left + plot_w * 200 / 408)) < 3
    assert abs(np.median(green[:, 1]) - (left + plot_w * 325 / 408)) < 3


# ---------------------------------------------------------------------------------------------------------------
# The Evaluator: what the loop calls


def settling_model(scale):
    """A model whose error shrinks as ``scale[0]`` goes to zero (like a concept being learned)."""
    def predict(noisy, t, batch):
        return torch.zeros_like(noisy) + scale[0]
    return predict


def evaluator_run(cfg, steps, start=None, stop_at_cut=None):
    from utils.evaluator import Evaluator

    latents, prompts = pictures(8)
    es = build_eval_set(latents, prompts, 1000, size=cfg.eval_set_size, seed=0)
    ev = Evaluator(cfg, es, Scheduler(), vocab=VocabularyNorms.of(torch.eye(4)))
    if start is not None:
        ev.load_state_dict(json.loads(json.dumps(start)))
    scale = [0.0]
    results = []
    for step in steps:
        if not ev.due(step):
            continue
        scale[0] = 1.0 + 2.0 * math.exp(-step / 60)
        # two "processes", each its share, summed as an all-reduce would
        per_sample = ev.losses(settling_model(scale), 0, 2) + ev.losses(settling_model(scale), 1, 2)
        vectors = torch.full((2, 4), step / 100.0)
        results.append(ev.record(step, per_sample, vectors=vectors))
        if results[-1].stop or step == stop_at_cut:
            break
    return ev, results


def test_evaluator_records_decides_and_resumes_identically(tmp_path):
    from utils.evaluator import EvalConfig

    cfg = EvalConfig(eval_every=10, eval_set_size=8, early_stopping="dvar", dvar_window=4, dvar_threshold=0.15,
                     dvar_direction=None)
    ev, results = evaluator_run(cfg, range(1, 2001))
    assert [r.step for r in results] == list(range(10, results[-1].step + 1, 10))
    stop = ev.stopped_at
    assert results[-1].stop and stop == results[-1].step
    # the decision is DVAR's on the overall evaluation loss, after a full window
    assert stop == run_rule(DVAR(4, 0.15), [h["eval_loss"] for h in ev.history], every=10) and stop >= 50
    first = results[0].metrics
    assert set(first) >= {"eval_loss", "eval_loss_t0-249", "eval_loss_t750-999", "norm/0", "norm_z/1"}
    # the loss falls every evaluation here, so every evaluation is a new best
    assert all(r.new_best for r in results) and ev.best.best_step == stop
    assert any("vector 0" in w for r in results for w in r.warnings)  # norm left the vocabulary's range [1, 1]
    summary = ev.summary()
    assert summary["stopped_at"] == stop and summary["best_step"] == stop and "settled" in summary["stop_reason"]

    # interrupted at an evaluation before the stop and resumed from the saved state: same stop, same state
    cut = stop - 40
    part, _ = evaluator_run(cfg, range(1, 2001), stop_at_cut=cut)
    saved = part.state_dict()
    resumed, rest = evaluator_run(cfg, range(cut, 2001), start=saved)
    assert rest[0].step == cut and not rest[0].new_best and not rest[0].stop  # already recorded: no decision
    assert resumed.stopped_at == stop and resumed.state_dict() == ev.state_dict()

    png = ev.plot(tmp_path / "evaluation.png", title="test")
    assert png.is_file() and png.stat().st_size > 1000


def test_evaluator_refuses_another_evaluation_set():
    from utils.evaluator import EvalConfig, Evaluator

    cfg = EvalConfig(eval_every=10, eval_set_size=8, early_stopping="dvar")
    ev, _ = evaluator_run(cfg, range(1, 50))
    latents, prompts = pictures(8)
    other = Evaluator(cfg, build_eval_set(latents, prompts, 1000, size=8, seed=1), Scheduler())
    with pytest.raises(ValueError, match="evaluation set differs"):
        other.load_state_dict(ev.state_dict())


def test_evaluator_patience_on_a_named_metric_and_unknown_metrics():
    from utils.evaluator import EvalConfig, Evaluator

    latents, prompts = pictures(4)
    es = build_eval_set(latents, prompts, 1000, size=4, seed=0)
    cfg = EvalConfig(eval_every=1, eval_set_size=4, early_stopping="patience", patience=2, patience_metric="clip_i",
                     select_best="clip_i")
    ev = Evaluator(cfg, es, Scheduler())
    losses = torch.ones(4)
    decisions = [ev.record(s, losses, extra={"clip_i": v}).stop for s, v in enumerate([0.5, 0.7, 0.69, 0.6], 1)]
    assert decisions == [False, False, False, True] and ev.best.best_step == 2  # clip_i: higher is better
    bad = Evaluator(EvalConfig(eval_every=1, early_stopping="patience", patience_metric="dino"), es, Scheduler())
    with pytest.raises(ValueError, match="'dino' is not measured"):
        bad.record(1, losses)


# ---------------------------------------------------------------------------------------------------------------
# bench/bench_learning.py's early-stop summary


def _bench_learning():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_learning.py"
    spec = importlib.util.spec_from_file_location("bench_learning_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_stop_summary_checks_the_issue_targets(tmp_path):
    bench = _bench_learning()
    acc = {25: 0.0, 50: 0.5, 75: 0.9, 100: 1.0, 125: 1.0, 150: 1.0, 175: 0.6}
    rows = [{"step": s, "accuracy": a} for s, a in acc.items()]
    history = [{"step": s, "eval_loss": v} for s, v in
               [(0, 0.05), (25, 0.04), (50, 0.03), (75, 0.026), (100, 0.0252), (125, 0.0251), (150, 0.0253),
                (175, 0.02)]]
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"stopped_at": 150, "history": history}))
    out = bench.stop_summary(path, "eval_loss", rows)
    # the pick is the lowest loss up to the stop (175 is after it), first 0.8 at 75, the stop within 2 x 75
    assert (out["first_0.8"], out["stop"], out["stop_acc"], out["best"], out["best_acc"]) == (75, 150, 1.0, 125, 1.0)
    assert out["stop_ok"] and out["best_ok"] and out["best_seen"] == 1.0
    path.write_text(json.dumps({"stopped_at": 175, "history": history}))
    late = bench.stop_summary(path, "eval_loss", rows)
    assert not late["stop_ok"] and late["best"] == 175 and not late["best_ok"]  # 0.6 < 0.9 x 1.0
