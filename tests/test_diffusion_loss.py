"""utils/diffusion_loss.py pinned to known values: targets and weightings computed by hand from the scheduler's alphas.

The training loop's resume and DDP tests compare a run with another run of the same code, so a wrong target or weight
passes them; these tests compare with numbers worked out here, independently of the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from utils.diffusion_loss import (
    denoising_loss,
    draw_noise_and_timesteps,
    min_snr_weights,
    sample_seed,
    training_target,
)

GAMMA = 5.0


@pytest.fixture(scope="module")
def scheduler():
    # Stable Diffusion's training schedule (the tiny models use the same one).
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _alpha_bar(t: int) -> float:
    """SD's scaled-linear schedule worked out in float64, independently of diffusers."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return float(np.prod(1.0 - betas[: t + 1]))


def test_the_scheduler_alphas_are_sd_ones(scheduler):
    for t in (0, 1, 499, 999):
        assert float(scheduler.alphas_cumprod[t]) == pytest.approx(_alpha_bar(t), rel=1e-5)


def test_epsilon_target_is_the_noise(scheduler):
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    target = training_target(scheduler, latents, noise, torch.tensor([3, 900]), "epsilon")
    assert torch.equal(target, noise)


def test_v_prediction_target_from_the_alphas(scheduler):
    """v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x0 (Salimans & Ho), per sample's own timestep."""
    latents = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]])
    noise = torch.tensor([[[[0.25, 1.0]]], [[[-1.0, 2.0]]]])
    timesteps = torch.tensor([0, 999])
    target = training_target(scheduler, latents, noise, timesteps, "v_prediction")
    for i, t in enumerate(timesteps.tolist()):
        a = _alpha_bar(t)
        expected = math.sqrt(a) * noise[i].double() - math.sqrt(1 - a) * latents[i].double()
        torch.testing.assert_close(target[i].double(), expected, rtol=1e-5, atol=1e-6)
    # not the noise, not the latents: at t=0 v is mostly noise, at t=999 mostly -x0 (0.068 * -1 - 0.998 * 0.5)
    assert not torch.allclose(target, noise) and not torch.allclose(target, -latents)
    assert target[1, 0, 0, 0].item() == pytest.approx(-0.567, abs=1e-3)


def test_unknown_prediction_type_is_refused(scheduler):
    with pytest.raises(ValueError, match="sample"):
        training_target(scheduler, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1]), "sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_by_hand(scheduler, prediction_type):
    """Min-SNR-gamma (Hang et al.): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.

    Timesteps on both sides of gamma: SNR(10) ~ 100 > 5, SNR(400) ~ 0.3 and SNR(999) ~ 0.005 < 5."""
    timesteps = torch.tensor([0, 10, 400, 999])
    got = min_snr_weights(scheduler, timesteps, GAMMA, prediction_type)
    expected = []
    for t in timesteps.tolist():
        snr = _alpha_bar(t) / (1 - _alpha_bar(t))
        expected.append(min(snr, GAMMA) / (snr + 1 if prediction_type == "v_prediction" else snr))
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=0)
    snr999 = _alpha_bar(999) / (1 - _alpha_bar(999))
    if prediction_type == "epsilon":
        assert got[2].item() == pytest.approx(1.0) and got[3].item() == pytest.approx(1.0)  # SNR < gamma: unweighted
        assert got[0].item() < 0.01
    else:
        assert got[3].item() == pytest.approx(snr999 / (snr999 + 1), rel=1e-4)


def test_denoising_loss_per_sample_mean_then_batch_mean():
    pred = torch.zeros(2, 2, 1, 2)
    target = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]], [[[3.0, 4.0]], [[0.0, 0.0]]]])
    # sample 0: (1 + 4 + 0 + 1) / 4 = 1.5; sample 1: (9 + 16) / 4 = 6.25
    assert denoising_loss(pred, target).item() == pytest.approx((1.5 + 6.25) / 2)
    # per-pixel weights [B, 1, H, W], broadcast over channels
    w = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 2.0]]]])
    # sample 0: (1 + 0 + 0 + 0) / 4 = 0.25; sample 1: (9 * 0.5 + 16 * 2) / 4 = 9.125
    assert denoising_loss(pred, target, loss_weights=w).item() == pytest.approx((0.25 + 9.125) / 2)
    # per-sample weights multiply each sample's mean
    sw = torch.tensor([2.0, 0.5])
    assert denoising_loss(pred, target, sample_weights=sw).item() == pytest.approx((1.5 * 2 + 6.25 * 0.5) / 2)
    both = denoising_loss(pred, target, loss_weights=w, sample_weights=sw)
    assert both.item() == pytest.approx((0.25 * 2 + 9.125 * 0.5) / 2)


def test_denoising_loss_is_computed_in_float32():
    pred = torch.full((1, 1, 1, 1), 300.0, dtype=torch.float16)
    target = torch.zeros(1, 1, 1, 1, dtype=torch.float16)
    loss = denoising_loss(pred, target)  # 300**2 = 90000 overflows float16 (max 65504)
    assert loss.dtype == torch.float32 and loss.item() == 90000.0
    # weights in another dtype do not change the loss's dtype
    w64 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    assert denoising_loss(pred, target, loss_weights=w64).dtype == torch.float32


def test_sample_seed_known_values():
    """Pinned: changing the derivation silently changes every run's noise (and breaks resuming old checkpoints)."""
    assert sample_seed(0, 0, 0) == 7896617691693857887
    assert sample_seed(0, 0, 1) == 4324601099084218337
    assert sample_seed(0, 1, 0) == 2918264622725855778
    assert sample_seed(1, 0, 0) == 3717377837946358015
    assert sample_seed(7, 3, 5) == 8633791053928439926


def test_sample_seed_depends_on_seed_epoch_and_position():
    seeds = {sample_seed(s, e, p) for s in range(3) for e in range(3) for p in range(3)}
    assert len(seeds) == 27
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1) and sample_seed(1, 2, 0) != sample_seed(2, 1, 0)
    assert all(0 <= s < 2 ** 63 for s in seeds)  # torch.Generator.manual_seed takes it as is
    assert sample_seed(5, 4, 3) == sample_seed(5, 4, 3)


def test_noise_and_timesteps_come_from_each_samples_own_generator():
    """Sample k's timestep is the first draw of Generator(seed_k), its noise the next: independent of batching."""
    seeds = [sample_seed(0, 0, p) for p in range(3)]
    noise, timesteps = draw_noise_and_timesteps(seeds, (4, 2, 2), 1000, "cpu", torch.float32)
    assert noise.shape == (3, 4, 2, 2) and timesteps.dtype == torch.long and timesteps.shape == (3,)
    for k, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        assert timesteps[k].item() == int(torch.randint(0, 1000, (1,), generator=g))
        assert torch.equal(noise[k], torch.randn(4, 2, 2, generator=g))
    # one sample at a time gives the same numbers as the batch
    for k, s in enumerate(seeds):
        n1, t1 = draw_noise_and_timesteps([s], (4, 2, 2), 1000, "cpu", torch.float32)
        assert torch.equal(n1[0], noise[k]) and t1[0] == timesteps[k]
    assert len(set(timesteps.tolist())) == 3


def test_noise_and_timesteps_land_on_the_requested_device():
    # drawn on the CPU (the same numbers on any device), then moved: "meta" stands in for a GPU here
    noise, timesteps = draw_noise_and_timesteps([1, 2], (2, 2), 1000, "meta", torch.float32)
    assert noise.device.type == "meta" and timesteps.device.type == "meta"


def test_timesteps_stay_below_num_train_timesteps_and_dtype_follows():
    seeds = [sample_seed(1, 0, p) for p in range(64)]
    noise, timesteps = draw_noise_and_timesteps(seeds, (1,), 10, "cpu", torch.float16)
    assert noise.dtype == torch.float16 and int(timesteps.max()) <= 9 and int(timesteps.min()) >= 0
    assert set(timesteps.tolist()) == set(range(10))
