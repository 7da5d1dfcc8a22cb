"""Cluster recipes: accelerate configs, the Slurm templates (syntax, dry runs on fake allocations, the SIGUSR1 ->
requeue flow with stand-ins for srun/accelerate/scontrol), and utils/cluster.py (Slurm env, threads, launch checks,
start-up summary, W&B options)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils import cluster
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "slurm"
CONFIGS = ROOT / "configs" / "accelerate"
TEMPLATES = ["train_1node.sbatch", "train_multinode.sbatch", "train_array.sbatch", "train_concepts_array.sbatch"]


# ---------------------------------------------------------------------------------------------------------------
# accelerate configs


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu_1node", "multi_node", "cpu_2proc"])
def test_accelerate_configs_load_and_say_when_to_use_them(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# Use when:")
    cfg = load_config_from_file(str(path))
    expected = {"single_gpu": ("NO", 1, 1), "multi_gpu_1node": ("MULTI_GPU", 1, 8), "multi_node": ("MULTI_GPU", 2, 16),
                "cpu_2proc": ("MULTI_GPU", 1, 2)}[name]
    assert (str(cfg.distributed_type).split(".")[-1], cfg.num_machines, cfg.num_processes) == expected
    # The CPU file must not say use_cpu: that makes accelerate start a single process (the launcher trap).
    assert cfg.use_cpu is False


# ---------------------------------------------------------------------------------------------------------------
# Slurm templates: syntax and dry runs


@pytest.mark.parametrize("name", TEMPLATES + ["common.sh", "launch_node.sh", "local_slurm.sh"])
def test_bash_syntax(name):
    p = subprocess.run(["bash", "-n", str(SLURM / name)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_ask_for_preemption_signal_and_requeue(name):
    lines = (SLURM / name).read_text().splitlines()
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
    assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in lines)


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fakebin(tmp_path) -> Path:
    """A stand-in `scontrol`: expands the node lists these tests use and records every other call."""
    d = tmp_path / "bin"
    d.mkdir()
    _write_exe(d / "scontrol", """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then
  case "$3" in
    'gpu[07-09]') printf 'gpu07\\ngpu08\\ngpu09\\n' ;;
    *) echo "$3" ;;
  esac
else
  echo "scontrol $*" >> "$CALLS"
fi
""")
    return d


def _slurm_env(fakebin: Path, calls: Path, **slurm) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("OMP_NUM_THREADS", "GPUS_PER_NODE", "MAIN_PORT")}
    env.update(PATH=f"{fakebin}:{env['PATH']}", CALLS=str(calls), EMBEDFORGE_DIR=str(ROOT), EMBEDFORGE_VENV="")
    env.update({k: str(v) for k, v in slurm.items()})
    return env


def _dry_run(template: str, env: dict, *args: str) -> tuple[list[str], list[str]]:
    p = subprocess.run(["bash", str(SLURM / template), *args], env={**env, "DRY_RUN": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    srun_line, accel_line = [line for line in p.stdout.splitlines() if line.strip()]
    return shlex.split(srun_line), shlex.split(accel_line)


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("node_id", [0, 2])
def test_multinode_dry_run_ranks_addresses_and_counts(fakebin, tmp_path, node_id):
    env = _slurm_env(fakebin, tmp_path / "calls", SLURM_JOB_ID=123456, SLURM_JOB_NODELIST="gpu[07-09]",
                     SLURM_NNODES=3, SLURM_NODEID=node_id, SLURM_GPUS_PER_NODE="a100:4", SLURM_CPUS_PER_TASK=32)
    srun, accel = _dry_run("train_multinode.sbatch", env, "train_textual_inversion.py", "--config", "run.yaml")
    assert srun[:5] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=32" in srun
    assert srun[srun.index("bash") + 1] == str(SLURM / "launch_node.sh")
    assert accel[:2] == ["accelerate", "launch"]
    assert _opt(accel, "--config_file") == str(CONFIGS / "multi_node.yaml")
    assert _opt(accel, "--num_machines") == "3"
    assert _opt(accel, "--num_processes") == "12"  # 3 nodes x 4 GPUs
    assert _opt(accel, "--machine_rank") == str(node_id)
    assert _opt(accel, "--main_process_ip") == "gpu07"  # first host of the allocation, on every node
    assert _opt(accel, "--main_process_port") == str(20000 + 123456 % 20000)
    script_args = accel[accel.index("train_textual_inversion.py"):]
    assert script_args == ["train_textual_inversion.py", "--config", "run.yaml", "--resume_from_checkpoint", "latest"]
    assert srun[srun.index("train_textual_inversion.py"):] == script_args


def test_one_node_dry_run(fakebin, tmp_path):
    env = _slurm_env(fakebin, tmp_path / "calls", SLURM_JOB_ID=99, SLURM_JOB_NODELIST="node17", SLURM_NNODES=1,
                     SLURM_NODEID=0, SLURM_GPUS_ON_NODE=4, MAIN_PORT=31000)
    srun, accel = _dry_run("train_1node.sbatch", env, "train_hypernetwork.py",
                           "--resume_from_checkpoint=out/checkpoint-500", "--output_dir", "out")
    assert srun[:3] == ["srun", "--nodes=1", "--ntasks=1"]
    assert _opt(accel, "--config_file") == str(CONFIGS / "multi_gpu_1node.yaml")
    assert (_opt(accel, "--num_machines"), _opt(accel, "--num_processes"), _opt(accel, "--machine_rank")) == \
        ("1", "4", "0")
    assert (_opt(accel, "--main_process_ip"), _opt(accel, "--main_process_port")) == ("node17", "31000")
    # a resume flag the user gave is kept and not doubled
    assert accel[accel.index("train_hypernetwork.py"):] == [
        "train_hypernetwork.py", "--resume_from_checkpoint=out/checkpoint-500", "--output_dir", "out"]


def test_array_dry_run_takes_the_tasks_line_after_the_common_flags(fakebin, tmp_path):
    listing = tmp_path / "embeddings.txt"
    listing.write_text("# comment\n--placeholder_token a --output_dir runs/a\n\n"
                       "--placeholder_token 'b c' --output_dir runs/b  # trailing comment\n")
    env = _slurm_env(fakebin, tmp_path / "calls", SLURM_JOB_ID=12, SLURM_ARRAY_JOB_ID=11, SLURM_ARRAY_TASK_ID=1,
                     SLURM_JOB_NODELIST="node3", SLURM_NNODES=1, SLURM_GPUS_ON_NODE=1,
                     ARRAY_SUMMARY_DIR=str(tmp_path / "summary"))
    env["PATH"] = f"{fakebin}:{Path(sys.executable).parent}:{env['PATH']}"  # the template runs `python -m tools...`
    srun, accel = _dry_run("train_array.sbatch", env, str(listing), "train_textual_inversion.py", "--config", "c.yaml",
                           "--output_dir", "runs/common")
    assert _opt(accel, "--config_file") == str(CONFIGS / "multi_gpu_1node.yaml")
    assert accel[accel.index("train_textual_inversion.py"):] == [
        "train_textual_inversion.py", "--config", "c.yaml", "--output_dir", "runs/common",
        "--placeholder_token", "b c", "--output_dir", "runs/b", "--resume_from_checkpoint", "latest"]
    assert not (tmp_path / "summary").exists()  # a dry run records nothing


def test_concepts_array_dry_run_trains_the_tasks_slice_as_one_batched_run(fakebin, tmp_path):
    concepts = tmp_path / "concepts.csv"
    concepts.write_text("name,train_data_dir\n" + "".join(f"c{i},data/c{i}\n" for i in range(5)))
    env = _slurm_env(fakebin, tmp_path / "calls", SLURM_JOB_ID=12, SLURM_ARRAY_JOB_ID=11, SLURM_ARRAY_TASK_ID=1,
                     SLURM_JOB_NODELIST="node3", SLURM_NNODES=1, SLURM_GPUS_ON_NODE=1, EMBEDDINGS_PER_TASK=2,
                     ARRAY_SUMMARY_DIR=str(tmp_path / "summary"))
    env["PATH"] = f"{fakebin}:{Path(sys.executable).parent}:{env['PATH']}"  # the template runs `python -m utils...`
    runs = tmp_path / "runs"
    srun, accel = _dry_run("train_concepts_array.sbatch", env, str(concepts), "train_textual_inversion.py",
                           "--config", "c.yaml", "--output_dir", str(runs))
    task = runs / "task-00001"
    assert accel[accel.index("train_textual_inversion.py"):] == [
        "train_textual_inversion.py", "--config", "c.yaml", "--output_dir", str(runs),
        "--concepts", str(task / "concepts.json"), "--output_dir", str(task), "--resume_from_checkpoint", "latest"]
    import json

    assert [e["name"] for e in json.loads((task / "concepts.json").read_text())] == ["c2", "c3"]


def test_array_task_without_a_line_fails_with_one_line(fakebin, tmp_path):
    listing = tmp_path / "embeddings.txt"
    listing.write_text("--output_dir a\n--output_dir b\n")
    env = _slurm_env(fakebin, tmp_path / "calls", SLURM_JOB_ID=12, SLURM_ARRAY_JOB_ID=11, SLURM_ARRAY_TASK_ID=2,
                     SLURM_ARRAY_TASK_COUNT=3, SLURM_JOB_NODELIST="node3", SLURM_NNODES=1,
                     ARRAY_SUMMARY_DIR=str(tmp_path / "summary"))
    env["PATH"] = f"{fakebin}:{Path(sys.executable).parent}:{env['PATH']}"  # the template runs `python -m tools...`
    p = subprocess.run(["bash", str(SLURM / "train_array.sbatch"), str(listing), "train_textual_inversion.py"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "error: array task 2 has no line: the list has 2 embedding line(s), so submit with --array=0-1" in p.stderr
    summary = (tmp_path / "summary" / "summary.txt").read_text()
    assert summary.startswith("3 task(s): 1 failed, 2 no result") and "task 2: failed (status 2" in summary


@pytest.mark.parametrize("gpu_env, expected", [
    ({"SLURM_GPUS_ON_NODE": "8"}, "16"),
    ({"SLURM_GPUS_PER_NODE": "gpu:h100:2(x2)"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "3"}, "6"),
    ({"GPUS_PER_NODE": "5", "SLURM_GPUS_ON_NODE": "8"}, "10"),
    ({}, "2"),  # no GPU information (and no nvidia-smi here): one process per node
])
def test_gpu_count_sources(fakebin, tmp_path, gpu_env, expected):
    env = _slurm_env(fakebin, tmp_path / "calls", SLURM_JOB_ID=5, SLURM_JOB_NODELIST="a,b", SLURM_NNODES=2,
                     SLURM_NODEID=1, **gpu_env)
    env["PATH"] = f"{fakebin}:/usr/bin:/bin"  # no nvidia-smi
    _, accel = _dry_run("train_multinode.sbatch", env, "train_textual_inversion.py")
    assert _opt(accel, "--num_processes") == expected


def test_usage_and_outside_slurm_errors(fakebin, tmp_path):
    env = _slurm_env(fakebin, tmp_path / "calls", SLURM_JOB_ID=5, SLURM_JOB_NODELIST="a", SLURM_NNODES=1)
    p = subprocess.run(["bash", str(SLURM / "train_1node.sbatch")], env={**env, "DRY_RUN": "1"},
                       capture_output=True, text=True)
    assert p.returncode == 2 and "usage: sbatch" in p.stderr
    bare = _slurm_env(fakebin, tmp_path / "calls")
    p = subprocess.run(["bash", str(SLURM / "train_1node.sbatch"), "train_textual_inversion.py"],
                       env={**bare, "DRY_RUN": "1"}, capture_output=True, text=True)
    assert p.returncode != 0 and "not inside a Slurm job" in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# The preemption flow of the templates, with stand-ins for srun, accelerate and a training process

FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$CALLS"
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""

# Like accelerate launch: the training process runs in a session of its own; the launcher returns its status.
FAKE_ACCELERATE = """#!/usr/bin/env python3
import os, subprocess, sys
RANK = '''
import os, signal, sys, time
def stop(*_):
    open(os.environ["CALLS"], "a").write("rank: USR1 -> checkpoint and exit\\\\n")
    sys.exit(int(os.environ.get("FAKE_STOP_RC", "0")))
signal.signal(signal.SIGUSR1, stop)
open(os.environ["CALLS"], "a").write("rank ready\\\\n")
time.sleep(float(os.environ.get("FAKE_SECONDS", "60")))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''
open(os.environ["CALLS"], "a").write("accelerate " + " ".join(sys.argv[1:]) + "\\n")
sys.exit(subprocess.Popen([sys.executable, "-c", RANK], start_new_session=True).wait())
"""


def _run_batch(fakebin: Path, tmp_path: Path, preempt: bool, **extra) -> tuple[int, str, str]:
    _write_exe(fakebin / "srun", FAKE_SRUN)
    _write_exe(fakebin / "accelerate", FAKE_ACCELERATE)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = _slurm_env(fakebin, calls, SLURM_JOB_ID=77, SLURM_JOB_NODELIST="n1", SLURM_NNODES=1, SLURM_NODEID=0,
                     SLURM_GPUS_ON_NODE=2, **extra)
    p = subprocess.Popen(["bash", str(SLURM / "train_1node.sbatch"), "train_textual_inversion.py", "--x", "1"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        # generous bounds: Python start-up alone took tens of seconds on a loaded 2-core machine
        deadline = time.monotonic() + 300
        while "rank ready" not in calls.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        if preempt:
            p.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@...` does: the batch shell only
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, calls.read_text(), err


def test_preemption_forwards_waits_and_requeues(fakebin, tmp_path):
    rc, calls, err = _run_batch(fakebin, tmp_path, preempt=True)
    assert rc == 0, err
    lines = calls.splitlines()
    assert lines[0].startswith("srun --nodes=1 --ntasks=1")
    assert any(x.startswith("accelerate launch") and x.endswith("--x 1 --resume_from_checkpoint latest")
               for x in lines)
    # the signal reached the training process (in its own session) and it exited before the requeue
    assert lines.index("rank: USR1 -> checkpoint and exit") < lines.index("scontrol requeue 77")
    assert "requeueing job 77" in err


def test_no_requeue_without_preemption_and_the_status_is_kept(fakebin, tmp_path):
    rc, calls, err = _run_batch(fakebin, tmp_path, preempt=False, FAKE_SECONDS=0.2, FAKE_RC=5)
    assert rc == 5
    assert "requeue" not in calls and "rank: USR1" not in calls


def test_a_training_that_fails_after_the_signal_is_not_requeued(fakebin, tmp_path):
    # e.g. the checkpoint could not be written: a restart would only repeat the failure
    rc, calls, err = _run_batch(fakebin, tmp_path, preempt=True, FAKE_STOP_RC=3)
    assert "rank: USR1 -> checkpoint and exit" in calls
    assert rc == 3 and "requeue" not in calls
    assert "not requeueing: the training failed (status 3)" in err


def test_requeue_limit(fakebin, tmp_path):
    rc, calls, err = _run_batch(fakebin, tmp_path, preempt=True, SLURM_RESTART_COUNT=3, MAX_REQUEUES=3)
    assert "rank: USR1 -> checkpoint and exit" in calls and "requeue" not in calls
    assert "not requeueing" in err


# ---------------------------------------------------------------------------------------------------------------
# utils/cluster.py


def test_slurm_job_from_environment():
    assert cluster.slurm_job({}) is None
    job = cluster.slurm_job({"SLURM_JOB_ID": "881", "SLURM_NODEID": "2", "SLURM_NNODES": "4",
                             "SLURM_JOB_NODELIST": "g[1-4]", "SLURM_RESTART_COUNT": "1",
                             "SLURM_GPUS_PER_NODE": "a100:8", "SLURM_CPUS_PER_TASK": "64"})
    assert (job.job_id, job.node_id, job.num_nodes, job.restart_count, job.gpus_on_node, job.cpus_per_task) == \
        ("881", 2, 4, 1, 8, 64)
    assert job.group == "slurm-881"
    array = cluster.slurm_job({"SLURM_JOB_ID": "900", "SLURM_ARRAY_JOB_ID": "899"})
    assert array.group == "slurm-899" and array.num_nodes == 1
    assert [cluster.parse_gpu_count(v) for v in ("4", "a100:4", "gpu:h100:2(x3)", "", None)] == [4, 4, 2, None, None]


def test_threads_per_rank():
    assert cluster.threads_per_rank({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}, cpus=64) == 3
    assert cluster.threads_per_rank({"LOCAL_WORLD_SIZE": "8"}, cpus=64) == 8
    assert cluster.threads_per_rank({"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "16"}) == 2
    assert cluster.threads_per_rank({"LOCAL_WORLD_SIZE": "4"}, cpus=2) == 1
    assert cluster.threads_per_rank({}, cpus=6) == 6


def test_launch_checks():
    assert cluster.cpu_only_multiprocess_launch({"WORLD_SIZE": "1"}) is False
    assert cluster.cpu_only_multiprocess_launch({}) is False
    import torch

    assert cluster.cpu_only_multiprocess_launch({"WORLD_SIZE": "2"}) is (not torch.cuda.is_available())
    cluster.check_world_size(2, {"WORLD_SIZE": "2"})
    cluster.check_world_size(1, {})
    with pytest.raises(UserError, match="ACCELERATE_USE_CPU=true"):
        cluster.check_world_size(1, {"WORLD_SIZE": "2"})


def test_cluster_flags():
    p = argparse.ArgumentParser()
    cluster.add_cluster_args(p)
    a = p.parse_args(["--ddp_timeout", "90", "--wandb_tags", "a, b,,c"])
    assert a.ddp_timeout == 90.0 and cluster.parse_tags(a.wandb_tags) == ["a", "b", "c"]
    d = p.parse_args([])
    assert d.ddp_timeout == 1800 and cluster.parse_tags(d.wandb_tags) == []  # above rank-0-only stretches


def test_wandb_init_options(monkeypatch, tmp_path):
    from utils.training import LoopConfig, _tracker_init_kwargs

    for k in [k for k in os.environ if k.startswith("SLURM_")] + ["WANDB_RUN_GROUP"]:
        monkeypatch.delenv(k, raising=False)
    cfg = LoopConfig(output_dir=tmp_path / "my-run", max_train_steps=10, report_to="wandb", wandb_tags=["style", "v2"],
                     tracker_config={"learning_rate": "0.005"})
    assert _tracker_init_kwargs(LoopConfig(output_dir=tmp_path, max_train_steps=1), None) == {}
    w = _tracker_init_kwargs(cfg, None)["wandb"]
    assert w == {"name": "my-run", "resume": "allow", "dir": str(tmp_path / "my-run"), "job_type": "train",
                 "tags": ["style", "v2"]}
    monkeypatch.setenv("SLURM_JOB_ID", "4321")
    w = _tracker_init_kwargs(cfg, "abc123")["wandb"]
    assert (w["id"], w["group"], w["tags"]) == ("abc123", "slurm-4321", ["style", "v2", "slurm"])
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")  # the user's own group wins (wandb reads it)
    assert "group" not in _tracker_init_kwargs(cfg, "abc123")["wandb"]
    assert _tracker_init_kwargs(LoopConfig(output_dir=tmp_path, max_train_steps=1, report_to="all",
                                           run_name="named"), None)["wandb"]["name"] == "named"


def test_run_plan_summary(tmp_path):
    plan = cluster.RunPlan(world_size=16, num_machines=2, device="cuda:0", train_batch_size=4,
                           gradient_accumulation_steps=2, max_train_steps=3000, steps_per_epoch=12,
                           mixed_precision="bf16", attention="torch SDPA", dataset_examples=1500,
                           output_dir=tmp_path / "o", dataset_kind="stream", dataset_shards=32,
                           dataloader_num_workers=4, threads_per_rank=8, trackers="wandb", ddp_timeout=300,
                           slurm=cluster.slurm_job({"SLURM_JOB_ID": "5", "SLURM_NNODES": "2", "SLURM_NODEID": "0"}))
    assert plan.global_batch == 128
    text = plan.describe()
    for piece in ("16 (2 machine(s) x 8) on cuda:0", "8 CPU thread(s) and 4 loader worker(s)", "timeout 300 s",
                  "global batch  128 = 4 per process x 2 accumulation x 16 process(es)", "3000 (12 per epoch)",
                  "bf16; attention: torch SDPA", "1500 example(s) (stream, 32 shard(s))", str((tmp_path / "o")),
                  "job 5, node 0 of 2"):
        assert piece in text, piece


def test_run_plan_from_accelerator_and_attention(tiny_sd1, tmp_path):
    from diffusers import UNet2DConditionModel

    from utils.training import make_accelerator

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    assert cluster.attention_backend(unet) == "torch SDPA"
    acc = make_accelerator(tmp_path, "no", 1, "none", 0)
    plan = cluster.run_plan(acc, train_batch_size=2, gradient_accumulation_steps=3, max_train_steps=10,
                            steps_per_epoch=5, attention="torch SDPA", dataset_examples=7, output_dir=tmp_path)
    assert (plan.world_size, plan.num_machines, plan.device, plan.global_batch) == (1, 1, "cpu", 6)
    assert plan.mixed_precision == "no" and plan.threads_per_rank >= 1


def test_embedding_artifact_in_an_offline_wandb_run(tmp_path, monkeypatch):
    """The final files go up as one artifact; offline it is stored in the run folder for `wandb sync`."""
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_MODE", "offline")
    files = [tmp_path / "my-emb.pt", tmp_path / "learned_embeds.safetensors"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 10)
    acc = Accelerator(log_with="wandb")
    acc.init_trackers("embedforge-test", init_kwargs={"wandb": {"dir": str(tmp_path)}})
    try:
        assert cluster.log_output_artifact(acc, "my emb", "embedding", files + [tmp_path / "missing.pt"],
                                           {"step": 30})
    finally:
        acc.end_training()
    from test_preemption import _wandb_records

    run_file = next((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    # W&B's service writes the run file on its own; under load the artifact record has been seen to land after
    # finish() returned (twice in full-suite runs, never alone), so the file is read again until it is there (a hang
    # guard, not a timing assertion).
    deadline = time.monotonic() + 120
    while True:
        arts = [r.artifact for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "artifact"]
        if arts or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(arts) == 1 and arts[0].name == "my_emb" and arts[0].type == "embedding"
    assert sorted(e.path for e in arts[0].manifest.contents) == ["learned_embeds.safetensors", "my-emb.pt"]
    assert cluster.log_output_artifact(Accelerator(), "x", "embedding", files) is False
