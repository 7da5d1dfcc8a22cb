#!/usr/bin/env python
"""How fast textual inversion learns a concept, per setting: accuracy vs steps on the tiny-world model.

For each concept (colour + shape) 16 images are rendered with ../shared/models/tinyworld/data.py; for each setting an
embedding is trained from the init word "object" with train_textual_inversion.main() (a copy saved every --every
steps), and each copy generates --samples images for "a photo of a <name>" (DDIM, guidance 2, 20 steps, the same seeds
for every copy), scored by tiny-world's pixel classifier: the share that shows the concept's colour AND shape.

    python bench/bench_learning.py                              # every setting, accuracy every 25 steps up to 200
    python bench/bench_learning.py --settings default lr=2e-3 --concepts blue:triangle --json out.json

Settings change one thing against the defaults (lr 5e-3, batch 4, 1 vector, subject template, no captions):
lr=X, batch=N, vectors=N, and the caption layouts: bg_filewords (captions name only the background, template
subject_filewords), full_filewords (captions name colour and shape too: the prompt then carries the concept) and
caption_only (captions "a photo of a [name] on a white background", --caption_only).
A concept "mixed:SHAPE" is learned from pictures of mixed colours and judged on the shape alone.

Early stopping (--early_stop dvar|patience): each run evaluates the fixed evaluation set every --eval_every steps
(utils/evaluator.py), stops where the rule fires and keeps the step --select_best chooses; the table gives, beside the
accuracy every --every steps, the first step at 0.8, the stop step and its accuracy, the chosen step and its accuracy
(and whether the issue-16 targets hold: stop at accuracy >= 0.8 no later than twice the first step at 0.8; chosen
accuracy >= 0.9 x the best seen).

    python bench/bench_learning.py --early_stop dvar --settings default vectors=2 \
        --concepts blue:triangle orange:circle mixed:square --max_steps 3000

The runs are the trainer's own (--eval_every, --early_stopping, --dvar_*, --patience, --select_best); without
--early_stop the evaluation is off (--eval_every 0), so the timings are training alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINYWORLD = ROOT.parent / "shared" / "models" / "tinyworld"
NAME = "tw-concept"
INIT_WORD = "object"
GEN = dict(steps=20, sampler="DDIM", cfg_scale=2.0, seed=1000, width=64, height=64)

SETTINGS = {
    "default": [],
    "lr=2e-3": ["--learning_rate", "0.002"],
    "lr=1e-2": ["--learning_rate", "0.01"],
    "batch=1": ["--train_batch_size", "1"],
    "vectors=2": ["--num_vectors", "2"],
    "bg_filewords": [],  # captions written by write_concept(); the default template becomes subject_filewords
    "full_filewords": [],
    "caption_only": ["--caption_only"],
}
CAPTIONS = {"bg_filewords": "background", "full_filewords": "full", "caption_only": "name"}


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def caption(params: dict, layout: str) -> str:
    if layout == "background":
        return f"{params['bgname']} background"
    if layout == "full":
        return params["caption"]
    return params["caption"].replace(f"{params['colour']} {params['shape']}", "[name]")


def write_concept(tw_data, folder: Path, colour: str, shape: str, layout: str | None, n: int = 16) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images, params = tw_data.generate(n, seed=7, partial_prob=0.0, colour=None if colour == "mixed" else colour,
                                      shape=shape)
    for i, (arr, p) in enumerate(zip(images, params)):
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        if layout:
            (folder / f"{i:02d}.txt").write_text(caption(p, layout), encoding="utf-8")


def train(data: Path, out: Path, extra: list[str], steps: int, every: int, early=None) -> float:
    import train_textual_inversion

    argv = ["--pretrained_model_name_or_path", str(TINYWORLD), "--train_data_dir", str(data), "--placeholder_token",
            NAME, "--initializer_token", INIT_WORD, "--resolution", "64", "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--seed", str(early.seed if early else 0), "--output_dir", str(out),
            "--save_every", str(every), "--checkpointing_steps", "0", "--no_previews", *extra]
    if early is None:
        argv += ["--eval_every", "0"]
    else:  # the trainer's own evaluation, stopping rule and best-step choice
        argv += ["--eval_every", str(early.eval_every), "--eval_set_size", str(early.eval_set_size),
                 "--early_stopping", early.early_stop, "--dvar_window", str(early.dvar_window),
                 "--dvar_threshold", str(early.dvar_threshold), "--dvar_direction", str(early.dvar_direction),
                 "--patience", str(early.patience), "--select_best", early.select_best]
    t = time.process_time()
    # the trainer's messages and progress bars would flood the table's log
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_textual_inversion.main(argv) == 0
    return time.process_time() - t


class Scorer:
    def __init__(self, classify):
        from utils.models import ModelSource, load_pipeline

        self.loaded = load_pipeline(ModelSource(str(TINYWORLD)))
        self.classify = classify

    def rates(self, prompt: str, embeddings_dir: Path | None, samples: int, colour: str, shape: str) -> dict:
        from utils.generation import GenerationParams, generate
        from utils.prompts import EmbeddingDatabase, PromptEncoder

        encoder = PromptEncoder(self.loaded.pipeline, EmbeddingDatabase([embeddings_dir] if embeddings_dir else []))
        images = generate(self.loaded, encoder, GenerationParams(prompt=prompt, batch_size=samples, **GEN),
                          progress=False)
        preds = [self.classify(im.image) for im in images]
        # "mixed": the concept is the shape alone (learned from pictures of every colour)
        return {"accuracy": sum(s == shape and colour in (c, "mixed") for c, s in preds) / samples,
                "colour_acc": sum(c == colour for c, _ in preds) / samples,
                "shape_acc": sum(s == shape for _, s in preds) / samples}


def saved_steps(out: Path) -> dict[int, Path]:
    """Step -> embedding file: the periodic copies "<name>-<step>.pt" and the final "<name>.pt" (at its step)."""
    import torch

    found = {int(p.stem.rsplit("-", 1)[1]): p for p in (out / "embeddings").glob(f"{NAME}-*.pt")}
    final = out / f"{NAME}.pt"
    if final.is_file():
        found.setdefault(int(torch.load(final, weights_only=True)["step"]), final)
    return dict(sorted(found.items()))


def run_setting(scorer, tw_data, work: Path, setting: str, colour: str, shape: str, args) -> list[dict]:
    tag = f"{setting.replace('=', '_')}-{colour}-{shape}"
    data, out = work / tag / "data", work / tag / "out"
    write_concept(tw_data, data, colour, shape, CAPTIONS.get(setting))
    early = args if args.early_stop else None
    cpu = train(data, out, SETTINGS[setting], args.max_steps, args.every, early)
    rows = []
    for step, src in saved_steps(out).items():
        if step % args.every:
            continue  # the final file one step after an early stop
        name = src.stem
        folder = work / tag / f"step{step}"  # one embedding per folder: nothing else is loaded
        folder.mkdir(exist_ok=True)
        os.replace(src, folder / src.name)
        r = scorer.rates(f"a photo of a {name}", folder, args.samples, colour, shape)
        rows.append({"setting": setting, "concept": f"{colour} {shape}", "step": step, **r,
                     "train_cpu_s": round(cpu, 1)})
    if early:
        for r in rows:
            r.update(stop_summary(out / "evaluation.json", args.select_best, rows))
    return rows


def stop_summary(path: Path, metric: str, rows: list[dict]) -> dict:
    """Where the rule stopped and which step the metric picks (among evaluations up to the stop), with the
    accuracies there and the issue-16 targets."""
    from utils.evaluator import metric_mode

    ev = json.loads(path.read_text(encoding="utf-8"))
    acc = {r["step"]: r["accuracy"] for r in rows}
    stop = ev.get("stopped_at")
    first = min((s for s, a in acc.items() if a >= 0.8), default=None)
    upto = [h for h in ev["history"] if h["step"] > 0 and (stop is None or h["step"] <= stop) and metric in h]
    pick = (min if metric_mode(metric) == "min" else max)(upto, key=lambda h: h[metric])["step"] if upto else None
    seen = max((a for s, a in acc.items() if stop is None or s <= stop), default=None)
    out = {"first_0.8": first, "stop": stop, "stop_acc": acc.get(stop), "best": pick, "best_acc": acc.get(pick),
           "best_seen": seen, "best_metric": metric}
    out["stop_ok"] = bool(stop is not None and first is not None and acc.get(stop, 0) >= 0.8 and stop <= 2 * first)
    out["best_ok"] = bool(pick is not None and seen is not None and acc.get(pick, 0) >= 0.9 * seen)
    return out


def early_markdown(rows: list[dict], every: int) -> str:
    keys = dict.fromkeys((r["setting"], r["concept"]) for r in rows)
    last = max((r["stop"] or r["step"]) for r in rows)
    steps = list(range(every, last + 1, every))
    lines = ["| setting | concept | " + " | ".join(str(s) for s in steps) + " | first 0.8 | stop (acc) | "
             "best (acc) | best seen | targets |", "|---|---|" + "---|" * len(steps) + "---|---|---|---|---|"]
    for setting, concept in keys:
        mine = {r["step"]: r for r in rows if r["setting"] == setting and r["concept"] == concept}
        r = next(iter(mine.values()))
        cells = [f"{mine[s]['accuracy']:.0%}" if s in mine else "" for s in steps]

        def at(step, a):
            return "-" if step is None else f"{step} ({a:.0%})" if a is not None else str(step)

        targets = ("stop ok" if r["stop_ok"] else "stop MISSED") + ", " + ("best ok" if r["best_ok"] else "best MISSED")
        lines.append(f"| {setting} | {concept} | " + " | ".join(cells) + f" | {r['first_0.8']} | "
                     f"{at(r['stop'], r['stop_acc'])} | {at(r['best'], r['best_acc'])} | "
                     f"{'-' if r['best_seen'] is None else format(r['best_seen'], '.0%')} | {targets} |")
    return "\n".join(lines)


def markdown(rows: list[dict], baselines: dict, steps: list[int]) -> str:
    lines = ["| setting | concept | " + " | ".join(str(s) for s in steps) + " | train CPU s |",
             "|---|---|" + "---|" * len(steps) + "---|"]
    keys = dict.fromkeys((r["setting"], r["concept"]) for r in rows)
    for setting, concept in keys:
        mine = {r["step"]: r for r in rows if r["setting"] == setting and r["concept"] == concept}
        cells = [f"{mine[s]['accuracy']:.0%}" if s in mine else "" for s in steps]
        cpu = next(iter(mine.values()))["train_cpu_s"]
        lines.append(f"| {setting} | {concept} | " + " | ".join(cells) + f" | {cpu} |")
    for concept, b in baselines.items():
        lines.append(f"| '{INIT_WORD}' alone | {concept} | " + " | ".join(f"{b:.0%}" for _ in steps) + " | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--concepts", nargs="+", default=["blue:triangle", "orange:circle"],
                   help="colour:shape pairs from tiny-world's 6 colours x 4 shapes (colour 'mixed': pictures of "
                        "every colour, judged on the shape)")
    p.add_argument("--max_steps", type=int, default=None, help="default 200, with --early_stop 3000")
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--samples", type=int, default=16, help="generated images per measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on 2 shared cores, 2 threads beside other busy processes ran 5-10x slower)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    g = p.add_argument_group("early stopping (utils/evaluator.py; defaults are the trainer's)")
    from utils import evaluator as ev

    g.add_argument("--early_stop", choices=["dvar", "patience"], default=None,
                   help="train with evaluation and this stopping rule; report the stop and the chosen step")
    g.add_argument("--eval_every", type=int, default=ev.EVAL_EVERY, help="a multiple of --every")
    g.add_argument("--eval_set_size", type=int, default=ev.EVAL_SET_SIZE)
    g.add_argument("--dvar_window", type=int, default=ev.DVAR_WINDOW, help="evaluations")
    g.add_argument("--dvar_threshold", type=float, default=ev.DVAR_THRESHOLD)
    g.add_argument("--dvar_direction", type=lambda v: None if v == "none" else float(v), default=ev.DVAR_DIRECTION,
                   help="the direction check's cosine threshold; 'none': the loss alone (the paper's rule)")
    g.add_argument("--patience", type=int, default=ev.PATIENCE, help="evaluations")
    g.add_argument("--select_best", default=ev.SELECT_BEST, help="eval_loss or a band, e.g. eval_loss_t750-999")
    g.add_argument("--seed", type=int, default=0, help="the training seed")
    p.add_argument("--workdir", type=Path, default=None, help="keep data and embeddings here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.max_steps is None:
        args.max_steps = 3000 if args.early_stop else 200
    if args.early_stop and args.eval_every % args.every:
        p.error("--eval_every must be a multiple of --every (the stop and chosen steps need a saved copy)")
    if not (TINYWORLD / "model_index.json").is_file():
        print(f"tiny-world model not found at {TINYWORLD}", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(args.threads)
    concepts = [tuple(c.split(":")) for c in args.concepts]
    tw_data = _module(TINYWORLD / "data.py", "tinyworld_data")
    classify = _module(TINYWORLD / "classify.py", "tinyworld_classify").classify
    scorer = Scorer(classify)
    steps = list(range(args.every, args.max_steps + 1, args.every))

    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        work = args.workdir or Path(tmp)
        baselines = {f"{c} {s}": scorer.rates(f"a photo of a {INIT_WORD}", None, args.samples, c, s)["accuracy"]
                     for c, s in concepts}
        rows: list[dict] = []
        t0 = time.perf_counter()
        for setting in args.settings:
            for colour, shape in concepts:
                new = run_setting(scorer, tw_data, work, setting, colour, shape, args)
                rows += new
                print(f"[{time.perf_counter() - t0:6.0f}s] {setting:15s} {colour} {shape}: "
                      + " ".join(f"{r['step']}:{r['accuracy']:.0%}" for r in new), flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"rows": rows, "baselines": baselines, "generation": GEN},
                                                    indent=1))
    print()
    print(early_markdown(rows, args.every) if args.early_stop else markdown(rows, baselines, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
