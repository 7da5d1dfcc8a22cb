"""Preemption end to end on 2 CPU processes: SIGUSR1 -> checkpoint -> the same command again -> identical result.

The interrupted run goes through slurm/launch_node.sh, the script srun starts on every node, and gets SIGUSR1 the
way srun delivers it (to that task); the trainer must stop at a step boundary, and the relaunch (the same command,
as a requeued Slurm job runs it) must give the vectors, CSV log and W&B history of an uninterrupted run. Also: a
rank killed with SIGKILL ends the run with an error, and a stuck rank makes the others fail after --ddp_timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# This interpreter's accelerate, whatever is on PATH (a console script may be missing or belong to another Python).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
NAME = "cl-emb"
STEPS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_RUN_GROUP"))}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def accelerate_on_path(tmp_path_factory) -> str:
    """A PATH whose `accelerate` is this interpreter's (slurm/launch_node.sh calls `accelerate launch`, as a user's
    job does inside its environment): the test does not depend on what the caller's PATH holds."""
    bindir = tmp_path_factory.mktemp("bin")
    shim = bindir / "accelerate"
    shim.write_text(f'#!/bin/sh\n[ "$1" = launch ] && shift\nexec "{sys.executable}" -m accelerate.commands.launch "$@"\n')
    shim.chmod(0o755)
    return f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo number {i}")
    return folder


def _train_args(model: Path, data: Path, out: Path, **over) -> list[str]:
    opts = {"--pretrained_model_name_or_path": model, "--train_data_dir": data, "--placeholder_token": NAME,
            "--initializer_token": "ball", "--resolution": 64, "--train_batch_size": 1, "--max_train_steps": STEPS,
            "--output_dir": out, "--checkpointing_steps": 4, "--save_every": 0, "--preview_every": 10,
            "--preview_steps": 2, "--report_to": "wandb", "--seed": 3, "--learning_rate": "0.02"}
    opts.update(over)
    return ["train_textual_inversion.py"] + [str(x) for kv in opts.items() for x in kv]


def _checkpoint_steps(out: Path) -> list[int]:
    from utils.training import list_checkpoints

    return [s for s, _ in list_checkpoints(out)]


def _node_env(port: int, path: str, **extra) -> dict:
    """What slurm/common.sh exports for launch_node.sh, for one machine with the CPU config."""
    return _env(EF_NUM_MACHINES="1", EF_NUM_PROCESSES="2", EF_MAIN_ADDR="127.0.0.1", EF_MAIN_PORT=str(port),
                EF_ACCELERATE_CONFIG=str(CPU_CONFIG), SLURM_NODEID="0", PATH=path, **extra)


def _run_node(args: list[str], env: dict, log: Path, signal_when=None, timeout=400) -> tuple[int, str]:
    """Run launch_node.sh like srun would; optionally send it SIGUSR1 (as srun forwards it) once signal_when()."""
    with open(log, "w") as f:
        p = subprocess.Popen(["bash", str(ROOT / "slurm" / "launch_node.sh"), *args], cwd=ROOT, env=env,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            if signal_when is not None:
                while not signal_when() and p.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                _kill_tree(p.pid)
    return p.returncode, log.read_text(errors="replace")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _kill_tree(pid: int) -> None:
    for c in _children(pid):
        _kill_tree(c)
        try:
            os.kill(c, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# Reading W&B's offline run files back (LevelDB-style log of protobuf records)


def _wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            yield _parse(pb, chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield _parse(pb, pending + chunk)


def _parse(pb, raw: bytes):
    r = pb.Record()
    r.ParseFromString(raw)
    return r


def _wandb_runs(out: Path) -> list[dict]:
    """Each offline run folder (in start order): run id, group, tags, and history rows keyed by _step."""
    import json

    runs = []
    for folder in sorted((out / "wandb").glob("offline-run-*")):
        info = {"folder": folder, "history": {}, "media": sorted((folder / "files").rglob("*.png"))}
        for rec in _wandb_records(next(folder.glob("*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, group=rec.run.run_group, tags=list(rec.run.tags),
                            name=rec.run.display_name)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                info["history"][int(row["_step"])] = row
        runs.append(info)
    return runs


def _vectors(out: Path) -> torch.Tensor:
    from utils.embeddings import load_embedding

    return load_embedding(out / f"{NAME}.pt").vectors


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd1, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    args = _train_args(tiny_sd1, images, out)
    p = subprocess.run([*LAUNCH, "--config_file", str(CPU_CONFIG), "--main_process_port",
                        str(_free_port()), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_sigusr1_checkpoint_requeue_resume_is_identical(tiny_sd1, images, uninterrupted, accelerate_on_path,
                                                       tmp_path):
    out = tmp_path / "out"
    # The command a Slurm start runs, first or requeued: the sbatch template always adds `--resume_from_checkpoint
    # latest`, and a W&B group per Slurm job comes from SLURM_JOB_ID.
    args = _train_args(tiny_sd1, images, out, **{"--resume_from_checkpoint": "latest", "--wandb_tags": "t1,t2"})
    env = _node_env(_free_port(), accelerate_on_path, SLURM_JOB_ID="4242")
    tags_wired = "add_cluster_args" in (ROOT / "train_textual_inversion.py").read_text()
    if not tags_wired:  # utils.cluster's flags are not in the script yet
        args = args[:args.index("--wandb_tags")] + args[args.index("--wandb_tags") + 2:]

    rc, log1 = _run_node(args, env, tmp_path / "first.log", signal_when=lambda: 4 in _checkpoint_steps(out))
    assert rc == 0, log1[-4000:]
    assert "Stopped by signal" in log1
    stopped = _checkpoint_steps(out)
    assert stopped[0] == 4 and 4 <= stopped[-1] < STEPS, (stopped, log1[-3000:])
    first_csv = (out / "textual_inversion_loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in first_csv[1:]] == list(range(1, stopped[-1] + 1))

    rc, log2 = _run_node(args, _node_env(_free_port(), accelerate_on_path, SLURM_JOB_ID="4242"),
                         tmp_path / "second.log")
    assert rc == 0, log2[-4000:]
    assert f"at step {stopped[-1]}" in log2  # "Resumed from ... at step k"

    # Vectors: bit-identical to the run that was never interrupted, in both output formats.
    assert torch.equal(_vectors(out), _vectors(uninterrupted))
    from safetensors.torch import load_file

    a, b = load_file(out / "learned_embeds.safetensors"), load_file(uninterrupted / "learned_embeds.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # CSV log: every step exactly once, the same losses as the uninterrupted run.
    csv_cut = (out / "textual_inversion_loss.csv").read_text()
    csv_full = (uninterrupted / "textual_inversion_loss.csv").read_text()
    assert [int(r.split(",")[0]) for r in csv_cut.splitlines()[1:]] == list(range(1, STEPS + 1))
    assert csv_cut == csv_full

    # W&B: two offline segments of ONE run (same id), steps 0..k then k+1..30, nothing twice, nothing missing. Step 0
    # is the evaluation before the first step (on by default with a folder of pictures); the requeued segment does
    # not evaluate its start again.
    runs = _wandb_runs(out)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"], [(r.get("id"), r["folder"].name) for r in runs]
    first, second = sorted(runs[0]["history"]), sorted(runs[1]["history"])
    assert first == list(range(0, stopped[-1] + 1)) and second == list(range(stopped[-1] + 1, STEPS + 1))
    full = _wandb_runs(uninterrupted)
    assert len(full) == 1 and sorted(full[0]["history"]) == list(range(0, STEPS + 1))
    merged = {**runs[0]["history"], **runs[1]["history"]}
    for step in (1, stopped[-1], STEPS):
        assert merged[step]["loss"] == full[0]["history"][step]["loss"]
        assert merged[step]["vector_norm"] == full[0]["history"][step]["vector_norm"]
    for step in (0, 25):  # the evaluations (every 25 steps) of both runs agree
        assert merged[step]["eval_loss"] == full[0]["history"][step]["eval_loss"]
    assert all(set(r["history"][s]) >= {"loss", "lr", "vector_norm", "images_per_sec"}
               for r in runs for s in r["history"] if s > 0)
    # Slurm grouping and a stable name across the requeue; preview grids logged as images.
    assert runs[0]["group"] == runs[1]["group"] == "slurm-4242"
    assert runs[0]["tags"] == runs[1]["tags"] == (["t1", "t2", "slurm"] if tags_wired else ["slurm"])
    assert runs[0]["name"] == runs[1]["name"] == "out"
    assert all(any(k.startswith("preview/") for k in merged[s]) for s in (10, 20, 30))
    media = sorted(f.name.split("_")[1] for r in runs for f in r["media"])
    assert media == sorted(f.name.split("_")[1] for f in full[0]["media"]) == ["10", "20", "30"]


def test_a_killed_rank_ends_the_run_with_an_error(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    args = _train_args(tiny_sd1, images, out, **{"--max_train_steps": 100000, "--report_to": "none",
                                                 "--preview_every": 0})
    with open(tmp_path / "log", "w") as f:
        p = subprocess.Popen([*LAUNCH, "--config_file", str(CPU_CONFIG), "--main_process_port",
                              str(_free_port()), *args], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while 4 not in _checkpoint_steps(out) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = _children(p.pid)
        assert len(ranks) == 2, (ranks, (tmp_path / "log").read_text()[-3000:])
        os.kill(ranks[1], signal.SIGKILL)
        # The launcher notices the dead rank and stops the other one: the run ends (TimeoutExpired otherwise), long
        # before gloo's 30-minute default would end a rank waiting for its dead peer. No tighter bound: on a loaded
        # machine the tear-down alone can take tens of seconds.
        rc = p.wait(timeout=240)
    finally:
        if p.poll() is None:
            _kill_tree(p.pid)
            p.kill()
    assert rc != 0
    assert not any(Path(f"/proc/{r}").exists() and "zombie" not in Path(f"/proc/{r}/status").read_text()
                   for r in ranks)


HANG_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torch
from utils.training import make_accelerator

acc = make_accelerator(Path(sys.argv[2]), "no", 1, "none", 0, ddp_timeout=float(sys.argv[3]))
for i in range(100000):
    if i == 3 and acc.process_index == 1:
        print("rank 1 stuck", flush=True)
        time.sleep(600)  # a stuck rank: alive, but never joins the next collective
    t = time.monotonic()
    try:
        acc.reduce(torch.ones(1), "sum")
    except Exception as e:
        print(f"rank {acc.process_index} failed after {time.monotonic() - t:.1f} s: {type(e).__name__}", flush=True)
        raise SystemExit(3)
"""


def test_a_stuck_rank_fails_the_others_after_ddp_timeout(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(HANG_WORKER)
    # The stuck rank sleeps 600 s: the run ends before the timeout only if the launcher stops it once rank 0 failed.
    p = subprocess.run([*LAUNCH, "--config_file", str(CPU_CONFIG), "--main_process_port",
                        str(_free_port()), str(script), str(ROOT), str(tmp_path), "4"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "rank 1 stuck" in out, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("rank 0 failed after"))
    waited = float(line.split()[4])
    # the configured 4 s (never less), not gloo's default 30 minutes; the upper bound leaves room for a loaded machine
    assert 3.5 <= waited <= 120, line
