#!/usr/bin/env bash
# The first check on a GPU, in one go (under 8 minutes on one GPU): fp16 and bf16 end-to-end runs of both trainers
# (previews and the final files included) and of inference.py on their results, then the SDPA and xformers rows of
# bench/bench_train.py at SD-1.5 512 px with random weights; one table at the end. Exit status 1 if a check failed.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]           # CUDA: the random-weight SD-1.5 model (built once, ~1 minute)
#   bash bench/gpu_smoke.sh --tiny [OUT_DIR]    # CPU, tiny model, bf16 only, a few steps: the same commands in
#                                               # about a minute (tests/test_gpu_readiness.py runs this)
#
# Each run's full output is in OUT_DIR/<run>.log; bench_train's rows are also in OUT_DIR/bench.json.
set -uo pipefail

tiny=0
if [[ "${1:-}" == "--tiny" ]]; then tiny=1; shift; fi
out=$(mkdir -p "${1:-gpu_smoke_out}" && cd "${1:-gpu_smoke_out}" && pwd)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
py=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=offline
export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error

if (( tiny )); then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  res=64; steps=2; precisions="bf16"; device=cpu
  bench_args=(--model tiny --device cpu --resolution 64 --batch_sizes 1 --steps 2 --warmup 1 --modes ours,hypernetwork
              --mixed_precision bf16 --no_isolate --no_pairing)
else
  res=512; steps=30; precisions="fp16 bf16"; device=cuda
  bench_args=(--model sd15 --device cuda --resolution 512 --batch_sizes 1 --steps 20 --warmup 5
              --modes ours,diffusers-example,bare,hypernetwork --mixed_precision fp16)
fi

# What runs where, and the model: fails in one line when a package or the GPU is missing.
"$py" - "$device" "$tiny" "$out" <<'EOF' || exit 2
import sys
device, tiny, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
import importlib.util
names = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "datasets", "PIL", "open_clip")
missing = [n for n in names if importlib.util.find_spec(n) is None]  # open_clip: only its BPE table is used
if missing:
    sys.exit(f"gpu_smoke.sh: missing Python packages: {', '.join(missing)} (pip install -r requirements.txt; "
             f"pip install --no-deps -r requirements-nodeps.txt)")
import torch
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_smoke.sh: no CUDA device; use --tiny for the CPU dry run")
sys.path.insert(0, "bench")
import bench_train
from utils.tiny_models import tiny_model_path

model = tiny_model_path("sd1") if tiny else bench_train.sd15_random_path()
open(f"{out}/model_path", "w").write(str(model))
try:
    import xformers
    xf = xformers.__version__
except Exception as e:
    xf = f"not usable ({type(e).__name__})"
import diffusers
gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
open(f"{out}/environment", "w").write(
    f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); diffusers {diffusers.__version__}; xformers {xf}")

# Training pictures at the run's resolution: smooth random colours with captions.
from pathlib import Path
from PIL import Image
res = 64 if tiny else 512
data = Path(out) / "data"
data.mkdir(exist_ok=True)
g = torch.Generator().manual_seed(0)
for i in range(6):
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(res, res), mode="bilinear", align_corners=False)[0]
    Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(data / f"{i:02d}.png")
    (data / f"{i:02d}.txt").write_text(f"a picture of colours {i}")
EOF
model=$(cat "$out/model_path")
: > "$out/results.tsv"

run() {  # run NAME PRECISION CMD... : time it, keep its output in OUT/NAME.log, note the result
  local name=$1 precision=$2; shift 2
  local t0 rc
  echo "[gpu_smoke] $name ($precision) ..." >&2
  t0=$(date +%s%N)
  "$@" > "$out/$name.log" 2>&1; rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$precision" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >> "$out/results.tsv"
}

common=(--pretrained_model_name_or_path "$model" --train_data_dir "$out/data" --resolution "$res"
        --train_batch_size 1 --max_train_steps "$steps" --checkpointing_steps "$steps" --save_every 0
        --preview_every 0 --preview_steps 10 --seed 0 --dataloader_num_workers 0)
for p in $precisions; do
  run "ti-$p" "$p" "$py" train_textual_inversion.py "${common[@]}" --mixed_precision "$p" --output_dir "$out/ti-$p" \
      --placeholder_token smoke-ti --initializer_token colours --gradient_checkpointing
  offload=(); [[ "$p" == "fp16" || "$tiny" == 1 ]] && offload=(--offload_text_encoder)
  run "hn-$p" "$p" "$py" train_hypernetwork.py "${common[@]}" --mixed_precision "$p" --output_dir "$out/hn-$p" \
      --hypernetwork_name smoke-hn --learning_rate 1e-4 "${offload[@]}"
  run "inference-$p" "$p" "$py" inference.py --pretrained_model_name_or_path "$model" --mixed_precision "$p" \
      --embeddings_dir "$out/ti-$p" --hypernetwork_dir "$out/hn-$p" --device "$device" --steps 10 \
      --prompt "a picture of smoke-ti <hypernet:smoke-hn:1>" --width "$res" --height "$res" --seed 1 \
      --outdir "$out/inference-$p"
done
run bench - "$py" bench/bench_train.py "${bench_args[@]}" --attention sdpa,xformers --repeats 1 \
    --json "$out/bench.json"

# One table.
"$py" - "$out" <<'EOF'
import csv
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[1])
rows, failed = [], False


def picture(folder: Path) -> str:
    pngs = sorted(folder.glob("*.png"))
    if not pngs:
        return "no image"
    px = np.asarray(Image.open(pngs[-1]).convert("RGB"), dtype=np.float32)
    return f"{'BLACK ' if px.max() == 0 else ''}image mean {px.mean():.0f}, std {px.std():.0f}"


for name, precision, rc, ms in csv.reader(open(out / "results.tsv"), delimiter="\t"):
    log = (out / f"{name}.log").read_text(errors="replace")
    errors = [line for line in log.splitlines() if ": error:" in line or line.startswith(("FAILED", "Traceback"))]
    if name == "bench":
        continue
    ok = rc == "0"
    detail = []
    folder = out / name
    if name.startswith(("ti-", "hn-")) and ok:
        settings = json.loads((folder / "training_settings.json").read_text())
        losses = [float(r["loss"]) for r in csv.DictReader(open(next(folder.glob("*_loss.csv"))))]
        skipped = re.search(r"skipped (\d+) update", log)
        speed = re.findall(r"(\d+\.\d+)it/s", log)
        detail += [f"{settings['final_step']} steps", f"{skipped.group(1) if skipped else 0} skipped by the scaler",
                   f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses and all(map(math.isfinite, losses))
                   else "NON-FINITE loss", f"{speed[-1]} it/s" if speed else "", picture(folder / "images")]
    elif name.startswith("inference-") and ok:
        detail.append(picture(folder))
    if not ok:
        detail.append(errors[-1][:200] if errors else log.strip().splitlines()[-1][:200] if log.strip() else "")
    if "BLACK" in " ".join(detail) or "NON-FINITE" in " ".join(detail):
        ok = False
    failed |= not ok
    rows.append((name, precision, "ok" if ok else "FAILED", f"{int(ms) / 1000:.0f}", "; ".join(d for d in detail if d)))

bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {"rows": [], "errors": []}
settings = bench.get("settings", {})
for r in bench["rows"]:
    mem = f", peak {r['peak_mem_mb']:.0f} MB (+{r['added_mem_mb']:.0f})" if r.get("peak_mem_mb") is not None else ""
    rows.append((f"bench {r['mode']} {r['attention']} b{r['batch_size']}", settings.get("mixed_precision", ""), "ok",
                 "", f"{r['steps_per_s']:.1f} steps/s, {r['images_per_s']:.1f} images/s{mem}"))
for e in bench["errors"]:
    # xformers absent is not a failure of this project's code
    absent = "xformers is not installed" in e["error"] or "xformers needs a CUDA GPU" in e["error"]
    failed |= not absent
    rows.append((f"bench {e['mode']} {e.get('attention', '')}", settings.get("mixed_precision", ""), "n/a" if absent else "FAILED", "",
                 e["error"][-200:]))
if not (out / "bench.json").is_file():
    failed = True
    rows.append(("bench", "", "FAILED", "", "no bench.json: see bench.log"))

env = (out / "environment").read_text() if (out / "environment").is_file() else "?"
print(f"\n## gpu_smoke: {env}\n")
print("| check | precision | status | s | detail |")
print("|---|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
print(f"\nlogs and outputs in {out}")
sys.exit(1 if failed else 0)
EOF
