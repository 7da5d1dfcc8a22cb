"""Checkpoint folders: what they hold, the manifest that vouches for them, and reading them back without running code.

``checkpoint-N/`` holds the files accelerate's ``save_state`` writes (``optimizer.bin``, ``random_states_<rank>.pkl``,
``scaler.pt`` with fp16), the trained weights (``trainable.pt``), the loop's progress as JSON (``trainer_state.json``,
``progress.json``) and, written last, ``manifest.json``: every other file's name, size and SHA-256.

Resuming checks the manifest before reading anything, so a file that is missing, truncated or altered since it was
written is refused with one line naming it. Every file that holds a pickle is then read by us with torch's
weights-only unpickler, which builds tensors and plain containers and refuses anything that would call code (a
checkpoint is a file like any other: shared between people and clusters). accelerate's ``load_state`` is not used: it
unpickles registered objects with ``weights_only=False`` and silently skips random states it cannot read.

Checkpoints written before the manifest existed (``custom_checkpoint_0.pkl`` instead of ``trainer_state.json``) still
resume: their state pickle holds only plain data and is read the same safe way; their files cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path

from utils.errors import UserError, first_line

# Only the standard library at module level: the trainers check --resume_from_checkpoint here before torch loads.
# torch and numpy are imported where the files are read.

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
PROGRESS = "progress.json"
TRAINABLE = "trainable.pt"
LEGACY_STATE = "custom_checkpoint_0.pkl"
MANIFEST_FORMAT = "embedforge-checkpoint"
MANIFEST_VERSION = 1
_MAX_JSON_BYTES = 16 << 20  # the manifest and state are a few KB; a bigger "JSON" file is not ours


class CheckpointError(UserError):
    """A checkpoint folder we will not resume from; the message names the file and says why."""


def optimizer_file() -> str:
    from accelerate.utils import OPTIMIZER_NAME

    return f"{OPTIMIZER_NAME}.bin"


def scaler_file() -> str:
    from accelerate.utils import SCALER_NAME

    return SCALER_NAME


def rng_file(process_index: int) -> str:
    from accelerate.utils import RNG_STATE_NAME

    return f"{RNG_STATE_NAME}_{process_index}.pkl"


# ---------------------------------------------------------------------------------------------------------------------
# The manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | os.PathLike) -> Path:
    """``manifest.json`` over every file in ``folder``: the last file of a checkpoint, written before it is renamed
    into place (the folder is still a temporary one, so no atomic rename of the file itself is needed)."""
    folder = Path(folder)
    entries = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
               for name in _files(folder)}
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": entries}, indent=1))
    return path


def read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, far more than a checkpoint's JSON files")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _fix(folder: Path) -> str:
    return f"resume from another checkpoint, or delete {folder} to resume from the one before it"


def verify(folder: str | os.PathLike) -> frozenset[str] | None:
    """Check every file against ``manifest.json`` and return the names it lists; None for a checkpoint written before
    manifests existed (it has the old state pickle and no manifest). Raises CheckpointError otherwise."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        if (folder / LEGACY_STATE).is_file() and not (folder / TRAINER_STATE).exists():
            return None
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint's files cannot be checked; {_fix(folder)}")
    manifest = read_json(manifest_path)
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: not an Embedforge checkpoint manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{manifest_path}: manifest version {manifest.get('version')!r}; this version of "
                              f"Embedforge reads version {MANIFEST_VERSION}")
    for name, entry in files.items():
        path = folder / name
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts or not isinstance(entry, dict):
            raise CheckpointError(f"{manifest_path}: malformed entry {name!r}")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST}); the checkpoint is incomplete or was "
                                  f"altered; {_fix(folder)}")
        if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path}: altered since the checkpoint was written (its size or SHA-256 differs "
                                  f"from {MANIFEST}); {_fix(folder)}")
    for name in (TRAINER_STATE, PROGRESS, TRAINABLE):
        if name not in files:
            raise CheckpointError(f"{folder / name}: not listed in {MANIFEST}; {_fix(folder)}")
    return frozenset(files)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The finished ``checkpoint-N`` folders in ``output_dir`` as (N, folder), oldest first."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
            if m and p.is_dir() and (p / PROGRESS).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {resume}: no such folder (give a checkpoint-N folder or 'latest')")
    if not (path / PROGRESS).is_file():
        raise UserError(f"--resume_from_checkpoint {resume}: not a checkpoint folder (no progress.json)")
    return path


def check_resume(output_dir: Path, resume: str | None) -> None:
    """Before any model loads: the checkpoint to resume from exists and its files match its manifest."""
    folder = resolve_resume(output_dir, resume)
    if folder is not None:
        verify(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Reading files without running code


def _rng_globals() -> list:
    # What numpy's random state needs to be rebuilt (arrays, dtypes, bytes), the same list accelerate allows.
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    return list(TORCH_SAFE_GLOBALS)


def load_pickle(path: Path, what: str, allow_numpy: bool = False):
    """torch.load with the weights-only unpickler (tensors, numbers, strings, containers; with ``allow_numpy`` also
    numpy arrays). Anything else, and any damage, is a one-line CheckpointError naming ``path``."""
    import torch

    extra = _rng_globals() if allow_numpy else []
    try:
        with torch.serialization.safe_globals(extra), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {_fix(path.parent)}") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        culprit = f" (it asks for {found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: a {what} holds only tensors and plain data, this pickle wants to "
                              f"call code{culprit}; it may be malicious") from None
    except Exception as e:  # zip or pickle damage surfaces as many exception types
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {first_line(e)})") from None


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def check_finite(value, path: Path, what: str) -> None:
    import torch

    for t in _tensors(value):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: the {what} holds NaN or infinite values; {_fix(path.parent)}")


def read_trainer_state(folder: Path, checked: bool) -> dict:
    """The loop's TrainerState: JSON, or in a checkpoint from before manifests the plain-data pickle accelerate wrote."""
    if checked:
        return read_json(folder / TRAINER_STATE)
    state = load_pickle(folder / LEGACY_STATE, "trainer state")
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{folder / LEGACY_STATE}: not a trainer state")
    return state


def restore_rng(path: Path) -> None:
    """Set Python's, numpy's and torch's random states (CPU, and CUDA when present) from accelerate's file."""
    import numpy as np
    import torch

    states = load_pickle(path, "random-state file", allow_numpy=True)
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a usable random-state file ({type(e).__name__}: {e}); exact resume "
                              f"needs it; {_fix(path.parent)}") from None


def load_checkpoint(folder: Path, *, state, trainable, optimizer, scaler, process_index: int) -> list[str]:
    """Restore a run from ``folder`` (verified first): the loop's state (checked against this run by
    ``state.check_resumable``), the trained weights, the optimizer, the fp16 scaler and this process's random states.
    Returns notes for the user (e.g. an unchecked old checkpoint)."""
    names = verify(folder)
    checked = names is not None
    notes = [] if checked else [f"{folder} was written by an older version (no {MANIFEST}): its files could not be "
                                f"checked, only read safely"]
    state.load_state_dict(read_trainer_state(folder, checked))
    state.check_resumable(folder)

    weights = load_pickle(folder / TRAINABLE, "trained-weights file")
    check_finite(weights, folder / TRAINABLE, "trained weights")
    try:
        trainable.load_state_dict(weights)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder / TRAINABLE}: does not fit what this run trains ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None

    path = folder / optimizer_file()
    try:
        optimizer.load_state_dict(load_pickle(path, "optimizer state"))
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: does not fit this run's optimizer ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None

    if scaler is not None:
        path = folder / scaler_file()
        if path.is_file():
            scaler.load_state_dict(load_pickle(path, "gradient-scaler state"))
        else:
            notes.append(f"{folder} has no fp16 gradient-scaler state (written without fp16); the scaler starts fresh")

    path = folder / rng_file(process_index)
    if process_index > 0 and not path.exists():
        # Written by fewer processes (the layout check allows another world size with the same global batch).
        notes.append(f"{folder} has no random states for process {process_index} (it was written by fewer "
                     f"processes); this process's random numbers start from the seed")
    else:
        restore_rng(path)
    return notes
