"""Slurm job arrays: which embedding an array task trains, and one summary of all the tasks.

``slurm/train_array.sbatch`` trains one embedding (or hypernetwork) per array task. The embeddings are listed in a
text file, one line each: the flags that differ between them (shell quoting; blank lines and ``#`` comments are
skipped). Array task i takes line i. Each task records how it ended in a folder that the whole array shares and
rewrites the summary there, so the summary is complete when the last task ends. With a ``--concepts`` file
(.csv/.json/.yaml) as the list (``slurm/train_concepts_array.sbatch``), task i takes ``per_task`` of its entries and
trains them as one batched run in ``<output_dir>/task-<i>/``. The templates call these through
``python -m tools.job_array`` (tools/job_array.py).

Nothing here starts a training or talks to Slurm.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.fileio import write_text_atomic

DEFAULT_OUTPUT_DIR = "outputs"  # the trainers' --output_dir default (utils/cli.py)


# ---------------------------------------------------------------------------------------------------------------
# Which lines a task trains


def read_lines(path: str | Path) -> list[list[str]]:
    """The embedding lines of a list file, each split like a shell would (comments and blank lines dropped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as e:
            raise UserError(f"{path}, line {number}: {e}") from None
        if words:
            lines.append(words)
    if not lines:
        raise UserError(f"{path}: no embedding lines (one line of flags per embedding)")
    return lines


def lines_for_task(lines: list[list[str]], task_id: int, per_task: int = 1) -> list[list[str]]:
    """The lines array task ``task_id`` trains: today one; ``per_task`` is where several embeddings trained in one
    job will plug in (the task then takes lines task_id*per_task .. +per_task-1)."""
    first = task_id * per_task
    if task_id < 0 or first >= len(lines):
        last = (len(lines) + per_task - 1) // per_task - 1
        raise UserError(f"array task {task_id} has no line: the list has {len(lines)} embedding line(s), so submit "
                        f"with --array=0-{last}")
    return lines[first:first + per_task]


def output_dir_of(args: list[str]) -> str:
    """The --output_dir a training command line resolves to (flag, else its --config file, else the default)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("--output_dir")
    known, _ = p.parse_known_args(args)
    if known.output_dir is not None:
        return known.output_dir
    if known.config:
        import yaml

        try:
            values = yaml.safe_load(Path(known.config).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"--config {known.config}: cannot read it ({e.__class__.__name__})") from None
        if isinstance(values, dict) and values.get("output_dir"):
            return str(values["output_dir"])
    return DEFAULT_OUTPUT_DIR


def task_args(list_path: str | Path, task_id: int, common: list[str]) -> list[str]:
    """The flags array task ``task_id`` adds after the common ones. Every line must end up in its own output folder:
    tasks that shared one would overwrite each other's files and resume from each other's checkpoints."""
    lines = read_lines(list_path)
    (line,) = lines_for_task(lines, task_id)
    seen: dict[str, int] = {}
    for i, other in enumerate(lines):
        out = str(Path(output_dir_of(common + other)).resolve())
        if out in seen:
            raise UserError(f"{list_path}: lines {seen[out] + 1} and {i + 1} both write to {out}; give each line its "
                            "own --output_dir")
        seen[out] = i
    return line


CONCEPT_FILE_SUFFIXES = (".csv", ".json", ".yaml", ".yml")


def is_concepts_file(path: str | Path) -> bool:
    """A --concepts file (many embeddings per task, batched) rather than a list of flag lines (one per task)."""
    return Path(path).suffix.lower() in CONCEPT_FILE_SUFFIXES


def concepts_task_args(path: str | Path, task_id: int, per_task: int, common: list[str]) -> list[str]:
    """Array task ``task_id`` of a concepts file: its ``per_task`` concepts (entries task_id*per_task ..) are written
    to ``<output_dir>/task-<id>/concepts.json`` and trained as one batched run there; returns the flags for it."""
    from utils.concepts import read_entries

    if per_task < 1:
        raise UserError(f"--per_task must be >= 1 (got {per_task})")
    entries = lines_for_task(read_entries(Path(path)), task_id, per_task)
    out = Path(output_dir_of(common)).resolve() / f"task-{task_id:05d}"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "concepts.json", json.dumps(entries, indent=1) + "\n")
    return ["--concepts", str(out / "concepts.json"), "--output_dir", str(out)]


# ---------------------------------------------------------------------------------------------------------------
# What each task did, and the summary


@dataclass
class TaskRecord:
    task: int
    tasks: int  # how many tasks the array has
    job_id: str
    outcome: str  # done | stopped | failed (slurm/common.sh: EF_OUTCOME)
    status: int
    restarts: int
    script: str
    args: list[str]
    log: str = ""
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))


def record_path(folder: Path, task: int) -> Path:
    return folder / f"task-{task}.json"


def last_csv_row(out_dir: Path) -> dict | None:
    """The last row of the trainer's loss log (textual_inversion_loss.csv / hypernetwork_loss.csv)."""
    for path in sorted(out_dir.glob("*_loss.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows:
            return rows[-1]
    return None


def last_error_line(log: str) -> str:
    try:
        lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    # Our scripts' one-line errors and argparse's read "PROG: error: ..."; Slurm's own follow them ("srun: error:
    # task 0: Exited with exit code 1") and say less.
    slurm = ("srun:", "slurmstepd", "scontrol:", "sbatch:")
    ours = [x.strip() for x in lines if ": error: " in x and not x.startswith(slurm)]
    if ours:
        return ours[-1]
    errors = [x.strip() for x in lines if "error" in x.lower()]
    return errors[-1] if errors else ""


def task_row(rec: TaskRecord) -> dict:
    out = Path(output_dir_of(rec.args)).resolve()
    row = {"task": rec.task, "state": rec.outcome, "status": rec.status, "restarts": rec.restarts,
           "job_id": rec.job_id, "output_dir": str(out),
           "files": sorted(p.name for p in out.glob("*") if p.suffix in (".pt", ".safetensors")),
           "step": None, "loss": None, "error": "", "log": rec.log}
    if (out / "embeddings_summary.csv").is_file():  # a batched --concepts task: one folder per embedding
        with open(out / "embeddings_summary.csv", newline="", encoding="utf-8") as f:
            row["files"] = [f"{r['name']}/" for r in csv.DictReader(f)]
    last = last_csv_row(out) if out.is_dir() else None
    if last:
        row["step"], row["loss"] = int(last["step"]), float(last["loss"])
    if rec.outcome == "failed":
        row["error"] = last_error_line(rec.log)
    return row


def summarize(folder: Path) -> list[dict]:
    """One row per array task, in task order; tasks that have not ended (pending, running, or killed without
    recording) are 'no result'."""
    records = {}
    for path in folder.glob("task-*.json"):
        rec = TaskRecord(**json.loads(path.read_text(encoding="utf-8")))
        records[rec.task] = rec
    count = max([r.tasks for r in records.values()] + [max(records, default=-1) + 1])
    return [task_row(records[i]) if i in records else {"task": i, "state": "no result"} for i in range(count)]


def format_summary(rows: list[dict]) -> str:
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines = [f"{len(rows)} task(s): " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())), ""]
    for r in rows:
        if r["state"] == "no result":
            lines.append(f"task {r['task']}: no result (pending, running, or ended without recording)")
            continue
        step = f"step {r['step']}, loss {r['loss']:.4f}" if r.get("step") is not None else "no steps logged"
        lines.append(f"task {r['task']}: {r['state']} (status {r['status']}, {r['restarts']} restart(s), job "
                     f"{r['job_id']}) {step}; {r['output_dir']}: {', '.join(r['files']) or 'no embedding files'}")
        if r.get("error"):
            lines.append(f"    {r['error']}")
        if r["state"] == "stopped":
            lines.append("    stopped at a checkpoint and not requeued (MAX_REQUEUES): submit the task again to finish")
    return "\n".join(lines) + "\n"


def write_summary(folder: Path) -> str:
    """Rewrite summary.json and summary.txt. Tasks ending at the same moment take turns (a lock), so the last one
    to finish sees every record."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = summarize(folder)
        text = format_summary(rows)
        write_text_atomic(folder / "summary.json", json.dumps(rows, indent=1) + "\n")
        write_text_atomic(folder / "summary.txt", text)
    return text


def record(folder: Path, rec: TaskRecord) -> str:
    write_text_atomic(record_path(folder, rec.task), json.dumps(asdict(rec), indent=1) + "\n")
    return write_summary(folder)


if __name__ == "__main__":
    raise SystemExit("python -m utils.job_array moved: use python -m tools.job_array")
