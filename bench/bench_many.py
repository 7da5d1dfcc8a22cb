#!/usr/bin/env python
"""Many embeddings in one run (--concepts, --sweep) against one run per embedding, on the tiny-world model.

Part "concepts": N colour+shape concepts of 16 pictures each (rendered with ../shared/models/tinyworld/data.py), trained
once as N separate runs of train_textual_inversion.py and once as one --concepts run with the same settings. Part
"sweep": one concept as the 6 variants of --sweep "learning_rate=2e-3,5e-3,1e-2 num_vectors=1,2", again as 6 separate
runs and as one run. Every run is the whole script in its own process, as a user starts it (start-up and model
loading included), on one thread; CPU time is the processes' user + system time. Each final embedding generates
--samples images of "a photo of a <name>" (DDIM, guidance 2, 20 steps, the same seeds), judged by tiny-world's pixel
classifier: accuracy = the share showing the concept's colour AND shape.

    python bench/bench_many.py                                   # both parts, 150 steps
    python bench/bench_many.py --parts concepts --steps 100 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINYWORLD = ROOT.parent / "shared" / "models" / "tinyworld"
SCRIPT = ROOT / "train_textual_inversion.py"
CONCEPTS = ["red:circle", "green:square", "blue:triangle", "yellow:cross", "purple:circle", "orange:square",
            "blue:cross", "green:triangle"]
SWEEP = "learning_rate=2e-3,5e-3,1e-2 num_vectors=1,2"


def _bench_learning():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "bench_learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_script(argv: list[str], log: Path) -> float:
    """One whole run of the script in its own process, one thread; returns its CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    before = _children_cpu()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(SCRIPT), *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                           cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"training failed, see {log}")
    return _children_cpu() - before


EXTRA: list[str] = []  # --trainer_args, given to every run
# The concepts' rate: at 5e-3, purple circle is still at 38% after 150 steps (in both kinds of run); at 1e-2 every
# concept reaches 100%. The sweep gives each variant its own rate.
LEARNING_RATE = "1e-2"


def common(steps: int) -> list[str]:
    return [*EXTRA, "--pretrained_model_name_or_path", str(TINYWORLD), "--initializer_token", "object", "--resolution", "64",
            "--train_batch_size", "4", "--learning_rate", LEARNING_RATE, "--max_train_steps", str(steps), "--seed", "0",
            "--no_previews", "--save_every", "0", "--checkpointing_steps", "0"]


def score(scorer, pt: Path, work: Path, samples: int, colour: str, shape: str) -> float:
    folder = work / "score" / f"{pt.parent.parent.name}-{pt.stem}"  # one embedding per folder: nothing else loads
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(pt, folder / pt.name)
    return scorer.rates(f"a photo of a {pt.stem}", folder, samples, colour, shape)["accuracy"]


def part_concepts(bl, scorer, tw_data, work: Path, args) -> dict:
    pairs = [tuple(c.split(":")) for c in args.concepts]
    names = [f"tw-{c}-{s}" for c, s in pairs]
    entries = []
    for (colour, shape), name in zip(pairs, names):
        data = work / "data" / name
        bl.write_concept(tw_data, data, colour, shape, None)
        entries.append({"name": name, "train_data_dir": str(data)})
    cfile = work / "concepts.json"
    cfile.write_text(json.dumps(entries, indent=1))
    sep_cpu = 0.0
    for e in entries:
        sep_cpu += run_script([*common(args.steps), "--train_data_dir", e["train_data_dir"], "--placeholder_token",
                               e["name"], "--output_dir", str(work / "separate" / e["name"])],
                              work / f"separate-{e['name']}.log")
        print(f"  separate {e['name']}: total {sep_cpu:.0f} CPU s", flush=True)
    many_cpu = run_script([*common(args.steps), "--concepts", str(cfile), "--output_dir", str(work / "batched")],
                          work / "batched.log")
    print(f"  batched: {many_cpu:.0f} CPU s", flush=True)
    rows = []
    for (colour, shape), name in zip(pairs, names):
        rows.append({"concept": f"{colour} {shape}",
                     "separate": score(scorer, work / "separate" / name / f"{name}.pt", work, args.samples, colour,
                                       shape),
                     "batched": score(scorer, work / "batched" / name / f"{name}.pt", work, args.samples, colour,
                                      shape)})
    return {"rows": rows, "separate_cpu_s": sep_cpu, "batched_cpu_s": many_cpu, "ratio": many_cpu / sep_cpu}


def part_sweep(bl, scorer, tw_data, work: Path, args) -> dict:
    colour, shape = args.sweep_concept.split(":")
    base = "tw-sweep"
    data = work / "data" / base
    bl.write_concept(tw_data, data, colour, shape, None)
    from utils.concepts import Defaults, expand_sweep, parse_sweep, single_concept

    defaults = Defaults(train_data_dir=str(data), learning_rate="5e-3", initializer_token="object")
    variants = expand_sweep([single_concept(base, defaults)], parse_sweep(args.sweep), defaults)
    sep_cpu = 0.0
    for v in variants:
        sep_cpu += run_script([*common(args.steps), "--train_data_dir", str(data), "--placeholder_token", v.name,
                               "--learning_rate", v.learning_rate, "--num_vectors", str(v.num_vectors),
                               "--output_dir", str(work / "sweep-separate" / v.name)],
                              work / f"sweep-separate-{v.name}.log")
        print(f"  separate {v.name}: total {sep_cpu:.0f} CPU s", flush=True)
    many_cpu = run_script([*common(args.steps), "--train_data_dir", str(data), "--placeholder_token", base,
                           "--sweep", args.sweep, "--output_dir", str(work / "sweep-batched")],
                          work / "sweep-batched.log")
    print(f"  batched: {many_cpu:.0f} CPU s", flush=True)
    rows = []
    for v in variants:
        rows.append({"concept": f"{colour} {shape}, lr {v.learning_rate}, {v.num_vectors} vector(s)",
                     "separate": score(scorer, work / "sweep-separate" / v.name / f"{v.name}.pt", work, args.samples,
                                       colour, shape),
                     "batched": score(scorer, work / "sweep-batched" / v.name / f"{v.name}.pt", work, args.samples,
                                      colour, shape)})
    return {"rows": rows, "separate_cpu_s": sep_cpu, "batched_cpu_s": many_cpu, "ratio": many_cpu / sep_cpu}


def markdown(name: str, part: dict) -> str:
    lines = [f"| {name} | accuracy, separate runs | accuracy, one run |", "|---|---|---|"]
    for r in part["rows"]:
        lines.append(f"| {r['concept']} | {r['separate']:.0%} | {r['batched']:.0%} |")
    lines.append(f"| **CPU time** | {part['separate_cpu_s']:.0f} s | {part['batched_cpu_s']:.0f} s "
                 f"(**{part['ratio']:.2f}x**) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["concepts", "sweep"], choices=["concepts", "sweep"])
    p.add_argument("--concepts", nargs="+", default=CONCEPTS, help="colour:shape pairs (tiny-world: 6 x 4)")
    p.add_argument("--sweep", default=SWEEP)
    p.add_argument("--sweep_concept", default="blue:triangle")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--samples", type=int, default=16, help="generated images per embedding")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="keep data, runs and logs here (default: a temp dir)")
    p.add_argument("--trainer_args", default="",
                   help="more flags for every run, both sides, e.g. '--eval_every 0' (the evaluation off)")
    args = p.parse_args(argv)
    EXTRA[:] = shlex.split(args.trainer_args)
    if not (TINYWORLD / "model_index.json").is_file():
        print(f"tiny-world model not found at {TINYWORLD}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    bl = _bench_learning()
    tw_data = bl._module(TINYWORLD / "data.py", "tinyworld_data")
    scorer = bl.Scorer(bl._module(TINYWORLD / "classify.py", "tinyworld_classify").classify)
    results = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_many_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for part in args.parts:
            print(f"[{time.perf_counter() - t0:5.0f}s] {part}", flush=True)
            fn = part_concepts if part == "concepts" else part_sweep
            results[part] = fn(bl, scorer, tw_data, work / part, args)
            if args.json:
                args.json.write_text(json.dumps({"steps": args.steps, **results}, indent=1))
    print()
    for part, res in results.items():
        print(markdown(f"{part} ({args.steps} steps)", res))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
