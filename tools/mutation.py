"""Mutation testing of the training core with mutmut: do the tests fail when the code is wrong?

    python tools/mutation.py                       # every module below (long: see docs/testing.md)
    python tools/mutation.py diffusion_loss lr_schedule --max-children 2
    python tools/mutation.py --list                # the modules and the test files that must kill their mutants
    python tools/mutation.py diffusion_loss --show  # the diff of every surviving mutant
    python tools/mutation.py training --sample 120  # a random 120 of the module's mutants (seed 0): a score estimate
    python tools/mutation.py training --try MUTANT tests/test_hardening.py  # one mutant against other test files

Each module is mutated on its own, against only the test files mapped to it below (mutmut then runs, per mutant,
only the tests among those that call the mutated function), so a run fits on 2 CPU cores. The work happens in
``.mutation/<module>/``, a fresh copy of the working tree (the repository itself is never modified); mutmut keeps its
results there, so a rerun after a test change re-checks only what changed. Not part of CI: a full run takes a while.

The score printed is killed / all mutants checked (a timeout counts as killed, a mutant no mapped test reaches as not
killed). With --sample N only a seeded random N of the module's mutants are checked (the big modules have thousands:
more than a day on 2 cores) and the score comes with its 95% interval (Wilson); the same seed picks the same mutants,
so a rerun after a new test re-checks that sample.
Judge each survivor in docs/testing.md: equivalent (say why) or give it a test.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"

# module -> (source file(s) relative to the root, the test files that should kill its mutants)
MODULES: dict[str, tuple[str, list[str]]] = {
    # cheapest test files first: they run first (tools/mutation_order.py) and usually kill the mutant alone
    "diffusion_loss": ("utils/diffusion_loss.py", ["tests/test_diffusion_loss.py", "tests/test_loop_numerics.py"]),
    "text_encoders": ("utils/text_encoders.py",
                      ["tests/test_token_splice.py", "tests/test_text_encoders.py", "tests/test_loop_numerics.py"]),
    "lr_schedule": ("utils/lr_schedule.py", ["tests/test_lr_schedule.py", "tests/test_loop_numerics.py"]),
    "textual_inversion": ("utils/trainers/textual_inversion.py",
                          ["tests/test_textual_inversion.py", "tests/test_a1111_rules.py", "tests/test_loop_numerics.py",
                           "tests/test_training_loop.py", "tests/test_sdxl.py"]),
    "training": ("utils/training.py", ["tests/test_loop_contract.py", "tests/test_loop_numerics.py",
                                        "tests/test_training_loop.py"]),
    # utils/data.py becomes the package utils/data/ (either layout is handled below)
    "data": ("utils/data", ["tests/test_balanced.py", "tests/test_a1111_rules.py", "tests/test_data.py"]),
    "latents": ("utils/latents.py", ["tests/test_latents.py"]),
}

# Tests under mutation: quiet, stop at the first failure (a mutant is killed by one), no cache, no --durations, and
# the mapped test files in their listed order (cheap unit tests first: see tools/mutation_order.py).
PYTEST_ARGS = ["-p", "no:cacheprovider", "-p", "tools.mutation_order", "-o", "addopts=", "-x", "-q"]


def source_patterns(source: str) -> list[str]:
    """Glob patterns for mutmut's only_mutate (a module file, or every file of a package)."""
    if source.endswith(".py"):
        return [source]
    if (ROOT / source).is_dir():
        return [f"{source}/*.py", f"{source}/**/*.py"]
    return [f"{source}.py"]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if line and not line.startswith(".mutation/")]


def prepare(name: str) -> Path:
    """.mutation/<name>/: the working tree's current files, mutmut's config, and ../shared reachable as before."""
    source, tests = MODULES[name]
    missing = [t for t in tests if not (ROOT / t).is_file()]
    if missing:
        print(f"warning: {name}: test file(s) not found, left out: {' '.join(missing)}", file=sys.stderr)
        tests = [t for t in tests if t not in missing]
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    tests_changed = False
    for rel in tracked_files():
        src, dst = ROOT / rel, work / rel
        if not src.is_file():
            continue
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue  # unchanged: keep the timestamp so mutmut's caches stay valid
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        tests_changed = tests_changed or rel.startswith("tests/")
    # mutmut's record of which tests call which function can miss a test added to a file it already knew (seen: a
    # survivor that the new test kills when run by hand): collect it again whenever a test file changed.
    stats = work / "mutants" / "mutmut-stats.json"
    if tests_changed and stats.is_file():
        stats.unlink()
    # tests/conftest.py finds the shared fixtures at <repo root>/../shared; mutmut runs the tests in work/mutants.
    shared = ROOT.parent / "shared"
    link = work / "shared"
    if shared.exists() and not link.exists():
        link.symlink_to(shared)
    top_level = sorted({rel.split("/")[0] for rel in tracked_files()} - {"utils", "tests", "setup.cfg"})
    lines = [
        "[mutmut]",
        "source_paths=utils",
        "only_mutate=" + "\n    ".join(source_patterns(source)),
        "also_copy=" + "\n    ".join(p for p in top_level if (work / p).exists()),
        "pytest_add_cli_args=" + "\n    ".join(PYTEST_ARGS),
        "pytest_add_cli_args_test_selection=" + "\n    ".join(tests),
        "process_isolation=forkserver",
        "use_git_change_detection=false",
        # the tests load tiny models and train a few steps: allow for a loaded machine before calling a timeout
        "timeout_multiplier=10",
        "timeout_constant=30",
        "",
    ]
    (work / "setup.cfg").write_text("\n".join(lines))
    return work


def mutmut(work: Path, *args: str, capture: bool = False, order: list[str] | None = None
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "EMBEDFORGE_MUTATION_TEST_ORDER": ",".join(order or [])}
    env.pop("CI", None)  # a missing ../shared is a skip here, not a failure
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, env=env, text=True,
                          capture_output=capture)


def results(work: Path) -> dict[str, list[str]]:
    """mutant name -> status, from `mutmut results --all true` (lines like '    utils.x.x_f__mutmut_3: survived')."""
    out = mutmut(work, "results", "--all", "true", capture=True).stdout
    by_status: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if m:
            by_status.setdefault(m.group(2).strip(), []).append(m.group(1))
    return by_status


def summary(name: str, by_status: dict[str, list[str]]) -> str:
    killed = len(by_status.get("killed", []))
    timeouts = len(by_status.get("timeout", []))
    survived = len(by_status.get("survived", []))
    no_tests = len(by_status.get("no tests", []))
    other = {k: len(v) for k, v in by_status.items() if k not in ("killed", "timeout", "survived", "no tests")}
    judged = killed + timeouts + survived + no_tests  # a mutant no mapped test reaches is not killed either
    score = f"{100 * (killed + timeouts) / judged:.1f}%" if judged else "n/a"
    extra = f", other {other}" if other else ""
    return (f"{name:18s} killed {killed + timeouts:4d} (timeouts {timeouts}) survived {survived:4d} "
            f"no tests {no_tests:3d}  score {score}{extra}")


def all_mutants(work: Path, order: list[str]) -> list[str]:
    """Every mutant name of the module. mutmut has no generate-only command: `run` with a filter that matches nothing
    generates the mutants (and the test map), then stops on the empty selection; the names are then in `results`."""
    names = sorted(n for group in results(work).values() for n in group)
    if not names:
        probe = mutmut(work, "run", "--max-children", "1", "no-such-mutant-only-generate", capture=True, order=order)
        names = sorted(n for group in results(work).values() for n in group)
        if not names:
            last = (probe.stdout + probe.stderr).strip().splitlines()[-3:]
            raise SystemExit(f"mutmut listed no mutants in {work} (rerun; its last words: {' | '.join(last)})")
    return names


TRY_TIMEOUT_S = 600


def try_mutant(work: Path, mutant: str, tests: list[str]) -> int:
    """One mutant against ``tests`` in the module's mutated copy (mutmut's trampolines read MUTANT_UNDER_TEST);
    returns 0 when a test fails (killed), 1 when all pass (survived)."""
    if not (work / "mutants").is_dir():
        print(f"no mutants in {work}: run the module first", file=sys.stderr)
        return 2
    for rel in tracked_files():  # today's tests (the mutated copy's may be older)
        if rel.startswith("tests/") and (ROOT / rel).is_file():
            dst = work / "mutants" / rel
            if not dst.is_file() or dst.read_bytes() != (ROOT / rel).read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dst)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MUTANT_UNDER_TEST": mutant}
    env.pop("CI", None)
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS[:-2], "-x", "-q", *tests],
                           cwd=work / "mutants", env=env, capture_output=True, text=True, timeout=TRY_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # e.g. a mutant that loops forever: mutmut counts a timeout as killed
        print(f"{mutant}: killed (timeout after {TRY_TIMEOUT_S} s) by {' '.join(tests)}")
        return 0
    tail = (r.stdout.strip().splitlines() or [""])[-1]
    verdict = "killed" if r.returncode == 1 else "survived" if r.returncode == 0 else f"error (pytest {r.returncode})"
    print(f"{mutant}: {verdict} by {' '.join(tests)}  [{tail}]")
    return 0 if r.returncode == 1 else 1


def wilson(killed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion estimated from a random sample (Wilson score interval)."""
    if n == 0:
        return 0.0, 1.0
    p = killed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def print_survivors(work: Path, by_status: dict[str, list[str]], show: bool) -> None:
    """Every mutant not killed, by status ("not checked" ones are only counted); with ``show`` each survivor's diff."""
    for status in ("survived", "no tests", "suspicious", "segfault"):
        for mutant in by_status.get(status, []):
            print(f"  {status}: {mutant}")
            if show and status == "survived":
                print(mutmut(work, "show", mutant, capture=True).stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help=f"any of {', '.join(MODULES)} (default: all)")
    p.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2: the CPU count)")
    p.add_argument("--list", action="store_true", help="print the module -> tests map and exit")
    p.add_argument("--show", action="store_true", help="after the run, print the diff of every surviving mutant")
    p.add_argument("--results-only", action="store_true", help="report the last run's results without running")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="check only a random N of each module's mutants (a score estimate with its 95%% interval)")
    p.add_argument("--seed", type=int, default=0, help="which random sample --sample takes (default 0)")
    p.add_argument("--try", dest="try_", nargs="+", metavar=("MUTANT", "TEST"),
                   help="run one mutant (a name from the report) against the given test files, e.g. a survivor "
                        "against tests outside the module's map; exit 0 = killed")
    args = p.parse_args(argv)

    names = args.modules or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    if args.list:
        for n in names:
            print(f"{n}: {MODULES[n][0]} <- {' '.join(MODULES[n][1])}")
        return 0

    if args.try_:
        if len(names) != 1 or len(args.try_) < 2:
            p.error("--try needs one module, a mutant name and at least one test file")
        return try_mutant(WORK / names[0], args.try_[0], args.try_[1:])

    lines = []
    for n in names:
        work = prepare(n) if not args.results_only else WORK / n
        if args.sample:
            everything = all_mutants(work, MODULES[n][1])
            chosen = sorted(random.Random(args.seed).sample(everything, min(args.sample, len(everything))))
            status = {m: s for s, group in results(work).items() for m in group}
            todo = [m for m in chosen if status.get(m) in (None, "not checked", "survived")]
            if todo and not args.results_only:
                print(f"== {n}: {len(todo)} of a sample of {len(chosen)} (seed {args.seed}) of {len(everything)} "
                      f"mutants of {MODULES[n][0]} against {' '.join(MODULES[n][1])}", flush=True)
                rc = mutmut(work, "run", "--max-children", str(args.max_children), *todo,
                            order=MODULES[n][1]).returncode
                if rc not in (0, 1):
                    print(f"mutmut exited with {rc} for {n}", file=sys.stderr)
            chosen_set = set(chosen)
            by_status = {s: [m for m in group if m in chosen_set] for s, group in results(work).items()}
            by_status = {s: group for s, group in by_status.items() if group}
            line = summary(n, by_status)
            judged = sum(len(by_status.get(s, [])) for s in ("killed", "timeout", "survived", "no tests"))
            killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", []))
            lo, hi = wilson(killed, judged)
            lines.append(f"{line}  (sample {len(chosen)} of {len(everything)}, seed {args.seed}; "
                         f"95% interval {100 * lo:.1f}-{100 * hi:.1f}%)")
            print_survivors(work, by_status, args.show)
            continue
        if not args.results_only:
            print(f"== {n}: mutating {MODULES[n][0]} against {' '.join(MODULES[n][1])}", flush=True)
            # mutmut keeps a verdict once given; survivors of an earlier run are checked again against today's tests
            stale = results(work).get("survived", []) if (work / "mutants").is_dir() else []
            run = ["run", "--max-children", str(args.max_children)]
            rc = mutmut(work, *run, order=MODULES[n][1]).returncode
            if stale and rc in (0, 1):
                rc = mutmut(work, *run, *stale, order=MODULES[n][1]).returncode
            if rc not in (0, 1):
                print(f"mutmut exited with {rc} for {n}", file=sys.stderr)
        by_status = results(work)
        lines.append(summary(n, by_status))
        print_survivors(work, by_status, args.show)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
