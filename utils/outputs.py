"""What every run writes besides the trained files: training_settings.json, and the list of outputs shown at the end.

Each trainer's files writer (utils/trainers/) derives from RunOutputs and adds ``save(step)`` and ``final(step,
optimizer)``; the loop calls them through its Outputs callbacks.
"""

from __future__ import annotations

from pathlib import Path

from utils.models import LoadedModel
from utils.previews import PreviewOptions, Previewer


def write_settings(out_dir: Path, settings: dict, step: int) -> Path:
    """``training_settings.json``: every option of the run and what it resolved to, plus the final step."""
    import json

    from utils.fileio import write_text_atomic

    path = out_dir / "training_settings.json"
    write_text_atomic(path, json.dumps({**settings, "final_step": step}, indent=4, default=str))
    return path



class RunOutputs:
    """What both trainers' files writers share: where files go, the settings, the model they were trained on (for
    the files' metadata) and the run's previewer. Subclasses add ``save(step)``, ``final(step, optimizer)`` and
    ``preview(step)``."""

    def __init__(self, accelerator, trainable, loaded: LoadedModel, out_dir: Path, preview: PreviewOptions, *,
                 settings: dict, save_optimizer_state: bool = False):
        self.accelerator = accelerator
        self.trainable = trainable
        self.loaded = loaded
        self.out_dir = out_dir
        self.previewer = Previewer(accelerator.device, loaded, preview, out_dir, trainable.name)
        self.settings = settings
        self.save_optimizer_state = save_optimizer_state

    def callbacks(self, previews: bool = True):
        from utils.training import Outputs

        return Outputs(save=self.save, final=self.final, preview=self.preview if previews else None)


def describe_outputs(out_dir: Path, files: list[Path]) -> list[str]:
    """The output folder after a run: the final files first, then every other entry, a folder with the number of files
    in it and the checkpoints on one line (hidden entries, e.g. unfinished temp files, are left out)."""
    out_dir = Path(out_dir)
    final = [Path(f) for f in files if Path(f).parent == out_dir and Path(f).exists()]
    lines = [f.name for f in final]
    checkpoints = []
    for entry in sorted(out_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry in final:
            continue
        if entry.is_dir() and entry.name.startswith("checkpoint-"):
            checkpoints.append(entry)
        elif entry.is_dir():
            n = sum(1 for p in entry.rglob("*") if p.is_file())
            lines.append(f"{entry.name}/ ({n} file{'s' if n != 1 else ''})")
        else:
            lines.append(entry.name)
    if checkpoints:
        checkpoints.sort(key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
        lines.append(" ".join(f"{c.name}/" for c in checkpoints) + "  (resume with --resume_from_checkpoint latest)")
    return lines
