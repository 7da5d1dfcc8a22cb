"""The denoising loss, with noise and timesteps drawn per sample from (seed, epoch, position in the epoch).

Drawing them from the sample's place in the global order, rather than from a per-process RNG stream, makes the result
independent of the number of processes and of interruptions: 2 processes x batch 1 see exactly the noise that
1 process x batch 2 sees, and a resumed run sees what the uninterrupted run saw.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


def draw_noise_and_timesteps(seeds: list[int], latent_shape, num_train_timesteps: int, device, dtype):
    """One generator per sample, on the CPU (the same numbers on any device), moved to ``device`` afterwards."""
    noise, timesteps = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        timesteps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=g)))
        noise.append(torch.randn(tuple(latent_shape), generator=g))
    return (torch.stack(noise).to(device=device, dtype=dtype),
            torch.tensor(timesteps, dtype=torch.long, device=device))


def training_target(noise_scheduler, latents, noise, timesteps, prediction_type: str):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def min_snr_weights(noise_scheduler, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def denoising_loss(pred, target, loss_weights=None, sample_weights=None, reduction: str = "mean") -> torch.Tensor:
    """MSE per sample over C,H,W (optionally weighted per pixel), then mean over the batch (A1111/LDM's loss).
    ``reduction="none"``: the per-sample losses [B] (weighted), for a caller that reduces them itself."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if loss_weights is not None:
        err = err * loss_weights.to(err.dtype)
    per_sample = err.mean(dim=tuple(range(1, err.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise ValueError(f"unsupported reduction {reduction!r}")
    return per_sample.mean()
