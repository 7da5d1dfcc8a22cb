"""A process killed inside a checkpoint write: nothing half-written is ever resumed from, and the resumed run ends
exactly where an uninterrupted one does.

The kill is real (``os._exit`` in a subprocess running the whole script, so no ``finally`` block or atexit handler
tidies up), injected at three moments of writing checkpoint-4: half-way through a file of accelerate's
``save_state``, after every file but before the manifest, and just after the folder was renamed into place.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from utils.checkpoints import verify
from utils.embeddings import load_embedding
from utils.errors import exit_on_user_error

from test_hardening import data_dir  # noqa: F401 (fixture: 4 captioned 64 px pictures)

ROOT = Path(__file__).resolve().parent.parent
NAME = "crash-emb"

# Each crash patches one function the checkpoint write goes through; the process dies without cleaning up.
CRASHES = {
    # half of a file accelerate writes into the temporary folder
    "mid_save_state": """
        real = torch.save
        def save(obj, f, *a, **k):
            if ".checkpoint-4.tmp" in str(f):
                import io
                buf = io.BytesIO(); real(obj, buf, *a, **k)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                os._exit(137)
            return real(obj, f, *a, **k)
        torch.save = save
    """,
    # every file written, the manifest not yet
    "before_manifest": """
        import utils.checkpoints as ck
        real = ck.write_manifest
        def write_manifest(folder, *a, **k):
            if ".checkpoint-4.tmp" in str(folder):
                os._exit(137)
            return real(folder, *a, **k)
        ck.write_manifest = write_manifest
    """,
    # the folder renamed into place, nothing after it (log flush, old checkpoints' cleanup) done
    "after_rename": """
        real = os.replace
        def replace(src, dst, *a, **k):
            real(src, dst, *a, **k)
            if os.path.basename(str(dst)) == "checkpoint-4":
                os._exit(137)
        os.replace = replace
    """,
}


def _args(model: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--placeholder_token", NAME, "--initializer_token", "object", "--resolution", "64",
            "--train_batch_size", "2", "--learning_rate", "0.01", "--max_train_steps", "6", "--save_every", "2",
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--no_previews", "--seed", "5",
            *map(str, extra)]


def _run_in_process(argv: list[str]) -> None:
    import train_textual_inversion as tti

    with pytest.raises(SystemExit) as e, exit_on_user_error(tti.PROG):
        tti.main(argv)
        raise SystemExit(0)
    assert e.value.code == 0


def _losses(out: Path) -> list[tuple[str, str]]:
    with open(out / "textual_inversion_loss.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd1, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    _run_in_process(_args(tiny_sd1, data_dir, out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_kill_inside_a_checkpoint_write_resumes_exactly(tiny_sd1, data_dir, uninterrupted, tmp_path, crash):
    out = tmp_path / "out"
    script = "import os, runpy, sys\nimport torch\n" + textwrap.dedent(CRASHES[crash]) + textwrap.dedent(f"""
        sys.argv = ["train_textual_inversion.py", *{_args(tiny_sd1, data_dir, out)!r}]
        runpy.run_path("train_textual_inversion.py", run_name="__main__")
    """)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 137, done.stderr[-2000:]  # the kill, not an error of ours

    complete = sorted(p.name for p in out.glob("checkpoint-*"))
    if crash == "after_rename":
        assert "checkpoint-4" in complete and verify(out / "checkpoint-4")
    else:
        # the half-written folder is never a checkpoint: the latest complete one is still step 2
        assert complete == ["checkpoint-2"] and verify(out / "checkpoint-2")
        assert (out / ".checkpoint-4.tmp").exists()

    _run_in_process(_args(tiny_sd1, data_dir, out, "--resume_from_checkpoint", "latest"))
    final = load_embedding(out / f"{NAME}.pt")
    expected = load_embedding(uninterrupted / f"{NAME}.pt")
    assert final.step == expected.step == 6
    assert torch.equal(final.vectors, expected.vectors)
    assert _losses(out) == _losses(uninterrupted)
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []  # the resumed run tidied the leftovers
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # --checkpoints_total_limit 1
