"""The Slurm templates on a real Slurm: slurm/local_slurm.sh runs one on this machine (two nodes sharing its CPUs).

Jobs are submitted as a user submits them (sbatch from the repository root, the template unchanged; a CPU machine
overrides the GPU request on the command line and picks the CPU accelerate config through ACCELERATE_CONFIG) and
preempted with the signal Slurm sends before a time limit (`scancel --signal=USR1 --batch`). Checked: the job
checkpoints, requeues itself and resumes exactly (vectors and loss log bit-identical to an uninterrupted run);
MAX_REQUEUES stops the requeueing; the multi-node template runs over two nodes (two srun tasks, node ranks 0 and 1)
and survives a preemption; a job array trains one embedding per task, with per-task outputs and a summary, and its
task with a bad flag fails once instead of being requeued.

Where Slurm cannot run (not root, or not installed and no package registry) these tests skip -- but fail when CI is
set: CI must never pass by skipping them (.ci/run starts the local Slurm first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SLURM = ROOT / "slurm" / "local_slurm.sh"
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
IMAGES = ROOT / "examples" / "sample_images"
CANNOT_RUN = 3  # local_slurm.sh's exit status for "Slurm cannot run here"
NAME = "sl-emb"
STEPS = 80  # enough steps after the first checkpoint that the signal always arrives before the end
EVERY = 10

pytestmark = pytest.mark.slow


def _unavailable(message: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    """Start the local Slurm unless it runs already (idempotent), and stop it afterwards only if we started it."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        _unavailable("the local Slurm needs root (slurm/local_slurm.sh runs its daemons as root)")
    running = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True, timeout=60)
    p = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=900)
    if p.returncode == CANNOT_RUN:
        _unavailable(p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, f"slurm/local_slurm.sh start failed:\n{p.stderr[-3000:]}"
    conf = p.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield conf
    if running.returncode != 0:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=180)


@pytest.fixture
def slurm(slurm_conf, tmp_path):
    s = Slurm(slurm_conf, tmp_path)
    yield s
    s.cancel_all()


class Slurm:
    """Submit and watch jobs like a user at a shell, with the environment a user's login shell would have."""

    def __init__(self, conf: str, logs: Path):
        self.conf, self.logs, self.jobs = conf, logs, []
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        venv = Path(sys.prefix)
        env.update(SLURM_CONF=conf, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   WANDB_MODE="offline", HF_HUB_OFFLINE="1",
                   # the template activates the environment itself, as it does for users (default: .venv here)
                   EMBEDFORGE_VENV=str(venv) if (venv / "bin" / "activate").is_file() else "",
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}:/usr/sbin:/sbin")
        self.env = env

    def run(self, *cmd: str, check=True) -> str:
        p = subprocess.run(list(cmd), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        assert not check or p.returncode == 0, f"{' '.join(cmd)}: {p.stderr}"
        return p.stdout

    def submit(self, template: str, script_args: list[str], *sbatch_opts: str, **env) -> str:
        """sbatch from the repository root; on a CPU machine the GPU request is overridden on the command line."""
        out = subprocess.run(
            ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={self.logs}/%x-%j.out",
             *sbatch_opts, f"slurm/{template}", *script_args],
            cwd=ROOT, env={**self.env, **env}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def info(self, job: str) -> list[dict]:
        """`scontrol show job` as one dict per job (one per task for an array)."""
        rows = []
        for line in self.run("scontrol", "show", "job", "-o", job).splitlines():
            rows.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
        return rows

    def state(self, job: str) -> dict:
        (row,) = self.info(job)
        return row

    def log(self, job: str) -> str:
        paths = sorted(self.logs.glob(f"*-{job}.out")) + sorted(self.logs.glob(f"*-{job}_*.out"))
        return "\n".join(p.read_text(errors="replace") for p in paths)

    def wait(self, what: str, ready, job: str, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; job {job}: {self.info(job)}\n"
                    f"{_tail(self.log(job))}", pytrace=False)

    def wait_end(self, job: str, timeout: float = 300, restarts: int | None = None) -> dict:
        """The job's final state; with `restarts`, also return as soon as it was requeued more often than that."""
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")

        def settled():
            s = self.state(job)
            return (s["JobState"] in done or (restarts is not None and int(s["Restarts"]) > restarts)) and s
        return self.wait(f"job {job} to end", settled, job, timeout)

    def preempt(self, job: str):
        """What `#SBATCH --signal=B:USR1@300` does near the time limit: SIGUSR1 to the batch shell only."""
        self.run("scancel", "--signal=USR1", "--batch", job)

    def start_now(self, job: str):
        """A requeued job waits about two minutes (Reason=BeginTime) before it may start again. Not sooner than a
        second after the requeue, though: the node refuses a job whose credential is from the same second as the
        revocation of the previous run's ("Job credential revoked") and Slurm then holds the job."""
        self.wait(f"job {job} to be requeued", lambda: self.state(job)["JobState"] == "PENDING", job, timeout=60)
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    def cancel_all(self):
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], env=self.env, capture_output=True, timeout=60)


def _tail(text: str, n: int = 40) -> str:
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.strip() and "it/s" not in x and "s/it" not in x]
    return "\n".join(lines[-n:])


def _train_args(model: Path, out: Path, **over) -> list[str]:
    opts = {"--pretrained_model_name_or_path": model, "--train_data_dir": IMAGES, "--placeholder_token": NAME,
            "--initializer_token": "ball", "--resolution": 64, "--train_batch_size": 1, "--max_train_steps": STEPS,
            "--output_dir": out, "--checkpointing_steps": EVERY, "--save_every": 0, "--preview_every": 0,
            "--report_to": "none", "--seed": 3}
    opts.update(over)
    return ["train_textual_inversion.py"] + [str(x) for kv in opts.items() for x in kv]


def _checkpoints(out: Path) -> list[int]:
    from utils.training import list_checkpoints

    return [s for s, _ in list_checkpoints(out)]


def _vectors(path: Path) -> torch.Tensor:
    from utils.embeddings import load_embedding

    return load_embedding(path).vectors


def _steps_logged(out: Path) -> list[int]:
    return [int(r.split(",")[0]) for r in (out / "textual_inversion_loss.csv").read_text().splitlines()[1:]]


def _signal_after_checkpoint(slurm: Slurm, job: str, out: Path, after: int, steps: int = STEPS) -> int:
    """Wait for the first periodic checkpoint past step `after`, then preempt; returns the step it stopped at."""
    slurm.wait(f"a checkpoint after step {after}", lambda: any(s > after for s in _checkpoints(out)), job)
    slurm.preempt(job)
    slurm.wait("the stop checkpoint", lambda: "checkpoint and files saved" in slurm.log(job).split(
        f"(restart {slurm.state(job)['Restarts']})")[-1], job, timeout=120)
    stopped = _checkpoints(out)[-1]
    assert stopped < steps, f"the job ended before the signal reached it:\n{_tail(slurm.log(job))}"
    return stopped


# ---------------------------------------------------------------------------------------------------------------


def test_one_node_preempt_requeue_resume_is_exact_and_max_requeues_stops_it(slurm, tiny_sd1, tmp_path):
    # The uninterrupted run (on the other node, at the same time) keeps a copy of the vectors at every step.
    full = tmp_path / "full"
    env = {"ACCELERATE_CONFIG": str(CPU_CONFIG)}
    base = slurm.submit("train_1node.sbatch", _train_args(tiny_sd1, full, **{"--save_every": 1}), **env)
    out = tmp_path / "out"
    job = slurm.submit("train_1node.sbatch", _train_args(tiny_sd1, out), **env, MAX_REQUEUES="1")

    # First signal: checkpoint, requeue (restart 1), resume from that checkpoint.
    first = _signal_after_checkpoint(slurm, job, out, after=0)
    slurm.start_now(job)
    slurm.wait("the requeued job to resume", lambda: f"at step {first}" in slurm.log(job), job)
    # Second signal: MAX_REQUEUES=1 is reached, so it checkpoints and ends instead of requeueing.
    second = _signal_after_checkpoint(slurm, job, out, after=first)
    end = slurm.wait_end(job, restarts=1)
    log = slurm.log(job)
    assert (end["JobState"], end["Restarts"], end["ExitCode"]) == ("COMPLETED", "1", "0:0"), _tail(log)
    assert log.count("requeueing job") == 1 and "not requeueing: already restarted 1 times (MAX_REQUEUES=1)" in log
    assert f"Resumed from {out / f'checkpoint-{first}'} at step {first}" in log

    base_end = slurm.wait_end(base)
    assert (base_end["JobState"], base_end["Restarts"]) == ("COMPLETED", "0"), _tail(slurm.log(base))
    # Bit-identical to the uninterrupted run at the step where it stopped, in both output formats; the loss log has
    # every step once, with the same values.
    same_step = _vectors(full / "embeddings" / f"{NAME}-{second}.pt")
    assert torch.equal(_vectors(out / f"{NAME}.pt"), same_step)
    assert torch.equal(_vectors(out / "learned_embeds.safetensors"), same_step)
    assert _steps_logged(out) == list(range(1, second + 1))
    full_csv = (full / "textual_inversion_loss.csv").read_text().splitlines()
    assert (out / "textual_inversion_loss.csv").read_text().splitlines() == full_csv[:second + 1]


def test_multinode_template_over_two_nodes_preempt_and_resume(slurm, tiny_sd1, tmp_path):
    nodes = slurm.run("sinfo", "-h", "-N", "-o", "%N").split()
    if len(nodes) < 2:
        _unavailable(f"the local Slurm has one node ({nodes}); the multi-node template needs two "
                     "(EMBEDFORGE_SLURM_NODES=2, a machine with 2 or more CPUs)")
    out = tmp_path / "out"
    # The template's own accelerate config (multi_node.yaml); ACCELERATE_USE_CPU=true puts the processes on the CPU.
    job = slurm.submit("train_multinode.sbatch", _train_args(tiny_sd1, out, **{"--max_train_steps": 40}), "--nodes=2")
    stopped = _signal_after_checkpoint(slurm, job, out, after=0, steps=40)
    slurm.start_now(job)
    end = slurm.wait_end(job)
    log = slurm.log(job)
    assert (end["JobState"], end["Restarts"], end["ExitCode"]) == ("COMPLETED", "1", "0:0"), _tail(log)
    assert log.count("2 node(s) x 1 process(es)") == 2
    # Both nodes' processes ran as one group of two, stopped together at one step and resumed from it.
    assert log.count("processes     2 (2 machine(s) x 1)") == 4
    for n in (0, 1):
        for r in (0, 1):
            assert f"slurm         job {job}, node {n} of 2, restart {r}" in log
    assert log.count(f"Stopped by signal 10 at step {stopped}") == 2
    assert log.count(f"Resumed from {out / f'checkpoint-{stopped}'} at step {stopped}") == 2
    assert _steps_logged(out) == list(range(1, 41))


def test_job_array_one_embedding_per_task_with_a_summary(slurm, tiny_sd1, tmp_path):
    runs, summary = tmp_path / "runs", tmp_path / "summary"
    listing = tmp_path / "embeddings.txt"
    listing.write_text(f"# one embedding per line\n"
                       f"--placeholder_token arr-a --output_dir {runs}/a --seed 1\n\n"
                       f"--placeholder_token 'arr-b' --output_dir {runs}/b --seed 2\n"
                       f"--placeholder_token arr-c --output_dir {runs}/c --no_such_flag\n")
    common = _train_args(tiny_sd1, runs / "unused", **{"--max_train_steps": 6, "--checkpointing_steps": 0})
    job = slurm.submit("train_array.sbatch", [str(listing), *common], "--array=0-2",
                       f"--output={slurm.logs}/%x-%A_%a.out", ACCELERATE_CONFIG=str(CPU_CONFIG),
                       ARRAY_SUMMARY_DIR=str(summary))
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    tasks = slurm.wait("all array tasks to end", lambda: (rows := slurm.info(job)) and len(rows) == 3 and all(
        r["JobState"] in done for r in rows) and rows, job, timeout=400)
    by_task = {int(r["ArrayTaskId"]): r for r in tasks}
    log = slurm.log(job)
    assert [by_task[i]["JobState"] for i in range(3)] == ["COMPLETED", "COMPLETED", "FAILED"], _tail(log, 80)
    # the bad flag fails once, with the trainer's one-line error; nothing requeues it
    assert by_task[2]["Restarts"] == "0" and by_task[2]["ExitCode"] != "0:0"
    assert "requeue" not in log

    # per-task outputs: each task trained its own line
    a, b = _vectors(runs / "a" / "arr-a.pt"), _vectors(runs / "b" / "arr-b.pt")
    assert a.shape == b.shape and not torch.equal(a, b)
    assert not (runs / "unused").exists() and not (runs / "c").exists()

    rows = json.loads((summary / "summary.json").read_text())
    assert [(r["task"], r["state"], r["status"], r["restarts"], r["step"]) for r in rows] == [
        (0, "done", 0, 0, 6), (1, "done", 0, 0, 6), (2, "failed", int(by_task[2]["ExitCode"].split(":")[0]), 0, None)]
    assert rows[0]["output_dir"] == str(runs / "a") and "arr-a.pt" in rows[0]["files"]
    assert "learned_embeds.safetensors" in rows[1]["files"]
    assert "unrecognized arguments: --no_such_flag" in rows[2]["error"]
    text = (summary / "summary.txt").read_text()
    assert text.startswith("3 task(s): 2 done, 1 failed")
