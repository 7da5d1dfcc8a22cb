"""The one training loop both trainers use.

It owns everything that is not specific to what is trained: the Accelerator, gradient accumulation, clipping, the
learning rate, checkpoints and exact resume, stop signals, the NaN guard, the CSV log, trackers, previews and the
progress bar. What is trained comes in through a small Trainable interface (one module per method in
utils/trainers/); the data comes in through a BatchSource; code that runs after each step (evaluation, early stop)
through StepHooks.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from utils import checkpoints
from utils.checkpoints import CHECKPOINT_PREFIX, list_checkpoints, resolve_resume  # noqa: F401 - also from here
from utils.config import OptimConfig  # noqa: F401 - the loop's optimizer settings (also imported from here)
from utils.data.plan import optimizer_steps_per_epoch
from utils.diffusion_loss import (
    denoising_loss,
    draw_noise_and_timesteps,
    min_snr_weights,
    sample_seed,
    training_target,
)
from utils.distributed import sync_only_trainables
from utils.errors import UserError
from utils.fileio import WriteError, atomic_path, write_error
from utils.lr_schedule import LearningRate


@dataclass
class LoopConfig:
    output_dir: Path
    max_train_steps: int
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 0
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    save_every: int = 500
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    preview_every: int = 500
    log_every: int = 1
    report_to: str = "none"
    tracker_project_name: str = "embedforge"
    run_name: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    tracker_config: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)


class Trainable(Protocol):
    """What differs between training methods (utils/trainers/): what to optimise, how a batch conditions the model,
    and the trained state a checkpoint holds. The loop derives the rest: messages and the checkpoint identity from
    ``method`` ("textual_inversion" -> "textual inversion"), the loss log's name (``<method>_loss.csv``, A1111's
    names), the logged norm from ``parameters()``. A method may also define ``reduce_loss(per_sample, batch)``
    (default: ``mean_loss``)."""

    method: str  # "textual_inversion" | "hypernetwork"
    name: str  # what is trained, as the user named it
    model: torch.nn.Module  # the module DDP wraps; its forward(noisy_latents, timesteps, **inputs) -> prediction
    initial_step: int  # the step counter of a continued file (0 for a new one)

    def parameters(self) -> list[torch.nn.Parameter]: ...  # what the optimizer updates (and DDP all-reduces)
    def train(self, mode: bool = True) -> None: ...  # False around previews and evaluation (e.g. dropout off)
    def model_inputs(self, batch: dict, device) -> dict: ...  # the conditioning for model.forward
    def state_dict(self) -> dict: ...  # the trained state (tensors), checkpoint-N/trainable.pt
    def load_state_dict(self, state: dict) -> None: ...


def method_title(trainable: Trainable) -> str:
    """For messages and the checkpoint identity: "textual inversion", "hypernetwork"."""
    return trainable.method.replace("_", " ")


def loss_log_name(trainable: Trainable) -> str:
    """A1111's loss log names: textual_inversion_loss.csv, hypernetwork_loss.csv."""
    return f"{trainable.method}_loss.csv"


def parameter_norm(params: Sequence[torch.nn.Parameter]) -> float:
    """The L2 norm of everything trained, as one vector (logged as ``vector_norm``)."""
    return float(sum(p.detach().float().norm() ** 2 for p in params) ** 0.5)


def mean_loss(per_sample: torch.Tensor, batch: dict) -> torch.Tensor:
    """The default reduction of the per-sample losses: their mean over the micro-batch (A1111/LDM's loss). A trainable
    may define ``reduce_loss(per_sample, batch)`` instead (e.g. several embeddings in one batch, each its own mean)."""
    return per_sample.mean()


class BatchSource(Protocol):
    """Per-rank micro-batches. ``positions`` are the samples' places in the epoch's global order."""

    micro_batches_per_epoch: int

    def iter_epoch(self, epoch: int, skip: int) -> Iterator[dict]: ...


@dataclass
class Outputs:
    """Callbacks the script gives the loop for its user-facing files (called on the main process only)."""

    save: Callable[[int], list[Path]]  # periodic copy at a step
    final: Callable[[int, object], list[Path]]  # the final files, given the step and the optimizer
    preview: Callable[[int], list] | None = None  # -> list of (PIL image, caption) at a step


# ---------------------------------------------------------------------------------------------------------------
# Step hooks: code that runs after every optimizer step (evaluation, early stop, per-step bookkeeping)


@dataclass
class StepContext:
    """What a step hook may read: the run's accelerator (for ``reduce``/``gather``/``is_main_process``), the trainable,
    the prepared (DDP-wrapped) model, the noise scheduler and the loop's config; plus the step's epoch, loss and rate
    (updated by the loop before each ``after_step``) and, at ``finish``, why the run ended."""

    accelerator: Accelerator
    trainable: "Trainable"
    model: torch.nn.Module
    noise_scheduler: object
    cfg: LoopConfig
    epoch: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    stopped_by: str = ""
    optimizer: object = None  # the prepared optimizer (a hook may set a parameter group's ``lr_factor``)

    @contextmanager
    def evaluating(self):
        """For a forward pass outside training: no gradients, the trainable in eval mode (no dropout, which is the
        only use of the global RNG in a training step), back to train mode afterwards. The loop's noise, timesteps
        and latents come from per-sample seeds with their own generators, so a hook that draws its own numbers from
        its own ``torch.Generator`` leaves the training trajectory bit-identical."""
        self.trainable.train(False)
        try:
            with torch.no_grad(), self.accelerator.autocast():
                yield
        finally:
            self.trainable.train()

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        """The trained model's prediction for a batch (call inside ``evaluating()``). Runs the unwrapped module, so no
        DDP collective or gradient-sync state is involved."""
        device = self.accelerator.device
        return self.trainable.model(noisy_latents, timesteps, **self.trainable.model_inputs(batch, device))


class StepHook(Protocol):
    """Called by the loop on EVERY process; see ``BaseStepHook`` for no-op defaults.

    - ``start(step, ctx)``: once, after any resume, before the first step of this launch.
    - ``after_step(step, ctx)``: after each optimizer step (``step`` just finished), after logging and before the
      save / preview / checkpoint decisions. Returning a reason (e.g. ``"early_stop"``) ends the run there: a
      checkpoint is written, the final files and preview follow as at a normal end, and the summary's ``stopped_by``
      is the reason. Collectives are allowed (every process calls it); the loop makes all processes stop together.
    - ``state_dict()`` / ``load_state_dict(state)``: JSON-able; saved under the hook's ``name`` in every
      checkpoint's trainer_state.json and restored on resume, so a resumed run makes the same decisions.
    - ``finish(step, ctx)``: at the end (not after a divergence), on every process; the main process writes the
      hook's files and returns them (they join the run's file list)."""

    name: str

    def start(self, step: int, ctx: StepContext) -> None: ...
    def after_step(self, step: int, ctx: StepContext) -> str | None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def finish(self, step: int, ctx: StepContext) -> list[Path]: ...


class BaseStepHook:
    """No-op defaults for the StepHook members a hook does not need."""

    name = "hook"

    def start(self, step: int, ctx: StepContext) -> None:
        pass

    def after_step(self, step: int, ctx: StepContext) -> str | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, step: int, ctx: StepContext) -> list[Path]:
        return []


def _run_hooks(hooks: Sequence[StepHook], step: int, ctx: StepContext) -> str | None:
    """Every hook's ``after_step``; the first reason given ends the run. One small all-reduce makes every process
    stop at the same step even if only some of them were told to (a process that was not reports the reason
    'hook')."""
    reason = None
    for hook in hooks:  # every hook sees every step, also after another one asked to stop
        said = hook.after_step(step, ctx)
        if reason is None and said:
            reason = str(said)
    vote = torch.tensor(float(reason is not None), device=ctx.accelerator.device)
    if ctx.accelerator.num_processes > 1 and float(ctx.accelerator.reduce(vote, "sum")) > 0:
        reason = reason or "hook"
    return reason


# ---------------------------------------------------------------------------------------------------------------
# Stop signals


class StopRequest:
    """SIGINT / SIGTERM / SIGUSR1 (Slurm preemption) ask the loop to finish the current step, checkpoint and exit."""

    SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGUSR1")) if s is not None)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): signals stay as they were
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


class TrainerState:
    """Progress saved with every checkpoint, as JSON (trainer_state.json; see utils/checkpoints.py)."""

    def __init__(self, identity: dict | None = None, layout: dict | None = None,
                 hooks: Sequence[StepHook] = ()):
        self.step = 0
        self.skipped_steps = 0  # fp16 steps the loss scaler skipped: they used data but are not counted in ``step``
        self.tracker_run_id: str | None = None
        self.stopped_by: str | None = None  # a step hook's reason: a resumed run that had stopped stays stopped
        # What was trained (kind, name, shapes) and how the data was cut (global micro-batch, accumulation): a
        # checkpoint only continues the same run with the same layout, or positions and seeds would silently shift.
        self.identity = identity or {}
        self.layout = layout or {}
        self.loaded_identity: dict | None = None
        self.loaded_layout: dict | None = None
        self.hooks = {h.name: h for h in hooks}
        if len(self.hooks) != len(hooks):
            raise ValueError(f"step hooks need distinct names: {[h.name for h in hooks]}")

    def state_dict(self) -> dict:
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "tracker_run_id": self.tracker_run_id,
                 "identity": self.identity, "layout": self.layout}
        if self.hooks:
            state["hooks"] = {name: h.state_dict() for name, h in self.hooks.items()}
        if self.stopped_by:
            state["stopped_by"] = self.stopped_by
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.tracker_run_id = state.get("tracker_run_id")
        self.loaded_identity = state.get("identity")
        self.loaded_layout = state.get("layout")
        self.stopped_by = state.get("stopped_by")
        # A hook the checkpoint has no state for (e.g. turned on at resume) starts fresh.
        for name, hook_state in (state.get("hooks") or {}).items():
            if name in self.hooks:
                self.hooks[name].load_state_dict(hook_state)

    def check_resumable(self, where: Path) -> None:
        if self.loaded_identity is not None and self.loaded_identity != self.identity:
            raise UserError(f"{where} belongs to another run ({self.loaded_identity}); this run trains "
                            f"{self.identity}. Use another --output_dir or remove the old checkpoints.")
        if self.loaded_layout is not None and self.loaded_layout != self.layout:
            raise UserError(
                f"{where} was written with {self.loaded_layout}; this run has {self.layout}. To resume exactly, keep "
                f"the global micro-batch (--train_batch_size x processes) and --gradient_accumulation_steps.")


def _checkpoint_write(final_dir: Path, write: Callable[[], object]) -> UserError | None:
    """Run ``write``; a failure the OS reports (full disk, permissions) comes back as a one-line error naming the
    checkpoint, any other error propagates."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - torch and safetensors report a full disk as RuntimeError and their own types
        error = write_error(final_dir, e)
        if error is None:
            raise
        return error
    return None


def _finish_checkpoint(folder: Path, state: TrainerState, step: int) -> None:
    """The loop's state as JSON, the progress marker, and last the manifest over everything (main process)."""
    (folder / checkpoints.TRAINER_STATE).write_text(json.dumps(state.state_dict()))
    (folder / checkpoints.PROGRESS).write_text(json.dumps({"step": step}))
    checkpoints.write_manifest(folder)


def _any_rank(accelerator: Accelerator, failure) -> bool:
    """Whether any rank reports a failure (a collective: every rank must call it)."""
    flag = torch.tensor(float(failure is not None), device=accelerator.device)
    return float(accelerator.reduce(flag, "sum")) > 0


# ---------------------------------------------------------------------------------------------------------------
# Logs


class LossLog:
    """A1111's CSV (step, epoch, epoch_step, loss, learn_rate), appended; on resume, rows past the resumed step go."""

    HEADER = ["step", "epoch", "epoch_step", "loss", "learn_rate"]

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.rows: list[list] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                kept = [r for r in csv.reader(f)][1:]
            kept = [r for r in kept if r and r[0].isdigit() and int(r[0]) <= resume_step]
            self._write(kept, mode="w")
        elif resume_step is None and path.is_file():
            path.unlink()  # a fresh run in an old folder starts a fresh log

    def _write(self, rows, mode="a"):
        new = mode == "w" or not self.path.is_file()
        if new:
            with atomic_path(self.path) as tmp:
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    w.writerow(self.HEADER)
                    w.writerows(rows)
        else:
            size = self.path.stat().st_size
            try:
                with open(self.path, "a", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerows(rows)
            except OSError as e:  # a full disk: cut off the partial row, keep every complete one
                try:
                    os.truncate(self.path, size)
                except OSError:
                    pass
                raise write_error(self.path, e) from None

    def add(self, step: int, epoch: int, epoch_step: int, loss: float, lr: float) -> None:
        self.rows.append([step, epoch, epoch_step, f"{loss:.7f}", f"{lr:g}"])

    def flush(self) -> None:
        if self.rows:
            self._write(self.rows)
            self.rows = []


def _tracker_init_kwargs(cfg: LoopConfig, run_id: str | None) -> dict:
    """W&B: a resumed or requeued run continues the same run (its id is saved in every checkpoint) under a stable
    name (default: the output folder's name), grouped per Slurm job unless WANDB_RUN_GROUP says otherwise, tagged
    with --wandb_tags and 'slurm' inside Slurm jobs."""
    from utils.cluster import slurm_job, wandb_tags

    kwargs: dict = {}
    if cfg.report_to in ("wandb", "all"):
        job = slurm_job()
        wandb_kwargs = {"name": cfg.run_name or Path(cfg.output_dir).resolve().name, "resume": "allow",
                        "dir": str(cfg.output_dir), "job_type": "train",
                        "tags": wandb_tags(cfg.wandb_tags, job) or None}
        if run_id:
            wandb_kwargs["id"] = run_id
        if job and not os.environ.get("WANDB_RUN_GROUP"):
            wandb_kwargs["group"] = job.group
        kwargs["wandb"] = {k: v for k, v in wandb_kwargs.items() if v is not None}
    return kwargs


def _tracker_run_id(accelerator: Accelerator) -> str | None:
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
        return getattr(run, "id", None)
    except (ValueError, AttributeError, KeyError):
        return None


def _log_images(accelerator: Accelerator, images: list, step: int) -> None:
    if not images:
        return
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"preview": [wandb.Image(im, caption=cap) for im, cap in images]}, step=step)
        elif tracker.name == "tensorboard":
            arr = np.stack([np.asarray(im.convert("RGB")) for im, _ in images])
            tracker.writer.add_images("preview", arr, step, dataformats="NHWC")


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunSummary:
    step: int
    stopped_by: str  # "max_steps" | "schedule" | "signal" | a step hook's reason (e.g. "early_stop")
    files: list[Path]
    skipped_steps: int = 0  # fp16 steps skipped by the loss scaler (not counted in ``step``)


def train(accelerator: Accelerator, trainable: Trainable, data: BatchSource, noise_scheduler, cfg: LoopConfig,
          outputs: Outputs, hooks: Sequence[StepHook] = ()) -> RunSummary:
    out_dir = Path(cfg.output_dir)
    world = accelerator.num_processes
    A = cfg.gradient_accumulation_steps
    steps_per_epoch = optimizer_steps_per_epoch(data.micro_batches_per_epoch, A)
    micro_per_epoch = steps_per_epoch * A
    global_batch = cfg.train_batch_size * A * world

    scale = global_batch if cfg.optim.scale_lr else 1.0
    lr = LearningRate(cfg.optim.learning_rate, cfg.max_train_steps, cfg.optim.lr_scheduler,
                      cfg.optim.lr_warmup_steps * 1, scale, cfg.optim.lr_num_cycles, cfg.optim.lr_power)
    end_step = lr.end_step()

    kind = method_title(trainable)
    identity = {"kind": kind, "name": trainable.name,
                "shapes": [list(p.shape) for p in trainable.parameters()]}
    state = TrainerState(identity, {"global_micro_batch": cfg.train_batch_size * world, "accumulation": A}, hooks)
    state.step = trainable.initial_step
    # A trainable may give AdamW parameter groups (several embeddings, each with an ``lr_factor`` on the run's rate).
    groups = trainable.param_groups() if hasattr(trainable, "param_groups") else trainable.parameters()
    optimizer = torch.optim.AdamW(groups, lr=lr.rate(state.step),
                                  betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                                  weight_decay=cfg.optim.adam_weight_decay, eps=cfg.optim.adam_epsilon)
    sync_only_trainables(trainable.model, trainable.parameters())  # DDP: no broadcast of frozen weights/buffers
    model, optimizer = accelerator.prepare(trainable.model, optimizer)
    params = trainable.parameters()
    reduce_loss = getattr(trainable, "reduce_loss", mean_loss)
    ctx = StepContext(accelerator, trainable, model, noise_scheduler, cfg, optimizer=optimizer)

    # Checkpoints hold only what is trained (a few KB for an embedding), never the frozen models. The loop's own state
    # is JSON written beside accelerate's files; resuming reads every file itself (utils/checkpoints.py).
    def save_hook(models, weights, ckpt_dir):
        if accelerator.is_main_process:
            torch.save(trainable.state_dict(), os.path.join(ckpt_dir, checkpoints.TRAINABLE))
        weights.clear()

    accelerator.register_save_state_pre_hook(save_hook)

    resume_dir = resolve_resume(out_dir, cfg.resume_from_checkpoint)
    if resume_dir is not None:
        notes = checkpoints.load_checkpoint(resume_dir, state=state, trainable=trainable, optimizer=optimizer,
                                            scaler=accelerator.scaler, process_index=accelerator.process_index)
        for note in notes:
            accelerator.print(f"Note: {note}")
        accelerator.step = 0  # checkpoints sit on optimizer-step boundaries: accumulation restarts at its first batch
        accelerator.print(f"Resumed from {resume_dir} at step {state.step}")
    resumed_step = state.step if resume_dir is not None else None

    if state.step >= end_step:
        accelerator.print(f"Already trained to step {state.step} (>= {end_step}); nothing to do.")
    elif state.stopped_by:
        accelerator.print(f"The run stopped at step {state.step} ({state.stopped_by}); nothing to do.")

    if cfg.report_to != "none":
        accelerator.init_trackers(cfg.tracker_project_name, config=cfg.tracker_config,
                                  init_kwargs=_tracker_init_kwargs(cfg, state.tracker_run_id))
        state.tracker_run_id = state.tracker_run_id or _tracker_run_id(accelerator)

    log = LossLog(out_dir / loss_log_name(trainable), resumed_step) if accelerator.is_main_process else None
    accelerator.print(
        f"Training {kind} '{trainable.name}': {world} process(es), global batch {global_batch} "
        f"({cfg.train_batch_size} x {A} accumulation x {world}), {steps_per_epoch} steps per epoch, "
        f"steps {state.step} -> {end_step}, learning rate {lr.describe()}")

    files: list[Path] = []
    stopped_by = ""
    progress = tqdm(total=end_step, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc=f"Training {kind}", dynamic_ncols=True)
    device = accelerator.device
    trainable.train()
    samples_done, t_start = 0, time.perf_counter()
    previewed = None  # the step of the last preview
    for hook in hooks:
        hook.start(state.step, ctx)

    def checkpoint(step: int) -> None:
        final_dir = out_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp_dir = out_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if log:
                log.flush()  # before the checkpoint exists: a checkpoint at step N promises the log up to N
        accelerator.wait_for_everyone()
        # A write the disk refuses ends every rank with one line (all learn of it in the same collective, so none is
        # left waiting); the temporary folder goes and the previous checkpoint stays.
        failure = _checkpoint_write(final_dir, lambda: accelerator.save_state(str(tmp_dir)))
        if not _any_rank(accelerator, failure) and accelerator.is_main_process:
            failure = _checkpoint_write(final_dir, lambda: _finish_checkpoint(tmp_dir, state, step))
        if _any_rank(accelerator, failure):
            if accelerator.is_main_process:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            previous = list_checkpoints(out_dir)
            kept = f" ({previous[-1][1].name} is intact)" if previous else ""
            raise WriteError(f"{failure or f'another process could not write {final_dir}; see its message'}{kept}")
        if accelerator.is_main_process:
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp_dir, final_dir)
            if cfg.checkpoints_total_limit:
                for _, old in list_checkpoints(out_dir)[: -cfg.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    with StopRequest() as stop:
        # Skipped fp16 steps used their batches too: the data goes on from step + skipped optimizer-step slots.
        epoch = (state.step + state.skipped_steps) // steps_per_epoch
        finished = state.step >= end_step or lr.finished(state.step) or bool(state.stopped_by)
        skipped_in_a_row = 0
        while not finished:
            skip = ((state.step + state.skipped_steps) % steps_per_epoch) * A
            accum_loss = torch.zeros((), device=device)
            seen = 0
            for i, batch in enumerate(data.iter_epoch(epoch, skip), start=skip):
                if i >= micro_per_epoch:
                    break
                seen += 1
                for group in optimizer.param_groups:
                    group["lr"] = lr.rate(state.step) * group.get("lr_factor", 1.0)
                latents = batch["latents"].to(device)
                # A source that joins several runs' samples hands each its own run's seed (utils/data/balanced.py).
                seeds = batch.get("noise_seeds") or [sample_seed(cfg.seed, epoch, int(p)) for p in batch["positions"]]
                noise, timesteps = draw_noise_and_timesteps(
                    seeds, latents.shape[1:], noise_scheduler.config.num_train_timesteps, device, latents.dtype)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = training_target(noise_scheduler, latents, noise, timesteps, cfg.prediction_type)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        pred = model(noisy, timesteps, **trainable.model_inputs(batch, device))
                    weights = batch.get("loss_weights")
                    snr_w = (min_snr_weights(noise_scheduler, timesteps, cfg.snr_gamma, cfg.prediction_type)
                             if cfg.snr_gamma else None)
                    per_sample = denoising_loss(pred, target, None if weights is None else weights.to(device), snr_w,
                                                reduction="none")
                    loss = reduce_loss(per_sample, batch)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        # accelerate unscales fp16 gradients before clipping (unlike A1111, which clips scaled ones)
                        if cfg.optim.clip_grad_mode == "value":
                            accelerator.clip_grad_value_(params, cfg.optim.max_grad_norm)
                        else:
                            grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                accum_loss += loss.detach() / A
                samples_done += latents.shape[0]
                if not accelerator.sync_gradients:
                    continue

                # One small all-reduce and one host sync per optimizer step: the summed loss, whether any rank was
                # asked to stop, whether any rank's trained weights stopped being finite, and whether the fp16 loss
                # scaler skipped the update (inf/NaN gradients; the same on every rank, reduced so all ranks agree).
                finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
                status = torch.stack([accum_loss.float(), torch.tensor(float(stop.signum is not None), device=device),
                                      (~finite).float(),
                                      torch.tensor(float(accelerator.optimizer_step_was_skipped), device=device)])
                loss_sum, stop_votes, nonfinite, skip_votes = accelerator.reduce(status, "sum").tolist()
                accum_loss = torch.zeros((), device=device)
                step_loss = loss_sum / world
                if skip_votes and not nonfinite:
                    # Not an optimizer step (unlike A1111, which counts it): no step number, learning-rate
                    # advance, log row or save. A forward overflow (non-finite loss) is skipped the same way.
                    state.skipped_steps += 1
                    skipped_in_a_row += 1
                    progress.set_postfix(loss="skipped", skipped=state.skipped_steps, epoch=epoch, refresh=False)
                    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        progress.close()
                        if log:
                            log.flush()
                        raise TrainingDiverged(
                            f"{kind} training stopped at step {state.step}: the fp16 loss scaler skipped "
                            f"{skipped_in_a_row} updates in a row (the loss or gradients are NaN/inf at any scale). "
                            f"The last good files are kept. Try --mixed_precision bf16 or no, or a lower learning "
                            f"rate.")
                    if stop_votes > 0:
                        checkpoint(state.step)
                        stopped_by, finished = "signal", True
                        break
                    continue
                skipped_in_a_row = 0
                if not math.isfinite(step_loss) or nonfinite:
                    progress.close()
                    if log:
                        log.flush()  # the rows leading up to the divergence are the useful ones
                    raise TrainingDiverged(
                        f"{kind} training diverged at step {state.step + 1}: the loss or the trained "
                        f"weights became NaN/inf. Nothing from this step was saved; the last good files are kept. "
                        f"Try a lower learning rate or --max_grad_norm.")
                state.step += 1
                rate = lr.rate(state.step - 1)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{rate:.2g}", epoch=epoch, refresh=False,
                                     **({"skipped": state.skipped_steps} if state.skipped_steps else {}))
                if log:
                    log.add(state.step, (state.step - 1) // steps_per_epoch, (state.step - 1) % steps_per_epoch,
                            step_loss, rate)
                if cfg.report_to != "none" and state.step % cfg.log_every == 0:
                    elapsed = time.perf_counter() - t_start
                    metrics = {"loss": step_loss, "lr": rate, "vector_norm": parameter_norm(params),
                               "epoch": epoch, "images_per_sec": samples_done * world / max(elapsed, 1e-9)}
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    if accelerator.scaler is not None:
                        metrics.update(skipped_steps=state.skipped_steps, loss_scale=accelerator.scaler.get_scale())
                    accelerator.log(metrics, step=state.step)
                hook_stop = None
                if hooks:
                    ctx.epoch, ctx.loss, ctx.lr = epoch, step_loss, rate
                    hook_stop = _run_hooks(hooks, state.step, ctx)

                finished = state.step >= end_step or lr.finished(state.step) or hook_stop is not None
                stopping = stop_votes > 0
                # A periodic copy at every multiple of --save_every, the last step included (A1111's rule); the preview
                # of this step (the final one, at the end) comes first, so a PNG card shows it.
                saving = cfg.save_every and state.step % cfg.save_every == 0
                due = cfg.preview_every and state.step % cfg.preview_every == 0
                if outputs.preview and (due and not finished or finished and saving and not stopping):
                    _preview(accelerator, trainable, outputs, state.step)
                    previewed = state.step
                if saving and accelerator.is_main_process:
                    files += outputs.save(state.step)
                if hook_stop:  # the run is complete, also when a signal arrived at the same step
                    state.stopped_by = hook_stop
                if stopping or hook_stop or (cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0):
                    checkpoint(state.step)
                if hook_stop:
                    stopped_by = hook_stop
                elif stopping:
                    stopped_by, finished = "signal", True
                if finished:
                    break
            if seen == 0:
                raise UserError(f"epoch {epoch} produced no training batch on process {accelerator.process_index}")
            epoch += 1
        if state.stopped_by and not stopped_by:
            stopped_by = state.stopped_by  # resumed from the checkpoint a step hook's stop wrote: nothing more to do
        if not stopped_by:
            stopped_by = "schedule" if state.step < cfg.max_train_steps else "max_steps"
            # A final checkpoint, so a job requeued after this point resumes at the end instead of redoing steps.
            if cfg.checkpointing_steps and state.step % cfg.checkpointing_steps and state.step > (resumed_step or 0):
                checkpoint(state.step)

    progress.close()
    if state.skipped_steps:
        accelerator.print(f"The fp16 loss scaler skipped {state.skipped_steps} update(s) with inf/NaN gradients; "
                          f"they are not counted as steps.")
    check_ranks_agree(accelerator, trainable)
    if stopped_by == "signal":
        accelerator.print(f"Stopped by signal {stop.signum} at step {state.step}; checkpoint and files saved.")
    if accelerator.is_main_process:
        files += outputs.final(state.step, optimizer)
        if log:
            log.flush()
    ctx.stopped_by = stopped_by
    for hook in hooks:
        files += hook.finish(state.step, ctx)
    if outputs.preview and stopped_by != "signal" and previewed != state.step:
        _preview(accelerator, trainable, outputs, state.step)
    accelerator.wait_for_everyone()
    return RunSummary(state.step, stopped_by, files, state.skipped_steps)


class TrainingDiverged(UserError):
    pass


# fp16 updates the loss scaler may skip in a row before the run counts as diverged: the scaler halves its scale on
# each skip, so this many in a row means the loss or gradients are non-finite at any scale, not a calibration.
MAX_SKIPPED_IN_A_ROW = 50


def check_ranks_agree(accelerator: Accelerator, trainable: Trainable) -> None:
    """Every rank must hold bit-identical trained weights; a silent DDP sync failure is caught here (gradients
    reach DDP only through the wrapped module's forward, see utils/distributed.py)."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().double().flatten() for p in trainable.parameters()])
    digest = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(1, flat.numel() + 1,
                          dtype=torch.float64, device=flat.device)).sum()]).to(accelerator.device)
    gathered = accelerator.gather(digest[None])
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"the {accelerator.num_processes} processes hold different trained weights "
                           f"({gathered.tolist()}); gradients were not synchronised")
    accelerator.print(f"Checked: all {accelerator.num_processes} processes hold identical trained weights.")


def _preview(accelerator: Accelerator, trainable: Trainable, outputs: Outputs, step: int) -> None:
    """Previews on the main process; the others wait. Generation uses its own generators (training RNG untouched)."""
    if accelerator.is_main_process:
        trainable.train(False)
        try:
            images = outputs.preview(step)
        finally:
            trainable.train()
        _log_images(accelerator, images, step)
    accelerator.wait_for_everyone()


def make_accelerator(output_dir: Path, mixed_precision: str, gradient_accumulation_steps: int, report_to: str,
                     seed: int, cpu: bool = False, ddp_timeout: float | None = None,
                     logging_dir: str = "logs") -> Accelerator:
    """``ddp_timeout`` (seconds): how long a rank waits in a collective before failing, so a dead or stuck rank
    ends the others with an error instead of a hang (None: the backend's default)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    from utils.cluster import check_world_size, cpu_only_multiprocess_launch

    log_with = None if report_to == "none" else (["wandb", "tensorboard"] if report_to == "all" else report_to)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout))] if ddp_timeout else []
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / logging_dir)),
        # Several launched processes on a GPU-less machine: without cpu=True accelerate would run each one alone.
        cpu=cpu or cpu_only_multiprocess_launch(),
        kwargs_handlers=handlers,
    )
    check_world_size(accelerator.num_processes)
    set_seed(seed)
    return accelerator


def config_for_trackers(obj) -> dict:
    """A flat, JSON-safe config without secrets, for trackers and the settings file."""
    secret = re.compile(r"(^|_)(hub_token|api_key|secret|password|auth_token|wandb_key)($|_)", re.IGNORECASE)
    raw = asdict(obj) if hasattr(obj, "__dataclass_fields__") else dict(obj)
    out = {}
    for k, v in raw.items():
        if secret.search(k):
            continue
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out
