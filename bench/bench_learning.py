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
    images, params = tw_data.generate(n, seed=7, partial_prob=0.0, colour=colour, shape=shape)
    for i, (arr, p) in enumerate(zip(images, params)):
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        if layout:
            (folder / f"{i:02d}.txt").write_text(caption(p, layout), encoding="utf-8")


def train(data: Path, out: Path, extra: list[str], steps: int, every: int) -> float:
    import train_textual_inversion

    argv = ["--pretrained_model_name_or_path", str(TINYWORLD), "--train_data_dir", str(data), "--placeholder_token",
            NAME, "--initializer_token", INIT_WORD, "--resolution", "64", "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--seed", "0", "--output_dir", str(out), "--no_previews",
            "--save_every", str(every), "--checkpointing_steps", "0", *extra]
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
        return {"accuracy": sum(p == (colour, shape) for p in preds) / samples,
                "colour_acc": sum(c == colour for c, _ in preds) / samples,
                "shape_acc": sum(s == shape for _, s in preds) / samples}


def run_setting(scorer, tw_data, work: Path, setting: str, colour: str, shape: str, args) -> list[dict]:
    tag = f"{setting.replace('=', '_')}-{colour}-{shape}"
    data, out = work / tag / "data", work / tag / "out"
    write_concept(tw_data, data, colour, shape, CAPTIONS.get(setting))
    cpu = train(data, out, SETTINGS[setting], args.max_steps, args.every)
    rows = []
    for step in range(args.every, args.max_steps + 1, args.every):
        # periodic copies are named "<name>-<step>"; the last step is only in the final file, named "<name>"
        last = step == args.max_steps
        name = NAME if last else f"{NAME}-{step}"
        src = out / f"{NAME}.pt" if last else out / "embeddings" / f"{name}.pt"
        folder = work / tag / f"step{step}"  # one embedding per folder: nothing else is loaded
        folder.mkdir(exist_ok=True)
        os.replace(src, folder / src.name)
        r = scorer.rates(f"a photo of a {name}", folder, args.samples, colour, shape)
        rows.append({"setting": setting, "concept": f"{colour} {shape}", "step": step, **r,
                     "train_cpu_s": round(cpu, 1)})
    return rows


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
                   help="colour:shape pairs from tiny-world's 6 colours x 4 shapes")
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--samples", type=int, default=16, help="generated images per measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on 2 shared cores, 2 threads beside other busy processes ran 5-10x slower)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data and embeddings here (default: a temp dir)")
    args = p.parse_args(argv)
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
    print(markdown(rows, baselines, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
