"""The ``python -m tools.X`` commands: --help and flag errors answer before torch is imported (no timing: the test asks
the process which modules it loaded), their constants agree with the library's, and the old ``python -m utils.X``
entries say where the command went."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("embeddings", "ldm_export", "tiny_models", "hub", "job_array")
HEAVY = ("torch", "diffusers", "transformers", "datasets")

# Runs the tool as `python -m` does, then prints the heavy modules that got imported.
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1]] + sys.argv[2:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("CODE", code, "HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
""".format(heavy=HEAVY)


def _probe(*argv: str) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = r.stdout.strip().splitlines()[-1]
    return last, r.stdout + r.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_help_imports_no_torch(tool):
    last, out = _probe(f"tools.{tool}", "--help")
    assert last == "CODE 0 HEAVY []", out
    assert f"python -m tools.{tool}" in out  # the usage line names the command the user typed


@pytest.mark.parametrize("tool,argv", [
    ("embeddings", ["convert", "a.pt", "b.pt", "--format", "nope"]),
    ("embeddings", ["create", "--name", "x"]),  # missing --pretrained_model_name_or_path
    ("ldm_export", ["--model", "m"]),
    ("tiny_models", ["--family", "sd3", "--out", "x"]),
    ("hub", []),
    ("job_array", ["args", "list.txt", "not-a-number"]),
])
def test_flag_errors_import_no_torch(tool, argv):
    last, out = _probe(f"tools.{tool}", *argv)
    assert last == "CODE 2 HEAVY []", out
    assert re.search(rf"^python -m tools\.{tool}( \w+)?: error: ", out, re.M), out  # argparse's one line


def test_tool_constants_match_the_library():
    import tools.embeddings
    import tools.tiny_models
    import utils.embeddings
    import utils.tiny_models

    assert tools.embeddings.FORMATS == utils.embeddings.FORMATS
    assert tools.embeddings.MAX_VECTORS == utils.embeddings.MAX_VECTORS
    assert tools.tiny_models.FAMILIES == utils.tiny_models.FAMILIES


@pytest.mark.parametrize("tool", TOOLS)
def test_old_entry_names_the_new_command(tool):
    r = subprocess.run([sys.executable, "-m", f"utils.{tool}", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and f"python -m tools.{tool}" in r.stderr and "Traceback" not in r.stderr, r.stderr
