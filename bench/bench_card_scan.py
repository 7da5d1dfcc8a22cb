#!/usr/bin/env python
"""Memory and time of reading an embeddings folder that holds one very large plain picture, as a user meets it.

Runs ``python -m tools.embeddings inspect FILE`` (the same reader inference.py's embedding folders and
``--list_embeddings`` use) in a fresh process per file and tree, and prints each process's peak RSS and wall time.
With ``--baseline DIR`` (another checkout, e.g. the main worktree) both trees are measured side by side in one run.

    python bench/bench_card_scan.py --baseline ../main --size 16384
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# VmHWM (this process's own peak), not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
WRAPPER = """
import os, runpy, sys
sys.path.insert(0, sys.argv[1])
# the command moved from utils/embeddings.py to tools/embeddings.py; a baseline tree may predate that
tool = "tools.embeddings" if os.path.exists(sys.argv[1] + "/tools/embeddings.py") else "utils.embeddings"
sys.argv = [tool, "inspect", sys.argv[2]]
try:
    runpy.run_module(tool, run_name="__main__")
except SystemExit:
    pass
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("MAXRSS_KB", hwm, file=sys.stderr)
"""


def make_files(folder: Path, size: int) -> dict[str, Path]:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from utils.embeddings import Embedding, save_png_card

    files = {}  # made in this process: the readers are measured in fresh ones
    # A plain picture of size x size: the red team's 783 KB PNG was 16384 x 16384 of a flat colour.
    files[f"plain {size}x{size} PNG"] = folder / "plain.png"
    Image.new("RGB", (size, size), (40, 90, 160)).save(files[f"plain {size}x{size} PNG"], compress_level=1)
    card = folder / "card.png"
    picture = Image.fromarray(np.random.default_rng(0).integers(1, 255, (1024, 1024, 3), dtype=np.uint8))
    save_png_card(Embedding("card", torch.randn(8, 768)), card, picture)
    with Image.open(card) as im:  # drop the text chunk so the pixel payload is what gets decoded
        im.convert("RGB").save(folder / "pixel_card.png")
    files["1024 px card, pixel payload"] = folder / "pixel_card.png"
    return files


def measure(tree: Path, path: Path) -> tuple[float, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, str(tree), str(path)], capture_output=True, text=True, env=env,
                       cwd=tree)
    took = time.perf_counter() - t
    rss = next((int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("MAXRSS_KB")), 0)
    said = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    return rss / 1024, took, (said[0][:90] if said else "read") if rss else r.stderr.strip().splitlines()[-1][:90]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="another checkout to measure beside this one")
    p.add_argument("--size", type=int, default=16384, help="side of the plain picture (default 16384)")
    p.add_argument("--repeats", type=int, default=2, help="runs per file and tree (default 2)")
    args = p.parse_args()
    trees = [("this tree", ROOT)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.size)
        print("| file | tree | peak RSS MB (runs) | seconds (runs) | result |\n|---|---|---|---|---|")
        for label, path in files.items():
            runs = {name: [] for name, _ in trees}
            for _ in range(args.repeats):  # interleaved, so load from other processes hits both trees alike
                for name, tree in trees:
                    runs[name].append(measure(tree, path))
            for name, results in runs.items():
                rss = " / ".join(f"{r[0]:.0f}" for r in results)
                took = " / ".join(f"{r[1]:.1f}" for r in results)
                print(f"| {label} ({path.stat().st_size // 1024} KB) | {name} | {rss} | {took} | {results[0][2]} |")


if __name__ == "__main__":
    main()
