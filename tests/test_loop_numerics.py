"""The training loop's numbers against values worked out here, not against another run of the same code.

A resume or DDP test compares the loop with itself, so a wrong target, weight, seed, rate or accumulation passes it.
Here: every logged loss recomputed by hand (learning rate 0 keeps the vectors fixed, so each step's loss is a plain
function of the data), the rate the optimizer really applies at each step, resuming mid-epoch with gradient
accumulation, weights that stop being finite while the loss is still finite, and SD-2's conditioning in training
against the one inference builds for the same prompt.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from utils.diffusion_loss import sample_seed
from utils.embeddings import Embedding
from utils.trainers.textual_inversion import TextualInversion, tokenize_with_placeholder
from utils.training import LoopConfig, OptimConfig, Outputs, TrainingDiverged, list_checkpoints, make_accelerator, train

NAME = "myemb"
PROMPTS = ["a photo of myemb", "myemb on a table", "a red myemb, small", "the myemb", "myemb", "two myemb",
           "a myemb at night", "an old myemb"]


class Source:
    """``n`` synthetic latents on one process; epoch e visits them in a permutation seeded by e.

    Positions are the samples' places in the epoch's order, as the real loader gives them; every image has its own
    prompt and (optionally) its own per-pixel loss weights, so a mix-up of samples changes the numbers."""

    def __init__(self, n: int = 4, batch: int = 1, weights: bool = False):
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(n, 4, 8, 8, generator=g)
        self.weights = torch.rand(n, 1, 8, 8, generator=g) * 2 if weights else None
        self.n, self.batch = n, batch
        self.micro_batches_per_epoch = n // batch
        self.requests: list[tuple[int, int]] = []

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()

    def iter_epoch(self, epoch: int, skip: int):
        self.requests.append((epoch, skip))
        perm = self.order(epoch)
        for j in range(skip, self.micro_batches_per_epoch):
            positions = list(range(j * self.batch, (j + 1) * self.batch))
            idx = [perm[p] for p in positions]
            batch = {"latents": self.latents[idx].clone(), "prompts": [PROMPTS[i] for i in idx],
                     "positions": positions}
            if self.weights is not None:
                batch["loss_weights"] = self.weights[idx].clone()
            yield batch


def _pipeline(model_dir: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model_dir)


def _trainable(pipe) -> TextualInversion:
    init = pipe.text_encoder.get_input_embeddings().weight[[320, 1125]].detach().clone()
    return TextualInversion.build(pipe, Embedding(NAME, init))


def _train(model_dir: Path, out: Path, steps: int, source: Source, *, lr: str = "0.01", batch: int = 1, accum: int = 1,
           seed: int = 0, prediction_type: str = "epsilon", snr_gamma: float | None = None, ckpt: int = 0,
           resume: str | None = None, **optim):
    from diffusers import DDPMScheduler

    pipe = _pipeline(model_dir)
    ti = _trainable(pipe)
    acc = make_accelerator(out, "no", accum, "none", seed)
    cfg = LoopConfig(output_dir=out, max_train_steps=steps, train_batch_size=batch, gradient_accumulation_steps=accum,
                     seed=seed, prediction_type=prediction_type, snr_gamma=snr_gamma, checkpointing_steps=ckpt,
                     save_every=0, preview_every=0, resume_from_checkpoint=resume,
                     optim=OptimConfig(learning_rate=lr, **optim))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    summary = train(acc, ti, source, sched, cfg, Outputs(save=lambda s: [], final=lambda s, o: []))
    return summary, ti, pipe, sched


def _log(out: Path) -> list[dict]:
    with open(out / "textual_inversion_loss.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------
# Every logged loss, by hand


def _loss_by_hand(ti, tokenizer, alphas_cumprod, source: Source, epoch: int, positions, seed: int,
                  prediction_type: str, snr_gamma: float | None) -> float:
    """Mean over ``positions`` of each sample's weighted MSE, one sample at a time, in float64 where it is ours."""
    losses = []
    for p in positions:
        i = source.order(epoch)[p]
        x0 = source.latents[i]
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, p))  # the sample's own noise (test_diffusion_loss)
        t = int(torch.randint(0, 1000, (1,), generator=g))
        noise = torch.randn(x0.shape, generator=g)
        a = float(alphas_cumprod[t])
        noisy = (a ** 0.5 * x0.double() + (1 - a) ** 0.5 * noise.double()).float()
        target = noise.double() if prediction_type == "epsilon" else a ** 0.5 * noise.double() - (1 - a) ** 0.5 * x0
        ids = tokenize_with_placeholder(tokenizer, [PROMPTS[i]], NAME, 2)
        with torch.no_grad():
            pred = ti.model(noisy[None], torch.tensor([t]), [ids])[0].double()
        err = (pred - target) ** 2
        if source.weights is not None:
            err = err * source.weights[i].double()
        loss = float(err.mean())
        if snr_gamma:
            snr = a / (1 - a)
            loss *= min(snr, snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        losses.append(loss)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("family, prediction_type, snr_gamma, weights", [
    ("tiny_sd1", "epsilon", None, False),
    ("tiny_sd1", "epsilon", 5.0, True),
    ("tiny_sd2", "v_prediction", 5.0, True),  # SD-2: v-prediction, OpenCLIP padding
])
def test_every_logged_loss_matches_the_loss_by_hand(family, prediction_type, snr_gamma, weights, request, tmp_path):
    """Batch 1 x accumulation 2 over 2 epochs: each logged loss is the mean of its two samples' losses (so divided by
    the accumulation), each sample with the noise and timestep of (seed, epoch, position), the target of the
    prediction type, its per-pixel weights and its min-SNR weight (min, not max)."""
    model_dir = request.getfixturevalue(family)
    source = Source(n=4, weights=weights)
    seed, accum, steps = 7, 2, 4
    _, ti, pipe, sched = _train(model_dir, tmp_path / "o", steps, source, lr="0", accum=accum, seed=seed,
                                prediction_type=prediction_type, snr_gamma=snr_gamma)
    init = pipe.text_encoder.get_input_embeddings().weight[[320, 1125]]
    assert torch.equal(ti.state_dict()["vectors.0"], init)  # learning rate 0: the vectors never moved
    rows = _log(tmp_path / "o")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and [int(r["epoch"]) for r in rows] == [0, 0, 1, 1]
    steps_per_epoch = source.micro_batches_per_epoch // accum
    for k, row in enumerate(rows):
        epoch, within = divmod(k, steps_per_epoch)
        positions = range(within * accum, (within + 1) * accum)
        expected = _loss_by_hand(ti, pipe.tokenizer, sched.alphas_cumprod, source, epoch, positions, seed,
                                 prediction_type, snr_gamma)
        assert float(row["loss"]) == pytest.approx(expected, rel=2e-5, abs=2e-7), (k, row)


# ---------------------------------------------------------------------------------------------------------------
# The learning rate the optimizer applies


@pytest.mark.parametrize("lr, options, expected", [
    ("0.01", {}, [0.01] * 6),
    ("0.01", {"lr_scheduler": "linear", "lr_warmup_steps": 2}, [0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025]),
    ("0.01:2, 0.005:4, 0.001", {}, [0.01, 0.01, 0.005, 0.005, 0.001, 0.001]),
    ("0.01", {"scale_lr": True}, [0.02] * 6),  # x global batch (1 x 2 accumulation)
    # two hard restarts in 6 steps: each cycle of 3 steps goes 1, 0.75, 0.25 of the rate
    ("0.01", {"lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 2}, [0.01, 0.0075, 0.0025] * 2),
])
def test_the_optimizer_applies_each_steps_rate(tiny_sd1, tmp_path, lr, options, expected):
    """Read where it matters: the rate in the optimizer's param group when its step() runs (accumulation 2, so
    two micro-batches per step), then the rate the CSV says was used."""
    applied = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    try:
        _train(tiny_sd1, tmp_path / "o", 6, Source(n=8), lr=lr, accum=2, **options)
    finally:
        handle.remove()
    assert applied == pytest.approx(expected, abs=1e-12)
    assert [r["learn_rate"] for r in _log(tmp_path / "o")] == [f"{x:g}" for x in expected]


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_gradient_clipping_clips_what_the_optimizer_sees(tiny_sd1, tmp_path, mode):
    """A1111's gradient clipping (--max_grad_norm with --clip_grad_mode): the gradient the optimizer's step() reads
    is the raw one scaled to the norm limit ("norm") or clamped element-wise ("value"). The first step's raw
    gradient comes from the same run without clipping (same seed and data, so the same first gradient)."""
    grads: dict[str, list[torch.Tensor]] = {"raw": [], "clipped": []}
    for label, optim in (("raw", {}), ("clipped", {"max_grad_norm": 1e-4, "clip_grad_mode": mode})):
        handle = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs, label=label: grads[label].append(opt.param_groups[0]["params"][0].grad.clone()))
        try:
            _train(tiny_sd1, tmp_path / label, 3, Source(n=4), **optim)
        finally:
            handle.remove()
    raw, clipped = grads["raw"][0], grads["clipped"][0]
    assert len(grads["clipped"]) == 3
    if mode == "norm":
        assert raw.norm() > 1e-3  # the limit bites
        torch.testing.assert_close(clipped, raw * (1e-4 / raw.norm()), rtol=1e-4, atol=0)
        assert all(float(g.norm()) <= 1e-4 * (1 + 1e-4) for g in grads["clipped"])
    else:
        assert raw.abs().max() > 1e-3
        assert torch.equal(clipped, raw.clamp(-1e-4, 1e-4))
        assert all(float(g.abs().max()) <= 1e-4 for g in grads["clipped"])


# ---------------------------------------------------------------------------------------------------------------
# Resume and the divergence guard


def test_resume_mid_epoch_with_accumulation_is_bit_identical(tiny_sd1, tmp_path):
    """4 steps per epoch (8 micro-batches, accumulation 2): a checkpoint at step 3 sits mid-epoch, and the resumed
    run must skip the 6 micro-batches already used, not 3."""
    kw = dict(accum=2, seed=3, ckpt=3)
    _, full, _, _ = _train(tiny_sd1, tmp_path / "full", 6, Source(n=8), **kw)
    _train(tiny_sd1, tmp_path / "cut", 3, Source(n=8), **kw)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3]
    source = Source(n=8)
    _, resumed, _, _ = _train(tiny_sd1, tmp_path / "cut", 6, source, resume="latest", **kw)
    assert source.requests[0] == (0, 6)  # epoch 0, after micro-batch 6
    assert torch.equal(resumed.state_dict()["vectors.0"], full.state_dict()["vectors.0"])
    assert _log(tmp_path / "cut") == _log(tmp_path / "full")


def test_weights_turning_non_finite_with_a_finite_loss_stop_the_run(tiny_sd1, tmp_path):
    """The third update leaves an inf in the vectors while that step's loss was finite: the run stops at step 3,
    before logging, checkpointing or saving it."""
    updates = []

    def poison(opt, args, kwargs):
        updates.append(1)
        if len(updates) == 3:
            with torch.no_grad():
                opt.param_groups[0]["params"][0][0, 0] = float("inf")

    handle = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(TrainingDiverged, match="diverged at step 3"):
            _train(tiny_sd1, tmp_path / "o", 8, Source(n=8), ckpt=1)
    finally:
        handle.remove()
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [1, 2]
    assert [r["step"] for r in _log(tmp_path / "o")] == ["1", "2"]


# ---------------------------------------------------------------------------------------------------------------
# Conditioning: training's token splice against inference's prompt encoder


@pytest.mark.parametrize("family", ["tiny_sd2", "tiny_sd1", "tiny_sdxl"])
def test_training_conditions_like_inference(family, request):
    """The same prompt and vectors give bit-identical text-encoder output in training (tokenize_with_placeholder +
    the model's encode) and in inference (the prompt encoder, the embedding registered by name). SD-2 pads with
    id 0 after the end token, so only ids < 0 may be taken as placeholders, never 0. SDXL: both encoders'
    penultimate states side by side, and the second one's pooled output."""
    from utils.prompts import EmbeddingDatabase, PromptEncoder

    pipe = _pipeline(request.getfixturevalue(family))
    g = torch.Generator().manual_seed(5)
    if family == "tiny_sdxl":
        widths = {"clip_l": pipe.text_encoder.config.hidden_size, "clip_g": pipe.text_encoder_2.config.hidden_size}
        vectors = {k: torch.randn(3, w, generator=g) for k, w in widths.items()}
        shifted = {k: v + 1 for k, v in vectors.items()}
        width = sum(widths.values())
    else:
        width = pipe.text_encoder.config.hidden_size
        vectors = torch.randn(3, width, generator=g)
        shifted = vectors + 1
    ti = TextualInversion.build(pipe, Embedding(NAME, vectors))
    prompt = f"a {NAME} photo, {NAME} style"
    ids = [tokenize_with_placeholder(tok, [prompt], NAME, 3) for tok in ti.tokenizers]
    assert all((i < 0).sum() == 6 for i in ids)
    if family == "tiny_sd2":
        assert pipe.tokenizer.pad_token_id == 0 and (ids[0] == 0).sum() > 50  # OpenCLIP padding
    with torch.no_grad():
        trained, pooled = ti.model.encode(ids)

    db = EmbeddingDatabase([])
    db.register(Embedding(NAME, vectors))
    encoder = PromptEncoder(pipe, db)
    encoder.refresh()
    with torch.no_grad():
        inferred = encoder.encode([prompt])
    assert list(encoder.used_embeddings) == [NAME]
    assert trained.shape == inferred.embeds.shape == (1, 77, width)
    assert torch.equal(trained, inferred.embeds)
    if family == "tiny_sdxl":
        assert pooled.shape == inferred.pooled.shape and torch.equal(pooled, inferred.pooled)
    else:
        assert pooled is None and inferred.pooled is None
    # and the vectors matter: other vectors give another conditioning
    ti2 = TextualInversion.build(pipe, Embedding(NAME, shifted))
    with torch.no_grad():
        assert not torch.allclose(ti2.model.encode(ids)[0], inferred.embeds)
