"""Many textual-inversion embeddings trained in one run, through one frozen model (``--concepts`` / ``--sweep``).

K embeddings share the text encoder(s) and UNet; each micro-batch holds one micro-batch of every embedding's own
data (utils/data/balanced.py), each sample's prompt carries its own embedding's name, and the loss is the sum over
embeddings of each embedding's mean loss. An embedding's vectors appear only in its own samples' prompts, so the
gradient each one gets is exactly the gradient of its own mean loss, what a separate run with the same seed and data
computes; AdamW works per parameter, and each embedding is its own parameter group with its own learning rate. The
frozen model runs once per step at K times the batch, which is where the time is saved.

Everything an embedding owns is written as a single run writes it (utils/trainers/textual_inversion.py's
TextualInversionOutputs), in ``<output_dir>/<name>/``: ``<name>.pt``, ``learned_embeds.safetensors``,
``embeddings/``, ``image_embeddings/``, ``images/``, ``textual_inversion_loss.csv`` (its own loss, epochs and rate),
``training_settings.json`` and the model card. The run's own files sit in ``<output_dir>``: the checkpoints (they
resume all embeddings together), ``many_embeddings_loss.csv`` (the loop's log of the summed loss the optimizer sees)
and ``embeddings_summary.csv``.

With the evaluation on (--eval_every, utils/eval_hook.py) every embedding has its own: its own fixed evaluation set
from its own pictures, evaluated through the shared model with only its own vectors, its own early stop and best
step (``<name>-best.*``, ``evaluation.csv/json/png`` in its folder). An embedding that stops leaves the training: its
samples leave the batch (utils/data/balanced.py), so the frozen model's time goes to the others, and its learning
rate becomes 0, so its vectors stay bit-identical while the others go on. Its vectors still enter the loss, times 0,
so every process's backward reaches every parameter, as DDP requires. The others' samples, seeds and losses are what
they were; only the batch is smaller, which changes their numbers by float rounding at most. The run ends when
every embedding has stopped, or at its last step.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from utils.embeddings import Embedding
from utils.fileio import atomic_path
from utils.prompts import PromptTokenizer
from utils.text_encoders import TextEncoders
from utils.trainers.textual_inversion import TextualInversionModel, load_vectors_state, vectors_state
from utils.training import BaseStepHook, LossLog, Outputs

SUMMARY_FILE = "embeddings_summary.csv"


class ManyEmbeddingsModel(TextualInversionModel):
    """TextualInversionModel with K embeddings: one Parameter per embedding and text encoder (``vectors[k * E + e]``),
    joined per forward into the table each encoder gets, in the order the batch's ids number them."""

    def encode(self, input_ids: list[torch.Tensor], weights: list[torch.Tensor | None] | None = None,
               embedding_order: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        E = len(self.text_encoders)
        tables = [torch.cat([self.vectors[k * E + e] for k in embedding_order]) if embedding_order else None
                  for e in range(E)]
        cond = self.encoders.encode(input_ids, tables, weights)
        return cond.embeds, cond.pooled


@dataclass
class ManyEmbeddings:
    """The Trainable for K embeddings (see utils/training.py): one parameter group per embedding, and a loss that is
    the sum of the embeddings' own mean losses."""

    embeddings: list[Embedding]
    prompt_tokens: PromptTokenizer | None  # all K embeddings by name: one tokenize-and-splice path for the batch
    model: ManyEmbeddingsModel | None
    lr_factors: list[float]  # embedding k's rate = the run's rate x lr_factors[k]
    # per-embedding sums of the micro-batch mean losses since the last optimizer step, and how many micro-batches
    loss_sums: torch.Tensor | None = None
    loss_batches: int = 0
    index: dict[str, int] = field(default_factory=dict)
    stopped: dict[int, int] = field(default_factory=dict)  # embedding -> the step its early stop fired (ManyEvalHook)
    # Its own loss log name (many_embeddings_loss.csv): the summed loss; never taken for one embedding's log.
    method = "many_embeddings"

    def __post_init__(self):
        self.index = {e.name: k for k, e in enumerate(self.embeddings)}

    @classmethod
    def build(cls, pipeline, embeddings: list[Embedding], lr_factors: list[float]) -> "ManyEmbeddings":
        encoders = TextEncoders.of(pipeline)
        for module in (*encoders.modules, pipeline.unet):
            module.requires_grad_(False)
            module.eval()
        vectors = [v for emb in embeddings for v in encoders.vectors_of(emb)]  # embedding-major
        tokens = PromptTokenizer(encoders.tokenizers, {emb.name: emb for emb in embeddings})
        return cls(list(embeddings), tokens, ManyEmbeddingsModel(encoders, pipeline.unet, vectors), list(lr_factors))

    # -- what the loop reads ----------------------------------------------------------------------------------------

    @property
    def num_embeddings(self) -> int:
        return len(self.embeddings)

    @property
    def num_encoders(self) -> int:
        return len(self.model.text_encoders)

    @property
    def name(self) -> str:
        # The checkpoint identity: the names and sizes of all embeddings, in order (a changed list is another run).
        blob = "\n".join(f"{e.name}:{e.num_vectors}" for e in self.embeddings)
        return f"{self.num_embeddings} embeddings {hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    @property
    def initial_step(self) -> int:
        return 0

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.vectors)

    def param_groups(self) -> list[dict]:
        """One AdamW parameter group per embedding (its vectors for every text encoder), with its rate factor."""
        E, vecs = self.num_encoders, list(self.model.vectors)
        return [{"params": vecs[k * E:(k + 1) * E], "lr_factor": self.lr_factors[k]}
                for k in range(self.num_embeddings)]

    def train(self, mode: bool = True) -> None:
        pass  # frozen models stay in eval mode

    def model_inputs(self, batch: dict, device) -> dict:
        tokens = self.prompt_tokens(batch["prompts"])
        # The ids number the rows of the table of the embeddings the batch's prompts name, in the order met.
        inputs = {"input_ids": [t.ids.to(device) for t in tokens],
                  "embedding_order": [self.index[e.name] for e in tokens[0].embeddings]}
        if any(t.weights is not None for t in tokens):  # A1111's (emphasis:1.2) in a caption
            inputs["weights"] = [None if t.weights is None else t.weights.to(device) for t in tokens]
        if self.model.sdxl:
            inputs["add_time_ids"] = batch["add_time_ids"].to(device)
        return inputs

    def reduce_loss(self, per_sample: torch.Tensor, batch: dict) -> torch.Tensor:
        """Sum over the embeddings in the batch of each one's mean per-sample loss: embedding k's vectors get the
        gradient of its own mean, as in its own run (where the loss is the mean over its micro-batch)."""
        K = self.num_embeddings
        owner = batch["embedding_index"].to(per_sample.device)
        counts = torch.bincount(owner, minlength=K)
        sums = torch.zeros(K, dtype=per_sample.dtype, device=per_sample.device).index_add(0, owner, per_sample)
        present = counts > 0
        means = sums[present] / counts[present]
        with torch.no_grad():
            full = torch.zeros_like(sums)
            full[present] = means.detach()
            self.loss_sums = full if self.loss_sums is None else self.loss_sums + full
            self.loss_batches += 1
        if not self.stopped:
            return means.sum()
        # A stopped embedding has no samples in the batch any more (BalancedBatches); should one come, its mean is
        # weighted 0. Its vectors join the loss times 0: a zero gradient, and DDP sees every parameter used.
        active = torch.tensor([k not in self.stopped for k in range(K)], device=means.device)[present]
        loss = (means * active.to(means.dtype)).sum()
        if self.model is not None:
            E = self.num_encoders
            vecs = list(self.model.vectors)
            for k in sorted(self.stopped):
                loss = loss + sum(v.sum() for v in vecs[k * E:(k + 1) * E]) * 0.0
        return loss

    def take_step_losses(self) -> torch.Tensor | None:
        """Each embedding's mean loss over the micro-batches since the last call (this process's share)."""
        if self.loss_sums is None:
            return None
        out = self.loss_sums / max(self.loss_batches, 1)
        self.loss_sums, self.loss_batches = None, 0
        return out

    def state_dict(self) -> dict:
        return vectors_state(self.model)

    def load_state_dict(self, state: dict) -> None:
        load_vectors_state(self.model, state)

    # -- one embedding ----------------------------------------------------------------------------------------------

    def current(self, k: int, step: int) -> Embedding:
        """A detached CPU float32 copy of embedding k as trained so far."""
        E = self.num_encoders
        vecs = [v.detach().float().cpu().clone() for v in list(self.model.vectors)[k * E:(k + 1) * E]]
        vectors = self.model.encoders.embedding_vectors(vecs)
        return replace(self.embeddings[k], vectors=vectors, step=step, filename=None, sha256=None)

    def view(self, k: int) -> "EmbeddingView":
        return EmbeddingView(self, k)


@dataclass
class EmbeddingView:
    """Embedding k of a ManyEmbeddings, as the single run's files writer (TextualInversionOutputs) sees a trainable."""

    many: ManyEmbeddings
    k: int

    @property
    def name(self) -> str:
        return self.many.embeddings[self.k].name

    def current(self, step: int) -> Embedding:
        return self.many.current(self.k, step)

    # what the evaluation hook (utils/eval_hook.py) reads of a trainable
    @property
    def model(self):
        return self.many.model

    @property
    def embedding(self) -> Embedding:
        return self.many.embeddings[self.k]

    def trained_vectors(self):
        """This embedding's vectors now (detached), keyed per text encoder as an embedding holds them."""
        E = self.many.num_encoders
        return self.many.model.encoders.embedding_vectors(
            [v.detach() for v in list(self.many.model.vectors)[self.k * E:(self.k + 1) * E]])


class GroupOptimizer:
    """One parameter group of an optimizer, with a ``state_dict()`` shaped as a one-embedding run's optimizer's (what
    A1111's ``.pt.optim`` sidecar holds)."""

    def __init__(self, optimizer, group: int):
        self.optimizer, self.group = optimizer, group

    def state_dict(self) -> dict:
        full = self.optimizer.state_dict()
        group = dict(full["param_groups"][self.group])
        ids = group["params"]
        group.pop("lr_factor", None)
        group["params"] = list(range(len(ids)))
        return {"state": {i: full["state"][p] for i, p in enumerate(ids) if p in full["state"]},
                "param_groups": [group]}


# ---------------------------------------------------------------------------------------------------------------
# The files a run writes


@dataclass
class EmbeddingInfo:
    """What the run knows about embedding k beyond its vectors."""

    name: str
    folder: Path
    steps_per_epoch: int  # its own optimizer steps per epoch (its data, batch, processes, accumulation)
    lr_factor: float


class ManyOutputs:
    """The loop's Outputs for K embeddings: every callback goes to each embedding's single-run writer in turn."""

    def __init__(self, writers: list, stopped: dict[int, int] | None = None):
        self.writers = writers  # utils.trainers.textual_inversion.TextualInversionOutputs, one per embedding, in embedding order
        self.stopped = {} if stopped is None else stopped  # ManyEmbeddings.stopped: these write nothing new after

    def _live(self, step: int) -> list:
        return [w for k, w in enumerate(self.writers) if self.stopped.get(k, step) >= step]

    def save(self, step: int) -> list[Path]:
        return [f for w in self._live(step) for f in w.save(step)]

    def final(self, step: int, optimizer=None) -> list[Path]:
        files = []
        for k, w in enumerate(self.writers):  # a stopped embedding's files are its stop step's
            files += w.final(self.stopped.get(k, step), None if optimizer is None else GroupOptimizer(optimizer, k))
        return files

    def preview(self, step: int) -> list:
        return [im for w in self._live(step) for im in w.preview(step)]

    def callbacks(self, previews: bool = True) -> Outputs:
        return Outputs(save=self.save, final=self.final, preview=self.preview if previews else None)


class PerEmbeddingLog(BaseStepHook):
    """Each embedding's ``textual_inversion_loss.csv`` (A1111's columns: its own step, epoch and rate) and, at the end,
    the summary table. The per-embedding losses are this step's means averaged over accumulation and processes, as
    the single run's log has them. Logs are written whenever a checkpoint is (a checkpoint at step N promises the
    logs up to N) and at the end."""

    name = "per_embedding_log"

    def __init__(self, trainable: ManyEmbeddings, infos: list[EmbeddingInfo], csv_name: str, evaluation=None):
        self.trainable = trainable
        self.evaluation = evaluation  # ManyEvalHook or None: the summary's stop and best columns
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
                if self.trainable.stopped.get(k, step) < step:
                    continue  # stopped before this step: not trained any more
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
            ev = self.evaluation.summary(k) if self.evaluation is not None else {}
            best = ev.get("best_step")
            rows.append({"name": info.name, "steps": self.trainable.stopped.get(k, step),
                         "final_loss": "" if self.last_loss[k] is None else f"{self.last_loss[k]:.5f}",
                         "mean_loss_last_10": f"{sum(recent) / len(recent):.5f}" if recent else "",
                         "stop_step": "" if ev.get("stopped_at") is None else ev["stopped_at"],
                         "stop_reason": ev.get("stop_reason", ""),
                         "best_step": "" if best is None else best,
                         "best_metric": "" if best is None else f"{ev['best_metric']}={ev['best_value']:.5g}",
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
    print_fn(f"{'embedding':<{width}}  {'steps':>6}  {'final loss':>10}  {'last 10':>8}  {'stop':>6}  "
             f"{'best':>6}  {'best metric':<22}  files")
    for r in rows:
        print_fn(f"{r['name']:<{width}}  {r['steps']:>6}  {r['final_loss']:>10}  {r['mean_loss_last_10']:>8}  "
                 f"{r['stop_step']!s:>6}  {r['best_step']!s:>6}  {r['best_metric']:<22}  {r['folder']}/: {r['files']}")
    for r in rows:
        if r["stop_reason"]:
            print_fn(f"{r['name']} stopped at step {r['stop_step']}: {r['stop_reason']}")
    return path


class ManyEvalHook(BaseStepHook):
    """Each embedding's evaluation hook (utils/eval_hook.py's EvalHook, built as its single run builds it) run side
    by side, their evaluation sets in shared forward passes (``_joint_shares``): an embedding whose early stop fires
    leaves the training there (ManyEmbeddings.stopped: its samples leave the batch, its parameter group's learning
    rate becomes 0) and is not evaluated again; the run ends when all have stopped. The stops and every embedding's evaluation state are in each checkpoint, so a resumed run decides the
    same at the same steps."""

    name = "evaluation"

    def __init__(self, trainable: ManyEmbeddings, hooks: list):
        self.trainable = trainable
        self.hooks = hooks  # hooks[k]: embedding k's EvalHook, or None (no evaluation for it)

    def _live(self):
        return [(k, h) for k, h in enumerate(self.hooks) if h is not None and k not in self.trainable.stopped]

    def _freeze(self, ctx) -> None:
        for k in self.trainable.stopped:  # AdamW with rate 0: no step, no weight decay -- the vectors stay as they are
            ctx.optimizer.param_groups[k]["lr_factor"] = 0.0

    def _joint_shares(self, step: int, ctx, starting: bool = False) -> dict[int, torch.Tensor]:
        """The losses of every embedding evaluated at this step, in shared forward passes: each prompt names its own
        embedding, so one pass through the shared model is each embedding's own evaluation. Batches are as big as
        the training step's (the UNet already runs that many samples, with gradients) or one evaluator's batch."""
        due = [(k, h) for k, h in self._live() if h.wants_evaluation(step, starting)]
        if len(due) < 2:
            return {}
        from utils.evaluator import joint_losses

        evaluators = [h.evaluator for _, h in due]
        largest = max(ev.cfg.eval_batch_size for ev in evaluators)
        size = min(sum(ev.cfg.eval_batch_size for ev in evaluators),
                   max(largest, ctx.cfg.train_batch_size * self.trainable.num_embeddings))
        acc = ctx.accelerator
        with ctx.evaluating():
            shares = joint_losses(evaluators, ctx.predict, acc.process_index, acc.num_processes, size)
        return {k: share for (k, _), share in zip(due, shares)}

    def start(self, step: int, ctx) -> None:
        self._freeze(ctx)  # stops restored from the checkpoint
        shares = self._joint_shares(step, ctx, starting=True)
        for k, h in self._live():
            h.start(step, ctx, share=shares.get(k))

    def after_step(self, step: int, ctx) -> str | None:
        shares = self._joint_shares(step, ctx)
        for k, h in self._live():
            if h.after_step(step, ctx, share=shares.get(k)):
                self.trainable.stopped[k] = step
                ctx.accelerator.print(f"{self.trainable.embeddings[k].name}: early stop at step {step}; it leaves "
                                      f"the training, {self.remaining()} embedding(s) go on.")
        self._freeze(ctx)
        return "early_stop" if self.remaining() == 0 else None

    def remaining(self) -> int:
        return self.trainable.num_embeddings - len(self.trainable.stopped)

    def summary(self, k: int) -> dict:
        h = self.hooks[k]
        return h.evaluator.summary() if h is not None and h.evaluator is not None else {}

    def state_dict(self) -> dict:
        names = [e.name for e in self.trainable.embeddings]
        return {"stopped": {names[k]: s for k, s in sorted(self.trainable.stopped.items())},
                "embeddings": {names[k]: h.state_dict() for k, h in enumerate(self.hooks) if h is not None}}

    def load_state_dict(self, state: dict) -> None:
        index = self.trainable.index  # a name not here: another run's checkpoint, which the loop refuses
        self.trainable.stopped.clear()
        self.trainable.stopped.update({index[n]: int(s) for n, s in state.get("stopped", {}).items() if n in index})
        for name, sub in state.get("embeddings", {}).items():
            if name in index and self.hooks[index[name]] is not None:
                self.hooks[index[name]].load_state_dict(sub)

    def finish(self, step: int, ctx) -> list[Path]:
        return [f for h in self.hooks if h is not None for f in h.finish(step, ctx)]
