"""Running on clusters: the Slurm job we are in, threads per rank, launch checks, a start-up summary, W&B extras.

The Slurm side of a run (addresses, ranks, requeue) lives in slurm/*.sbatch; this module is what the Python
processes need to know about it. Nothing here starts processes or talks to Slurm.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from utils.errors import UserError


# ---------------------------------------------------------------------------------------------------------------
# Flags


# Collective timeout: PyTorch's NCCL default (600 s) can end a healthy run while the main process renders SDXL
# previews or writes to slow shared storage and the others wait at a barrier. A rank that dies is noticed by the
# launcher within seconds anyway; only a rank that hangs alive waits this long.
DEFAULT_DDP_TIMEOUT = 1800.0


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clusters")
    g.add_argument("--ddp_timeout", type=float, default=DEFAULT_DDP_TIMEOUT, metavar="SECONDS",
                   help="How long a process waits for the others in a collective (gradient sync, barrier) before it "
                        "fails with an error instead of hanging, e.g. when another rank hangs. Default 1800 (PyTorch's "
                        "own is 600 s with NCCL on GPUs). Keep it above the longest stretch one rank works alone "
                        "(previews and saves on the main process, --enable_buckets / --verify_images "
                        "reading a large folder at start).")
    g.add_argument("--wandb_tags", default="", metavar="TAG,TAG",
                   help="Comma-separated W&B tags for the run (a 'slurm' tag is added inside Slurm jobs).")


def parse_tags(value) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [t.strip() for t in items if str(t).strip()]


# ---------------------------------------------------------------------------------------------------------------
# Slurm


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    array_job_id: str | None
    node_id: int
    num_nodes: int
    nodelist: str
    restart_count: int
    gpus_on_node: int | None
    cpus_per_task: int | None

    @property
    def group(self) -> str:
        """One W&B group per submitted job (per array for job arrays); a requeued job keeps its id."""
        return f"slurm-{self.array_job_id or self.job_id}"


def parse_gpu_count(value: str | None) -> int | None:
    """Slurm's GPU counts come as '4', 'a100:4' or 'gpu:a100:4'."""
    if not value:
        return None
    m = re.search(r"(\d+)\s*$", value.split("(")[0])
    return int(m.group(1)) if m else None


def slurm_job(environ: Mapping[str, str] | None = None) -> SlurmJob | None:
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None

    def _int(name: str, default: int | None) -> int | None:
        try:
            return int(env[name])
        except (KeyError, ValueError):
            return default

    return SlurmJob(
        job_id=job_id, array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None, node_id=_int("SLURM_NODEID", 0),
        num_nodes=_int("SLURM_NNODES", None) or _int("SLURM_JOB_NUM_NODES", 1),
        nodelist=env.get("SLURM_JOB_NODELIST", ""),
        restart_count=_int("SLURM_RESTART_COUNT", 0),
        gpus_on_node=_int("SLURM_GPUS_ON_NODE", None) or parse_gpu_count(env.get("SLURM_GPUS_PER_NODE")),
        cpus_per_task=_int("SLURM_CPUS_PER_TASK", None))


# ---------------------------------------------------------------------------------------------------------------
# Processes and threads


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (cgroups/cpusets), not the whole machine
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """CPU threads one rank should use: an explicit OMP_NUM_THREADS, else the CPUs this node's job step has divided
    by the ranks on this node (LOCAL_WORLD_SIZE, set by the launcher). Ranks that each take every core slow each other
    down badly (2 ranks x 2 threads on 2 cores ran 25x slower, field notes)."""
    env = os.environ if environ is None else environ
    explicit = env.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    local = int(env.get("LOCAL_WORLD_SIZE") or 1)
    if cpus is None:
        cpus = int(env["SLURM_CPUS_PER_TASK"]) if env.get("SLURM_CPUS_PER_TASK", "").isdigit() else _available_cpus()
    return max(1, cpus // max(1, local))


def apply_threads_per_rank() -> int:
    """Set torch's intra-op threads for this process to threads_per_rank(); returns the number."""
    import torch

    n = threads_per_rank()
    torch.set_num_threads(n)
    return n


def cpu_only_multiprocess_launch(environ: Mapping[str, str] | None = None) -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1) on a machine with no GPU/accelerator.

    accelerate then runs every process on its own as rank 0 of 1 (all writing the same files) unless it is told to
    use the CPU; `accelerate launch --cpu --num_processes 2` instead starts one process. See docs/cluster.md."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE") or 1) <= 1:
        return False
    import torch

    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not has_device


def check_world_size(num_processes: int, environ: Mapping[str, str] | None = None) -> None:
    """The processes the launcher started must all be in one process group (see cpu_only_multiprocess_launch), and
    a launcher that was asked for more processes than it started is reported in one line (launcher_shortfall)."""
    env = os.environ if environ is None else environ
    launched = int(env.get("WORLD_SIZE") or 1)
    if launched != num_processes:
        raise UserError(
            f"the launcher started {launched} processes but accelerate joined them into a group of {num_processes}; "
            "on a machine without GPUs launch with ACCELERATE_USE_CPU=true and --multi_gpu "
            "(configs/accelerate/cpu_2proc.yaml), see docs/cluster.md")
    shortfall = launcher_shortfall(num_processes, env)
    if shortfall:
        print(f"warning: {shortfall}", file=sys.stderr, flush=True)


_MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_shortfall(num_processes: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Why this run has one process although ``accelerate launch`` was asked for several, or None.

    accelerate's single-process launcher (what ``--cpu``, ``use_cpu: true`` and a bare ``--num_processes N`` on a
    machine without GPUs end up in) sets MASTER_ADDR only when it was given more than one process or machine, and
    starts one process anyway; a launcher that really starts several sets WORLD_SIZE (torchrun) or an MPI size."""
    env = os.environ if environ is None else environ
    from_accelerate = "ACCELERATE_USE_CPU" in env and "ACCELERATE_MIXED_PRECISION" in env
    several_asked = bool(env.get("MASTER_ADDR"))
    started_one = not env.get("WORLD_SIZE") and not any(env.get(k) for k in _MPI_WORLD_SIZES)
    if not (num_processes == 1 and from_accelerate and several_asked and started_one):
        return None
    return ("accelerate launch was asked for several processes but started only this one (its single-process "
            "launcher runs for --cpu, use_cpu: true, or --num_processes N on a machine without GPUs); for N "
            "processes on CPUs use: ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch --multi_gpu "
            "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no SCRIPT ... "
            "(or --config_file configs/accelerate/cpu_2proc.yaml)")


# ---------------------------------------------------------------------------------------------------------------
# Start-up summary


def attention_backend(unet) -> str:
    """What the UNet's attention runs on, from its processors' classes; hypernetwork processors are named with the
    processor they run (SDPA or xformers), which is what decides speed and memory."""
    known = {"AttnProcessor2_0": "torch SDPA", "AttnProcessor": "plain attention (no SDPA)",
             "XFormersAttnProcessor": "xformers"}

    def describe(processor) -> str:
        from utils.hypernetwork import HypernetworkAttnProcessor

        if isinstance(processor, HypernetworkAttnProcessor):
            return f"{describe(processor.original)} with hypernetworks"
        name = type(processor).__name__
        return known.get(name, name)

    return ", ".join(sorted({describe(p) for p in unet.attn_processors.values()})) or "none"


@dataclass
class RunPlan:
    """What a run is about to do, printed once at start-up by the main process."""

    world_size: int
    num_machines: int
    device: str
    train_batch_size: int
    gradient_accumulation_steps: int
    max_train_steps: int
    steps_per_epoch: int
    mixed_precision: str
    attention: str
    dataset_examples: int
    output_dir: Path
    dataset_kind: str = "folder"
    dataset_shards: int | None = None
    dataloader_num_workers: int = 0
    threads_per_rank: int = 1
    trackers: str = "none"
    ddp_timeout: float | None = None
    slurm: SlurmJob | None = None

    @property
    def global_batch(self) -> int:
        return self.train_batch_size * self.gradient_accumulation_steps * self.world_size

    def describe(self) -> str:
        per_machine = max(1, self.world_size // max(1, self.num_machines))
        data = f"{self.dataset_examples} example(s) ({self.dataset_kind}"
        data += f", {self.dataset_shards} shard(s))" if self.dataset_shards else ")"
        timeout = f"{self.ddp_timeout:g} s" if self.ddp_timeout else "backend default"
        lines = [
            "Run plan:",
            f"  processes     {self.world_size} ({self.num_machines} machine(s) x {per_machine}) on {self.device}, "
            f"{self.threads_per_rank} CPU thread(s) and {self.dataloader_num_workers} loader worker(s) per process, "
            f"collective timeout {timeout}",
            f"  global batch  {self.global_batch} = {self.train_batch_size} per process x "
            f"{self.gradient_accumulation_steps} accumulation x {self.world_size} process(es)",
            f"  steps         {self.max_train_steps} ({self.steps_per_epoch} per epoch)",
            f"  precision     {self.mixed_precision}; attention: {self.attention}",
            f"  data          {data}",
            f"  outputs       {Path(self.output_dir).resolve()}",
            f"  trackers      {self.trackers}",
        ]
        if self.slurm:
            s = self.slurm
            lines.append(
                f"  slurm         job {s.job_id}, node {s.node_id} of {s.num_nodes}, restart {s.restart_count}")
        return "\n".join(lines)


def run_plan(accelerator, **fields) -> RunPlan:
    """A RunPlan with the process layout, device, precision, threads and Slurm job filled in from the running
    accelerator and environment; the caller gives the training fields (batch, steps, data, attention, outputs)."""
    world = accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    layout = {"world_size": world, "num_machines": max(1, world // max(1, local)), "device": str(accelerator.device),
              "mixed_precision": str(accelerator.mixed_precision), "threads_per_rank": threads_per_rank(),
              "slurm": slurm_job()}
    return RunPlan(**{**layout, **fields})


# ---------------------------------------------------------------------------------------------------------------
# W&B


def wandb_tags(tracker_config: Mapping, job: SlurmJob | None) -> list[str]:
    """--wandb_tags (it reaches the loop inside the tracker config) plus 'slurm' for runs inside a Slurm job."""
    tags = parse_tags(tracker_config.get("wandb_tags"))
    if job and "slurm" not in tags:
        tags.append("slurm")
    return tags


def log_output_artifact(accelerator, name: str, kind: str, files: list[Path], metadata: dict | None = None) -> bool:
    """Upload the run's final files as one W&B artifact (main process; offline runs keep it for `wandb sync`).
    Returns False when W&B is not in use."""
    if not accelerator.is_main_process:
        return False
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return False
    if run is None or not hasattr(run, "log_artifact"):
        return False
    import wandb

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "output"
    artifact = wandb.Artifact(safe, type=kind, metadata=dict(metadata or {}))
    existing = [Path(f) for f in files if Path(f).is_file()]
    for f in existing:
        artifact.add_file(str(f), name=f.name)
    if not existing:
        return False
    run.log_artifact(artifact)
    return True
