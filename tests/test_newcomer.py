"""What a new user meets in the first hour, following only the README and --help: the launch commands, what a run
prints at its start and end, and the usage text."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils import cluster

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
SHORTFALL = "warning: accelerate launch was asked for several processes but started only this one"


def _user_env(**extra) -> dict:
    """The environment of a user's shell: none of the test suite's quieting of transformers/diffusers."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["train_textual_inversion", "train_hypernetwork"])
def test_help_usage_keeps_its_line_breaks(script):
    import importlib

    text = importlib.import_module(script).build_parser().format_help()
    commands = [line for line in text.splitlines() if f"{script}.py" in line and line.startswith("    ")]
    assert commands, text
    # A shell continuation in the docstring must reach the screen as a backslash at the end of the line, not as a run
    # of spaces glued into the middle of one (which is what a bare backslash-newline in a Python string gives).
    assert all(not re.search(r"\S {3,}--", line) for line in commands), commands
    assert any(line.endswith(" \\") for line in commands)


def test_launcher_shortfall_is_detected_from_accelerates_environment():
    simple = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}
    # What `accelerate launch --num_processes 2` (or --cpu ...) passes to the one process it starts on a CPU machine.
    asked_two = {**simple, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert cluster.launcher_shortfall(1, asked_two).startswith("accelerate launch was asked for several processes")
    assert "--multi_gpu" in cluster.launcher_shortfall(1, asked_two)
    assert cluster.launcher_shortfall(1, simple) is None  # asked for one
    assert cluster.launcher_shortfall(1, {}) is None  # plain `python train_...py`
    assert cluster.launcher_shortfall(1, {"MASTER_ADDR": "10.0.0.1"}) is None  # not accelerate's launcher
    assert cluster.launcher_shortfall(2, {**asked_two, "WORLD_SIZE": "2"}) is None  # torchrun started them
    assert cluster.launcher_shortfall(4, {**asked_two, "OMPI_COMM_WORLD_SIZE": "4"}) is None  # mpirun did


@pytest.mark.slow
def test_two_processes_asked_on_a_cpu_machine_the_run_says_so_and_starts_and_ends_cleanly(tmp_path):
    """The reported first hour: `accelerate launch --num_processes 2 ...` on a CPU machine. One process starts (that is
    accelerate's doing); the run now says so in one line, prints no torchvision notices, and ends with a list of what
    it wrote that names the previews, the checkpoints and the loss log."""
    if ACCELERATE is None:
        pytest.skip("the accelerate launcher is not installed beside this Python")
    out = tmp_path / "demo"
    p = subprocess.run(
        [ACCELERATE, "launch", "--num_processes", "2", "--main_process_port", str(_free_port()),
         str(ROOT / "train_textual_inversion.py"), "--demo", "--max_train_steps", "4", "--preview_every", "2",
         "--preview_steps", "1", "--save_every", "2", "--checkpointing_steps", "2", "--output_dir", str(out)],
        cwd=tmp_path, env=_user_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count(SHORTFALL) == 1, p.stderr[-3000:]
    assert "torchvision" not in p.stderr + p.stdout
    listing = p.stdout[p.stdout.index("Done at step 4"):].splitlines()[1:]
    entries = [line.strip() for line in listing]
    for expected in ("red-ball.pt", "learned_embeds.safetensors", "README.md", "textual_inversion_loss.csv",
                     "training_settings.json", "images/ (2 files)", "embeddings/ (4 files)"):
        assert expected in entries, entries
    assert any(e.startswith("checkpoint-2/ checkpoint-4/") for e in entries), entries


def _launch_commands(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [c for b in blocks for c in re.sub(r"\\\n\s*", " ", b).splitlines()]
    return [c for c in commands if "accelerate launch" in c]


def test_readme_launch_commands_leave_the_launcher_nothing_to_guess():
    """A bare `accelerate launch` without a config makes the launcher guess every value and warn (on a machine
    without GPUs: "`--num_processes` was set to a value of `0`"). Every launch the README shows names a config file
    or all of the launcher's values."""
    commands = _launch_commands(README)
    assert commands
    explicit = ("--multi_gpu", "--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend")
    for c in commands:
        assert "--config_file" in c or all(flag in c for flag in explicit), c
        assert "--cpu" not in c.split()


def test_readme_cpu_multiprocess_form_starts_two_processes_without_launcher_warnings(tmp_path):
    if ACCELERATE is None:
        pytest.skip("the accelerate launcher is not installed beside this Python")
    form = "ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch --config_file configs/accelerate/cpu_2proc.yaml"
    assert form in README
    script = tmp_path / "world.py"
    # One write per process (print's pieces are separate writes when stdout is unbuffered and would interleave).
    script.write_text("import os\n"
                      "os.write(1, f\"world {os.environ.get('WORLD_SIZE')} {os.environ.get('RANK')}\\n\".encode())\n")
    p = subprocess.run([ACCELERATE, "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
                        "--main_process_port", str(_free_port()), str(script)],
                       cwd=ROOT, env=_user_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(re.findall(r"world \d \d", p.stdout)) == ["world 2 0", "world 2 1"]
    assert "were not passed" not in p.stderr and "num_processes" not in p.stderr, p.stderr[-2000:]
