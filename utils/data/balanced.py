"""Many embeddings' data as one stream: every micro-batch holds one micro-batch of each embedding's own stream.

Each embedding keeps the exact stream its own run would read (its own data, shuffle, epoch length, sharding over
ranks, latent and noise seeds); this module only lays them side by side. Micro-batch ``m`` of the combined stream
(counted from the start of training) holds micro-batch ``m mod M_k`` of epoch ``m div M_k`` of embedding k, where
``M_k`` is that embedding's micro-batches per epoch. So sample by sample the combined run sees what K separate runs
see, a resume lands on the same batches (the position is a function of the step), and every embedding has the same
share of every step (balanced, whatever its number of pictures: a small set simply repeats sooner).

The combined stream's own "epoch" is the longest embedding's (``max M_k`` micro-batches); it only groups steps for
the loop and its logs.

An embedding that has left the training (``left``: embedding -> the step it stopped at, filled by the early stop)
has no samples in the micro-batches read after that: its stream is simply not read any more, so the frozen model
runs on the others' samples alone. The others' streams do not move (their position is a function of ``m``), and a
resumed run, which knows who left from its checkpoint, reads the same batches.
"""

from __future__ import annotations

from typing import Iterator

import torch

from utils.diffusion_loss import sample_seed

# Per-sample entries of a micro-batch (first dimension = the samples), joined across embeddings.
_PER_SAMPLE = ("latents", "loss_weights", "original_size", "crop_top_left", "target_size", "add_time_ids", "prompts",
               "captions", "index", "latent_keys", "positions", "latent_seeds")


class _Stream:
    """One embedding's batches from a given combined micro-batch on, kept open while they are read in order."""

    def __init__(self, source, per_epoch: int):
        self.source = source
        self.per_epoch = per_epoch
        self._it: Iterator[dict] | None = None
        self._next_m: int | None = None

    def _open(self, m: int) -> Iterator[dict]:
        epoch, j = divmod(m, self.per_epoch)
        while True:
            for batch in self.source.iter_epoch(epoch, j):
                batch["epoch"] = epoch  # this embedding's own epoch: its noise seeds come from it
                yield batch
            epoch, j = epoch + 1, 0

    def at(self, m: int) -> dict:
        if self._it is None or self._next_m != m:
            self.close()
            self._it = self._open(m)
        batch = next(self._it)
        self._next_m = m + 1
        return batch

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
        self._it, self._next_m = None, None


def join(parts: list[dict], seed: int) -> dict:
    """One micro-batch from each embedding's micro-batch, plus ``embedding_index`` and ``noise_seeds`` per sample.

    The noise seeds are those each embedding's own run draws (from its epoch and its samples' positions)."""
    out: dict = {}
    for key in _PER_SAMPLE:
        if not all(key in p for p in parts):
            continue
        values = [p[key] for p in parts]
        out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
    sizes = [len(p["positions"]) for p in parts]
    out["embedding_index"] = torch.tensor([p["embedding"] for p, n in zip(parts, sizes) for _ in range(n)],
                                          dtype=torch.long)
    out["noise_seeds"] = [sample_seed(seed, int(p["epoch"]), int(pos)) for p in parts for pos in p["positions"]]
    out["skipped"] = [s for p in parts for s in (p.get("skipped") or [])]
    return out


class BalancedBatches:
    """The loop's BatchSource over K embeddings' BatchSources (e.g. ``utils.training_setup.LoaderSource``).

    ``micro_batches_per_epoch`` of each source must be a whole number of optimizer steps (as TrainLoader's are)."""

    def __init__(self, sources: list, seed: int, left: dict[int, int] | None = None):
        if not sources:
            raise ValueError("no sources")
        self.sources = sources
        self.seed = seed
        self.left = {} if left is None else left  # read at every micro-batch: the caller adds to it as embeddings stop
        self.streams = [_Stream(s, s.micro_batches_per_epoch) for s in sources]
        self.micro_batches_per_epoch = max(s.micro_batches_per_epoch for s in sources)

    def iter_epoch(self, epoch: int, skip: int) -> Iterator[dict]:
        M = self.micro_batches_per_epoch
        for i in range(skip, M):
            m = epoch * M + i
            parts = []
            for k, stream in enumerate(self.streams):
                if k in self.left:
                    stream.close()
                    continue
                batch = stream.at(m)
                batch["embedding"] = k
                parts.append(batch)
            if not parts:
                return  # every embedding has left: the loop ends before it asks (utils/trainers/many_embeddings.py)
            yield join(parts, self.seed)

    def close(self) -> None:
        for s in self.streams:
            s.close()
