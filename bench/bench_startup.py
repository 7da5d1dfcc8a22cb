"""Seconds until the scripts answer --help or a flag error, this tree beside a baseline checkout, as a user meets it.

    python bench/bench_startup.py --baseline /path/to/other/checkout [--repeat 3]

Each command runs as ``/usr/bin/time -f %e python SCRIPT ARGS`` in both trees, interleaved (so load from other
processes hits both alike); the table shows the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ["train_textual_inversion.py", "--help"],
    ["train_hypernetwork.py", "--help"],
    ["inference.py", "--help"],
    ["preprocess.py", "--help"],
    ["train_textual_inversion.py", "--placeholder_token", "x", "--train_batch_size", "0"],
]


def seconds(tree: Path, command: list[str], cwd: str) -> float:
    p = subprocess.run(["/usr/bin/time", "-f", "%e", sys.executable, str(tree / command[0]), *command[1:]],
                       cwd=cwd, capture_output=True, text=True)
    return float(p.stderr.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, type=Path, help="Another checkout of the repository (e.g. main).")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print("| command | baseline s | this tree s |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as cwd:
        for command in COMMANDS:
            base, ours = [], []
            for _ in range(a.repeat):
                base.append(seconds(a.baseline.resolve(), command, cwd))
                ours.append(seconds(ROOT, command, cwd))
            print(f"| `{' '.join(command)}` | {statistics.median(base):.2f} | {statistics.median(ours):.2f} |")


if __name__ == "__main__":
    main()
