"""Shared test fixtures: offline mode, tiny models (built once per session), and the real fixtures in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch a hub; keep CPU threads modest (several processes share 2 cores).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# W&B gives its service process 30 s to start and a run 90 s to initialise; on 2 cores shared with other work, imports
# alone took 37 s, and tests that start W&B (offline) failed under load. These reach the scripts tests start too.
os.environ.setdefault("WANDB__SERVICE_WAIT", "300")
os.environ.setdefault("WANDB_INIT_TIMEOUT", "300")
# The trainers set torch's threads from OMP_NUM_THREADS (utils.cluster.threads_per_rank); one thread per process keeps
# tests that share the 2 cores (and multi-process runs) from slowing each other down.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# One thread: the tiny models' ops are overhead-bound, and several processes share the 2 cores.
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
A1111_FIXTURES = SHARED / "fixtures" / "a1111"
TINYWORLD = SHARED / "models" / "tinyworld"
CLIENTS = SHARED / "clients"


def require_shared(path: Path, what: str) -> Path:
    """``path`` (inside ../shared) if it exists. Missing: a skip on a developer's machine, but a failure when ``CI`` is
    set -- CI must never pass by silently skipping the tests that run real fixtures, models and client code."""
    if path.exists():
        return path
    message = f"{what} not found at {path} (the repository expects ../shared beside it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def a1111_fixtures() -> Path:
    return require_shared(A1111_FIXTURES, "real A1111 fixtures")


@pytest.fixture(scope="session")
def tinyworld() -> Path:
    require_shared(TINYWORLD / "model_index.json", "tiny-world model")
    return TINYWORLD


@pytest.fixture(scope="session")
def shared_clients() -> Path:
    """The verbatim reader code of A1111, ComfyUI and kohya (see ../shared/clients/README.md)."""
    return require_shared(CLIENTS, "real client reader code")


def _tiny(family: str) -> Path:
    from utils.tiny_models import tiny_model_path

    return tiny_model_path(family)


@pytest.fixture(scope="session")
def tiny_sd1() -> Path:
    """SD-1.x layout, text width 32: the fast model for most tests."""
    return _tiny("sd1")


@pytest.fixture(scope="session")
def tiny_sd1_768() -> Path:
    """SD-1.x layout with a 768-wide text encoder, so real A1111 embeddings load and render."""
    return _tiny("sd1-768")


@pytest.fixture(scope="session")
def tiny_sd2() -> Path:
    return _tiny("sd2")


@pytest.fixture(scope="session")
def tiny_sdxl() -> Path:
    return _tiny("sdxl")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; tests that run several trainings in one process need it reset."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
