"""The loader the trainer holds: one endless, resumable pipeline of this rank's micro-batches.

The pipeline is a plain torch ``IterableDataset`` (no ``datasets`` fingerprinting of what it is handed) read through
one DataLoader that lives across epochs: its workers run ahead over epoch boundaries, so the next epoch costs no
pause; reading and planning (a stream's rows, its shuffle buffer refilled at a new pass) run in a thread a few
micro-batches ahead of decoding, so they overlap training too. Worker w of W makes micro-batches w, w+W, ... of the
rank's sequence and the DataLoader hands them out in order, so the sequence is the same with any number of workers.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterator

import torch

from utils.data.config import DataConfig, PromptConfig
from utils.data.items import ItemContext, collate
from utils.data.plan import latent_seed, sample_positions, steps_per_epoch
from utils.data.prompts import load_template, resolve_template
from utils.data.sources import DatasetSummary, Skipped, write_report
from utils.errors import UserError


READ_AHEAD = 16  # micro-batch plans read ahead of decoding


def read_ahead(items: Iterator, depth: int = READ_AHEAD) -> Iterator:
    """``items`` produced by a background thread up to ``depth`` ahead of the consumer; its exceptions are raised
    here. The thread ends when the consumer stops."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for x in items:
                if not put((None, x)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((e, None))
            return
        put((None, end))

    threading.Thread(target=run, daemon=True, name="embedforge-read-ahead").start()
    try:
        while True:
            error, x = q.get()
            if error is not None:
                raise error
            if x is end:
                return
            yield x
    finally:
        stop.set()


class MicroBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches from micro-batch ``start`` of ``epoch`` on, endlessly."""

    def __init__(self, batches, ctx: ItemContext, epoch: int, start: int, progress: bool = False):
        self.batches, self.ctx, self.epoch, self.start, self.progress = batches, ctx, epoch, start, progress

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # a lock inherited from the parent would hang remote reads (fsspec/gcsfs#379)
        b = self.batches
        plans = read_ahead(b.plans(self.epoch, self.start, self.progress and w == 0))
        for k, (epoch, j, plan, skipped) in enumerate(plans):
            if k % W != w:
                continue
            items, bad = b.make(self.ctx, epoch, j, plan)
            batch = collate(items, skipped + bad)
            positions = sample_positions(j, b.rank, b.batch_size, b.world_size)
            batch.update(epoch=epoch, position=j, positions=positions,
                         latent_seeds=[latent_seed(self.ctx.seed, epoch, p) for p in positions])
            yield batch


class TrainLoader:
    """Endless iterator of this rank's batches, epoch after epoch, with a resumable position.

    ``state_dict()`` -> {"epoch", "position"}: ``position`` micro-batches of ``epoch`` have been handed out. A new
    loader given that state continues with exactly the batch the old one would have yielded next. ``latents``: a
    ``utils.latents.LatentStore`` (cache hits come as latents, the rest as pixels with their cache keys).
    ``steps_per_epoch``: micro-batches handed out per epoch (whole groups of ``accumulation``). Skipped inputs met
    while training are appended to ``report_file``."""

    def __init__(self, summary: DatasetSummary, cfg: DataConfig, prompt: PromptConfig, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0, latents=None,
                 report_file: str | os.PathLike | None = None, accumulation: int = 1, progress: bool = False):
        self.summary, self.cfg, self.prompt = summary, cfg, prompt
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.latents, self.report_file = num_workers, latents, report_file
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch(summary, cfg, batch_size, world_size, accumulation) * accumulation
        if latents is not None and latents.keep and cfg.random_crop:
            raise UserError("--random_crop cannot be combined with cached latents (the crop changes every use)")
        template = resolve_template(prompt, summary.has_captions)
        lines = load_template(template) if template is not None else None
        self.ctx = ItemContext(cfg, prompt, lines, seed, latents)
        kw = dict(seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, per_epoch=self.steps_per_epoch)
        if summary.kind == "folder":
            from utils.data.folder import FolderBatches

            self.batches = FolderBatches(summary.folder, cfg, **kw)
        else:
            from utils.data.stream import StreamBatches

            self.batches = StreamBatches(cfg, summary.image_column, summary.caption_column, **kw)
        self.epoch = 0
        self.position = 0
        self.skipped_during_run: list[Skipped] = []
        self._pipe: Iterator[dict] | None = None
        self._pipe_at: tuple[int, int] | None = None  # (epoch, position) of the batch the pipeline yields next

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) * state.get("batch_size", self.batch_size) != \
                self.world_size * self.batch_size:
            # Another global batch size means another plan: restart the epoch rather than pretend to resume.
            self.epoch, self.position = int(state["epoch"]), 0
            return
        # Each rank takes one micro-batch of every global batch, so the position is also the number of global
        # batches consumed: it carries over to another world size with the same global batch size.
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _at(self, epoch: int, position: int) -> tuple[int, int]:
        return (epoch + 1, 0) if position >= self.steps_per_epoch else (epoch, position)

    def _next(self) -> dict:
        here = self._at(self.epoch, self.position)
        if self._pipe is None or self._pipe_at != here:
            self._start(*here)
        batch = next(self._pipe)
        if (batch["epoch"], batch["position"]) != here:
            raise RuntimeError(f"data pipeline out of step: got {(batch['epoch'], batch['position'])}, wanted {here}")
        self._pipe_at = self._at(here[0], here[1] + 1)
        return batch

    def _start(self, epoch: int, position: int) -> None:
        self.close()
        ds = MicroBatches(self.batches, self.ctx, epoch, position, self.progress)
        if self.num_workers > 0:
            # batch_size=None: every item is already a micro-batch; in-order delivery keeps the sequence.
            self._pipe = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers))
        else:
            self._pipe = iter(ds)
        self._pipe_at = (epoch, position)

    def close(self) -> None:
        """Stop the pipeline (and its worker processes); the next batch restarts it where the state says."""
        self._pipe = None
        self._pipe_at = None

    def iter_epoch(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards ``epoch`` is advanced and ``position`` reset."""
        while self.position < self.steps_per_epoch:
            batch = self._next()
            self.epoch, self.position = batch["epoch"], batch["position"] + 1
            if batch["skipped"]:
                self._record(batch["skipped"])
            yield batch
        self.epoch += 1
        self.position = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self.iter_epoch()

    def _record(self, skipped) -> None:
        known = {(s.path, s.reason) for s in self.skipped_during_run}
        new = [Skipped(p, r) for p, r in dict.fromkeys(map(tuple, skipped)) if (p, r) not in known]
        if not new:
            return
        self.skipped_during_run += new
        if self.report_file is not None:
            write_report(self.report_file, self.summary.skipped + self.skipped_during_run)


def iter_batches(summary: DatasetSummary, cfg: DataConfig, prompt: PromptConfig, *, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, epoch: int = 0, seed: int = 0, start: int = 0,
                 num_workers: int = 0, latents=None) -> Iterator[dict]:
    """This rank's batches of one epoch, from micro-batch ``start`` on (see utils/data/plan.py for the order)."""
    loader = TrainLoader(summary, cfg, prompt, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                         num_workers=num_workers, latents=latents)
    loader.epoch, loader.position = epoch, start
    try:
        yield from loader.iter_epoch()
    finally:
        loader.close()
