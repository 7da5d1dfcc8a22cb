"""The epoch layout, in one place: how many micro-batches and optimizer steps an epoch has, the global position of
every sample, the random generators of one use, and the order of a folder dataset's epoch.

Global order: every optimizer step consumes ``accumulation`` global batches of G = world_size x batch_size samples.
Rank r takes the contiguous slice [r*b, (r+1)*b) of every global batch, so sample i of rank r's micro-batch j sits at
global position j*G + r*b + i. Every random choice of one use (template line, tag shuffle/dropout, flip, random crop,
a ``random`` latent sample) and the loop's noise and timestep are drawn from (seed, epoch, position): N processes x
batch b see exactly what 1 process x batch N*b sees, whatever the number of DataLoader workers, and a resumed run
sees what the uninterrupted one saw.
"""

from __future__ import annotations

import numpy as np

from utils.errors import UserError


def micro_batches_per_epoch(num_uses: int, batch_size: int, world_size: int = 1, *, what: str = "") -> int:
    """Micro-batches each rank takes per epoch: floor(uses / G) (drop-last, like A1111); UserError below one."""
    G = batch_size * world_size
    if num_uses < G:
        raise UserError(f"{what or f'{num_uses} image(s)'} do not fill one step of {world_size} process(es) x batch "
                        f"{batch_size}; lower --train_batch_size or add images")
    return num_uses // G


def optimizer_steps_per_epoch(micro_batches: int, accumulation: int = 1) -> int:
    """Optimizer steps per epoch: whole groups of ``accumulation`` micro-batches (a remainder is left out, so every
    step averages the same number of samples); UserError when not even one group fits."""
    if micro_batches < accumulation:
        raise UserError(
            f"one epoch has {micro_batches} batch(es) per process, fewer than --gradient_accumulation_steps "
            f"{accumulation}; use more images, a smaller batch or less accumulation")
    return micro_batches // accumulation


def steps_per_epoch(summary, cfg, batch_size: int, world_size: int = 1, accumulation: int = 1) -> int:
    """Optimizer steps per epoch of a scanned dataset (with ``accumulation`` 1: the micro-batches each rank takes).

    Uses per epoch: folder datasets count every image ``--repeats`` times; streams count their rows once (from the
    dataset's own metadata, see ``utils.data.stream.count_rows``)."""
    repeats = cfg.repeats if summary.kind == "folder" else 1
    what = f"{summary.num_examples} usable image(s) (x{repeats} repeats)"
    micro = micro_batches_per_epoch(summary.num_examples * repeats, batch_size, world_size, what=what)
    return optimizer_steps_per_epoch(micro, accumulation)


def sample_positions(micro_batch: int, rank: int, batch_size: int, world_size: int) -> list[int]:
    """Global positions (within the epoch) of the samples of rank ``rank``'s micro-batch ``micro_batch``."""
    start = micro_batch * batch_size * world_size + rank * batch_size
    return list(range(start, start + batch_size))


def item_rng(seed: int, epoch: int, position: int, extra: int = 0) -> np.random.Generator:
    """The generator for the random choices of one use of one example (the same on any rank or worker). ``extra``
    separates independent purposes: 0 flip/crop/prompt, 1 the replacement of an unreadable image, 3 the latent."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, position, extra])


def latent_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the torch generator that draws a ``random``-mode latent sample for one use."""
    return int(item_rng(seed, epoch, position, 3).integers(2**62))


def epoch_plan_array(bucket_ids: np.ndarray, buckets: list[tuple[int, int]], global_batch: int, seed: int,
                     epoch: int, repeats: int = 1) -> np.ndarray:
    """``epoch_plan`` as an int64 array [batches, G]; ``bucket_ids[i]`` indexes example i's bucket in ``buckets``.

    Arrays instead of Python lists: a 100k-image epoch is planned in milliseconds."""
    G = global_batch
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x9E3779B9])
    bucket_ids = np.asarray(bucket_ids)
    groups: dict[int, np.ndarray] = {}
    for b in sorted(set(bucket_ids.tolist()), key=lambda b: tuple(buckets[b])):
        groups[b] = np.repeat(np.flatnonzero(bucket_ids == b), repeats)
    batches: list[np.ndarray] = []
    leftovers: dict[int, np.ndarray] = {}
    for b, members in groups.items():
        members = members[rng.permutation(len(members))]
        full = len(members) // G
        if full:
            batches.append(members[:full * G].reshape(full, G))
        if len(members) > full * G:
            leftovers[b] = members[full * G:]
    n_extra = sum(len(v) for v in leftovers.values()) // G
    extra = []
    for _ in range(n_extra):
        keys = sorted((k for k, v in leftovers.items() if len(v)), key=lambda k: tuple(buckets[k]))
        weights = np.array([len(leftovers[k]) for k in keys], dtype=np.float64)
        key = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
        batch, leftovers[key] = list(leftovers[key][:G]), leftovers[key][G:]
        pool = groups[key]
        while len(batch) < G:
            batch.append(pool[int(rng.integers(len(pool)))])
        extra.append(batch)
    if extra:
        batches.append(np.asarray(extra, dtype=np.int64))
    plan = np.concatenate(batches) if batches else np.zeros((0, G), dtype=np.int64)
    return plan[rng.permutation(len(plan))].astype(np.int64, copy=False)


def epoch_plan(buckets: list[tuple[int, int]], global_batch: int, seed: int, epoch: int, repeats: int = 1
               ) -> list[list[int]]:
    """Global batches (lists of example indices, one bucket each) for one epoch; a function of its arguments only.

    ``buckets[i]`` is example i's bucket. Each bucket (with ``repeats`` copies of its members) is shuffled and cut into
    full batches; then floor(leftovers / G) more batches are made, each from one bucket chosen with probability
    proportional to its leftover count, filled with that bucket's leftovers and topped up with random members of the
    same bucket. The batches are shuffled. Total: floor(n*repeats / G)."""
    distinct = sorted(set(map(tuple, buckets)))
    ids = {b: k for k, b in enumerate(distinct)}
    bucket_ids = np.array([ids[tuple(b)] for b in buckets], dtype=np.int64)
    return epoch_plan_array(bucket_ids, distinct, global_batch, seed, epoch, repeats).tolist()
