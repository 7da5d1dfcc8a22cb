"""Slurm job arrays from the command line: the flags of an array task, recording how it ended, the summary.

slurm/train_array.sbatch and slurm/train_concepts_array.sbatch (through slurm/common.sh) call:

    python -m tools.job_array args LIST TASK_ID [-- COMMON_ARGS...]    # the task's flags, NUL-separated
    python -m tools.job_array args CONCEPTS.csv TASK_ID --per_task N [-- COMMON_ARGS...]  # N embeddings, one run
    python -m tools.job_array record DIR --task I ... -- SCRIPT ARGS... # after the training; rewrites the summary
    python -m tools.job_array summary DIR                               # (users) rewrite and print the summary

The list file, the records and the summary are utils/job_array.py; docs/cluster.md explains job arrays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils import job_array
from utils.errors import UserError, exit_on_user_error

PROG = "python -m tools.job_array"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("args", help="print array task TASK_ID's flags from LIST, NUL-separated (a --concepts "
                                    "file as LIST: the task's slice, written to <output_dir>/task-<id>/)")
    a.add_argument("list")
    a.add_argument("task_id", type=int)
    a.add_argument("--per_task", type=int, default=1,
                   help="with a --concepts file (.csv/.json/.yaml) as LIST: embeddings per task, trained as one run")
    r = sub.add_parser("record", help="record how a task ended and rewrite the summary in DIR")
    r.add_argument("dir", type=Path)
    for name in ("task", "tasks", "status", "restarts"):
        r.add_argument(f"--{name}", type=int, required=True)
    r.add_argument("--job_id", required=True)
    r.add_argument("--outcome", required=True, choices=["done", "stopped", "failed"])
    r.add_argument("--log", default="")
    s = sub.add_parser("summary", help="rewrite and print the summary of the array whose records are in DIR")
    s.add_argument("dir", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    ns = build_parser().parse_args(argv)

    if ns.command == "args":
        words = (job_array.concepts_task_args(ns.list, ns.task_id, ns.per_task, rest)
                 if job_array.is_concepts_file(ns.list) else job_array.task_args(ns.list, ns.task_id, rest))
        sys.stdout.write("".join(f"{w}\0" for w in words))
    elif ns.command == "record":
        if not rest:
            raise UserError("record: give the training command after --")
        rec = job_array.TaskRecord(task=ns.task, tasks=ns.tasks, job_id=ns.job_id, outcome=ns.outcome,
                                   status=ns.status, restarts=ns.restarts, script=rest[0], args=rest[1:], log=ns.log)
        sys.stdout.write(job_array.record(ns.dir, rec))
    else:
        if not ns.dir.is_dir():
            raise UserError(f"{ns.dir}: no such folder")
        sys.stdout.write(job_array.write_summary(ns.dir))
    return 0


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        sys.exit(main())
