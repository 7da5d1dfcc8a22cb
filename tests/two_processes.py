"""`accelerate launch` of a script on 2 CPU processes (gloo), as every two-process test runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch_command(script: str) -> list[str]:
    """The command line up to the script's own arguments; ``script`` relative to the repository root."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / script)]


def run_two_processes(script: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """Runs ``script`` with ``args`` on 2 CPU processes, one thread each; asserts it ended well."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launch_command(script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r
