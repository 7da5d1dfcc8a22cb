"""A deterministic evaluation of a denoising model: one fixed set of (latents, prompts, noise, timesteps), drawn once.

The training loss is dominated by the random picture, timestep and noise of each step: two steps' losses differ
mostly because they saw different draws. Evaluating the same fixed set at every evaluation removes that, so what is
left moves only because the trained weights moved (Voronov et al., "Is This Loss Informative?", NeurIPS 2023).

* :func:`build_eval_set` draws the set once, from its own generator (the training RNG is never touched): which
  pictures, their prompts, the noise, and timesteps stratified over the whole schedule so every part of it is
  represented however small the set is.
* :func:`evaluate` runs a model over it (or over this process's share of it) and returns one loss per sample;
  :func:`summarize` turns those into the overall loss and one loss per timestep band.

The stopping rules and the best-step choice live in utils/early_stopping.py; norms, image scores and the plot in
utils/eval_report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from utils.diffusion_loss import training_target

DEFAULT_BANDS = 4  # timestep bands reported beside the overall loss: [0, T/4), [T/4, T/2), ...


@dataclass
class EvalSet:
    """The fixed evaluation samples. Tensors are float32 on the CPU; ``to`` gives a copy on a device."""

    latents: torch.Tensor  # [N, C, H, W], scaled as the model sees them
    prompts: list[str]
    noise: torch.Tensor  # [N, C, H, W]
    timesteps: torch.Tensor  # [N] long
    num_train_timesteps: int
    picture_index: torch.Tensor  # [N]: which of the given pictures each sample uses
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-sample model inputs (SDXL time ids)
    loss_weights: torch.Tensor | None = None  # [N, C, H, W] per-pixel weights, as in training

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device, dtype: torch.dtype | None = None) -> "EvalSet":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else None)

        return EvalSet(move(self.latents), list(self.prompts), move(self.noise), self.timesteps.to(device),
                       self.num_train_timesteps, self.picture_index, {k: move(v) for k, v in self.extras.items()},
                       move(self.loss_weights))

    def fingerprint(self) -> list:
        """A small JSON-able summary that changes when any drawn number changes (kept in checkpoints: a resumed run
        evaluates the same set, or its curve and decisions would not continue the old ones). The latents' part has 6
        significant digits: a GPU's VAE may differ in the last bits from one launch to the next."""
        return [len(self), int(self.timesteps.sum()), round(float(self.noise.double().sum()), 6),
                float(f"{float(self.latents.double().sum()):.6g}")]


def stratified_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` timesteps in increasing order, one drawn uniformly inside each of ``n`` equal strata of
    [0, num_train_timesteps): an even cover of the schedule, never two in one stratum."""
    if n < 1:
        raise ValueError(f"an evaluation set needs at least one sample (got {n})")
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = ((torch.arange(n, dtype=torch.float64) + u) * num_train_timesteps / n).floor().long()
    return t.clamp(0, num_train_timesteps - 1)


def build_eval_set(latents: torch.Tensor, prompts: list[str], num_train_timesteps: int, size: int | None = None,
                   seed: int = 0, extras: dict[str, torch.Tensor] | None = None,
                   loss_weights: torch.Tensor | None = None) -> EvalSet:
    """Draw the evaluation set from ``latents`` [P, C, H, W] and their ``prompts`` (one per picture).

    ``size`` samples (default: one per picture). With more samples than pictures every picture is used equally often
    (``size // P`` or one more times), each time at a timestep from another part of the schedule; with fewer, a
    random subset of the pictures is used. Everything comes from one CPU generator seeded with ``seed``.
    """
    count = latents.shape[0]
    if count == 0 or len(prompts) != count:
        raise ValueError(f"need one prompt per picture (got {count} pictures, {len(prompts)} prompts)")
    size = count if size is None else int(size)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.cat([torch.randperm(count, generator=g) for _ in range(-(-size // count))])[:size]
    timesteps = stratified_timesteps(size, num_train_timesteps, g)
    # Repetition r of the pictures takes the r-th run of strata (in order), shuffled among the pictures: a picture
    # used k times is seen at k different parts of the schedule.
    for start in range(0, size, count):
        block = timesteps[start:start + count]
        timesteps[start:start + count] = block[torch.randperm(len(block), generator=g)]
    noise = torch.randn((size, *latents.shape[1:]), generator=g, dtype=torch.float32)
    pick = {k: v[order].detach().float().cpu() for k, v in (extras or {}).items()}
    weights = None if loss_weights is None else loss_weights[order].detach().float().cpu()
    return EvalSet(latents[order].detach().float().cpu(), [prompts[i] for i in order.tolist()], noise, timesteps,
                   int(num_train_timesteps), order, pick, weights)


Predict = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@torch.no_grad()
def evaluate(predict: Predict, eval_set: EvalSet, noise_scheduler, prediction_type: str = "epsilon",
             batch_size: int = 8, indices: list[int] | None = None) -> torch.Tensor:
    """Per-sample denoising loss (MSE over C, H, W; float32 on the CPU) for ``indices`` (default: all samples).

    ``predict(noisy_latents, timesteps, batch)`` is the model, where ``batch`` holds the samples' ``prompts`` and
    ``extras`` like a training batch. ``eval_set`` must already be on the model's device (``EvalSet.to``). Only
    this set's own numbers are used, so any RNG the caller relies on is left as it was.
    """
    idx = list(range(len(eval_set))) if indices is None else list(indices)
    out = []
    for start in range(0, len(idx), max(1, int(batch_size))):
        part = idx[start:start + batch_size]
        sel = torch.tensor(part, dtype=torch.long, device=eval_set.latents.device)
        latents, noise, t = eval_set.latents[sel], eval_set.noise[sel], eval_set.timesteps[sel]
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = training_target(noise_scheduler, latents, noise, t, prediction_type)
        batch = {"prompts": [eval_set.prompts[i] for i in part], **{k: v[sel] for k, v in eval_set.extras.items()}}
        err = (predict(noisy, t, batch).float() - target.float()) ** 2
        if eval_set.loss_weights is not None:
            err = err * eval_set.loss_weights[sel].to(err.dtype)
        out.append(err.mean(dim=tuple(range(1, err.ndim))).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def join_sets(parts: list[tuple[EvalSet, list[int]]]) -> EvalSet:
    """The chosen samples of several sets (the same latent shape and schedule) as one set, in the order given, so
    that one model evaluates them together. A set without loss weights gets weights of 1 where others have some."""
    sets = [es for es, _ in parts]
    if len({tuple(es.latents.shape[1:]) for es in sets}) > 1 or len({es.num_train_timesteps for es in sets}) > 1:
        raise ValueError("sets of other latent shapes or schedules cannot be evaluated together")
    pick = [torch.tensor(idx, dtype=torch.long, device=es.latents.device) for es, idx in parts]

    def cat(get):
        return torch.cat([get(es)[i] for es, i in zip(sets, pick)])

    weighted = any(es.loss_weights is not None for es in sets)
    weights = cat(lambda es: es.loss_weights if es.loss_weights is not None else torch.ones_like(es.latents)) \
        if weighted else None
    keys = set.intersection(*(set(es.extras) for es in sets)) if sets else set()
    return EvalSet(cat(lambda es: es.latents), [es.prompts[j] for es, idx in parts for j in idx],
                   cat(lambda es: es.noise), cat(lambda es: es.timesteps), sets[0].num_train_timesteps,
                   torch.cat([es.picture_index[i.cpu()] for es, i in zip(sets, pick)]),
                   {k: cat(lambda es, k=k: es.extras[k]) for k in sorted(keys)}, weights)


def band_edges(num_train_timesteps: int, bands: int = DEFAULT_BANDS) -> list[int]:
    return [round(k * num_train_timesteps / bands) for k in range(bands + 1)]


def band_names(num_train_timesteps: int, bands: int = DEFAULT_BANDS) -> list[str]:
    edges = band_edges(num_train_timesteps, bands)
    return [f"t{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])]


def summarize(eval_set: EvalSet, per_sample: torch.Tensor, bands: int = DEFAULT_BANDS) -> dict[str, float]:
    """``{"eval_loss": mean, "eval_loss_t0-249": ..., ...}`` from the per-sample losses of the whole set.

    A band with no sample (a set smaller than the number of bands) is left out."""
    losses = per_sample.double().cpu()
    if losses.numel() != len(eval_set):
        raise ValueError(f"expected {len(eval_set)} losses, got {losses.numel()}")
    out = {"eval_loss": float(losses.mean())}
    edges = band_edges(eval_set.num_train_timesteps, bands)
    t = eval_set.timesteps.cpu()
    for name, lo, hi in zip(band_names(eval_set.num_train_timesteps, bands), edges[:-1], edges[1:]):
        inside = (t >= lo) & (t < hi)
        if inside.any():
            out[f"eval_loss_{name}"] = float(losses[inside].mean())
    return out
