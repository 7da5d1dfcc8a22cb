"""What a many-embedding run writes: per embedding, exactly a single run's files in ``<output_dir>/<name>/`` (through
utils/ti_outputs.py), its own loss log with its own epochs and rate, and at the end one summary table."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from utils.fileio import atomic_path
from utils.multi_embedding import SUMMARY_FILE, GroupOptimizer, ManyEmbeddings
from utils.training import BaseStepHook, LossLog, Outputs


@dataclass
class EmbeddingInfo:
    """What the run knows about embedding k beyond its vectors."""

    name: str
    folder: Path
    steps_per_epoch: int  # its own optimizer steps per epoch (its data, batch, processes, accumulation)
    lr_factor: float


class ManyOutputs:
    """The loop's Outputs for K embeddings: every callback goes to each embedding's single-run writer in turn."""

    def __init__(self, writers: list):
        self.writers = writers  # utils.ti_outputs.TextualInversionOutputs, one per embedding, in embedding order

    def save(self, step: int) -> list[Path]:
        return [f for w in self.writers for f in w.save(step)]

    def final(self, step: int, optimizer=None) -> list[Path]:
        files = []
        for k, w in enumerate(self.writers):
            files += w.final(step, None if optimizer is None else GroupOptimizer(optimizer, k))
        return files

    def preview(self, step: int) -> list:
        return [im for w in self.writers for im in w.preview(step)]

    def callbacks(self, previews: bool = True) -> Outputs:
        return Outputs(save=self.save, final=self.final, preview=self.preview if previews else None)


class PerEmbeddingLog(BaseStepHook):
    """Each embedding's ``textual_inversion_loss.csv`` (A1111's columns: its own step, epoch and rate) and, at the end,
    the summary table. The per-embedding losses are this step's means averaged over accumulation and processes, as
    the single run's log has them. Logs are written whenever a checkpoint is (a checkpoint at step N promises the
    logs up to N) and at the end."""

    name = "per_embedding_log"

    def __init__(self, trainable: ManyEmbeddings, infos: list[EmbeddingInfo], csv_name: str):
        self.trainable = trainable
        self.infos = infos
        self.csv_name = csv_name
        self.logs: list[LossLog] | None = None
        self.last_loss: list[float | None] = [None] * len(infos)
        self.recent: list[list[float]] = [[] for _ in infos]
        self.main = False

    def start(self, step: int, ctx) -> None:
        self.main = ctx.accelerator.is_main_process
        if self.main:
            resumed = step if step > 0 else None
            self.logs = [LossLog(info.folder / self.csv_name, resumed) for info in self.infos]

    def after_step(self, step: int, ctx) -> str | None:
        losses = self.trainable.take_step_losses()
        if losses is None:
            return None
        acc = ctx.accelerator
        losses = (acc.reduce(losses.float(), "sum") / acc.num_processes).tolist() if acc.num_processes > 1 \
            else losses.float().tolist()
        if ctx.cfg.report_to != "none" and step % ctx.cfg.log_every == 0:
            acc.log({f"loss/{info.name}": loss for info, loss in zip(self.infos, losses)}, step=step)
        if self.main:
            for k, (info, loss) in enumerate(zip(self.infos, losses)):
                spe = info.steps_per_epoch
                self.logs[k].add(step, (step - 1) // spe, (step - 1) % spe, loss, ctx.lr * info.lr_factor)
                self.last_loss[k] = loss
                self.recent[k] = (self.recent[k] + [loss])[-10:]
        return None

    def flush(self) -> None:
        for log in self.logs or []:
            log.flush()

    def state_dict(self) -> dict:
        # Called as a checkpoint is written: the logs must reach that step first.
        if self.main:
            self.flush()
        return {}

    def finish(self, step: int, ctx) -> list[Path]:
        if not self.main:
            return []
        self.flush()
        return [write_summary(ctx.cfg.output_dir, self.summary_rows(step), ctx.accelerator.print)]

    def summary_rows(self, step: int) -> list[dict]:
        rows = []
        for k, info in enumerate(self.infos):
            recent = self.recent[k]
            files = sorted(p.name for p in info.folder.iterdir() if p.is_file()) if info.folder.is_dir() else []
            rows.append({"name": info.name, "steps": step,
                         "final_loss": "" if self.last_loss[k] is None else f"{self.last_loss[k]:.5f}",
                         "mean_loss_last_10": f"{sum(recent) / len(recent):.5f}" if recent else "",
                         "folder": info.folder.name, "files": " ".join(files)})
        return rows


def write_summary(out_dir: Path, rows: list[dict], print_fn=print) -> Path:
    """``embeddings_summary.csv`` in the run's folder, and the same table printed."""
    path = Path(out_dir) / SUMMARY_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    width = max(len(r["name"]) for r in rows)
    print_fn(f"{'embedding':<{width}}  {'steps':>6}  {'final loss':>10}  {'last 10':>8}  files")
    for r in rows:
        print_fn(f"{r['name']:<{width}}  {r['steps']:>6}  {r['final_loss']:>10}  {r['mean_loss_last_10']:>8}  "
                 f"{r['folder']}/: {r['files']}")
    return path
