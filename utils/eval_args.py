"""The evaluation and early-stopping flags both trainers take, and their conversion into EvalOptions.

Kept apart from utils/cli.py and free of heavy imports (``--help`` stays fast); the evaluation itself is
utils/evaluator.py (what is measured and decided) and utils/eval_hook.py (how the training loop runs it).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from utils.config import EvalSettings
from utils.errors import UserError

# Measured on the tiny-world model (README: "Evaluation and early stopping"); utils/evaluator.py uses these too.
EVAL_EVERY = 25  # steps
EVAL_SET_SIZE = 16
DVAR_WINDOW = 3  # evaluations
DVAR_THRESHOLD = 0.15  # the paper's code default
DVAR_DIRECTION = 0.5  # the trained weights' mean cosine between consecutive moves must fall below this
PATIENCE = 8  # evaluations
SELECT_BEST = "eval_loss"
# On tiny-world a learned embedding's vector is ~2.8x the longest token embedding after 1000 steps while a colour
# word beside it in the prompt is still obeyed in every picture (README): warning at 1x would fire in every run.
NORM_WARN_FACTOR = 3.0
EVAL_NUM_IMAGES = 4

_METRIC = re.compile(r"eval_loss(_t\d+-\d+)?|clip_i|clip_t|dino")


def _cosine_or_none(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation and early stopping (README: Evaluation and early stopping)")
    g.add_argument("--eval_every", type=int, default=None,
                   help=f"Evaluate every N steps on a fixed set (same pictures, prompts, noise and timesteps each "
                        f"time; training is bit-identical with or without it). 0 = off. Default {EVAL_EVERY} with a "
                        f"folder of pictures or --eval_data_dir, else off.")
    g.add_argument("--eval_data_dir", default=None,
                   help="Held-out pictures (+ .txt captions) for the evaluation. Default: the training pictures.")
    g.add_argument("--eval_set_size", type=int, default=EVAL_SET_SIZE,
                   help=f"Samples in the evaluation set (pictures reused at other timesteps). Default "
                        f"{EVAL_SET_SIZE}.")
    g.add_argument("--early_stopping", choices=["none", "dvar", "patience"], default="none",
                   help="Stop when the evaluation loss has settled (dvar: Voronov et al. 2023, with a check that the "
                        "trained weights stopped moving in one direction), or when --patience_metric has not "
                        "improved for --patience evaluations. Default none: train to --max_train_steps.")
    g.add_argument("--dvar_window", type=int, default=DVAR_WINDOW,
                   help=f"DVAR: the last N evaluations whose variance is compared with the whole history's. Default "
                        f"{DVAR_WINDOW}.")
    g.add_argument("--dvar_threshold", type=float, default=DVAR_THRESHOLD,
                   help=f"DVAR: stop when that variance ratio falls below this. Default {DVAR_THRESHOLD}.")
    g.add_argument("--dvar_direction", type=_cosine_or_none, default=DVAR_DIRECTION,
                   help=f"DVAR: and when the mean cosine between consecutive moves of the trained weights falls "
                        f"below this; 'none': the loss alone decides (the paper's rule). Default {DVAR_DIRECTION}.")
    g.add_argument("--patience", type=int, default=PATIENCE,
                   help=f"Patience: evaluations without improvement before the stop. Default {PATIENCE}.")
    g.add_argument("--patience_metric", default="eval_loss",
                   help="Patience: eval_loss, a timestep band (eval_loss_t750-999), clip_i, clip_t or dino.")
    g.add_argument("--select_best", default=SELECT_BEST, metavar="METRIC",
                   help="Write <name>-best.pt/.safetensors at the evaluation with the best METRIC (lowest loss, "
                        "highest score): eval_loss, eval_loss_tA-B, clip_i, clip_t, dino; 'none': no best file. "
                        f"Default {SELECT_BEST}.")
    g.add_argument("--eval_clip_model", default=None, metavar="MODEL",
                   help="A transformers CLIP folder or Hub id: CLIP-I (sampled pictures against the training "
                        "pictures) and CLIP-T (against the prompt without the concept word) at every evaluation.")
    g.add_argument("--eval_dino_model", default=None, metavar="MODEL",
                   help="A transformers DINO (ViT / DINOv2) folder or Hub id: the DINO score at every evaluation.")
    g.add_argument("--eval_num_images", type=int, default=EVAL_NUM_IMAGES,
                   help=f"Pictures sampled (fixed seeds, main process) for the image scores. Default "
                        f"{EVAL_NUM_IMAGES}.")
    g.add_argument("--eval_prompt", default=None,
                   help="Prompt of those pictures. Default: the preview prompt, else 'a photo of [name]'.")
    g.add_argument("--norm_warn_factor", type=float, default=NORM_WARN_FACTOR,
                   help=f"Warn when a trained vector's norm exceeds this x the longest token embedding of the "
                        f"vocabulary (or is below the shortest). Default {NORM_WARN_FACTOR}.")


@dataclass
class EvalOptions:
    config: object | None  # utils.evaluator.EvalConfig; None: no evaluation
    data_dir: str | None  # held-out pictures; None: the training pictures
    clip_model: str | None
    dino_model: str | None
    num_images: int
    prompt: str | None
    norm_warn_factor: float


def _check_metric(flag: str, metric: str, clip: str | None, dino: str | None) -> None:
    if not _METRIC.fullmatch(metric):
        raise UserError(f"{flag} {metric}: not a metric; use eval_loss, a band such as eval_loss_t750-999, clip_i, "
                        f"clip_t or dino")
    if metric in ("clip_i", "clip_t") and not clip:
        raise UserError(f"{flag} {metric} needs --eval_clip_model")
    if metric == "dino" and not dino:
        raise UserError(f"{flag} {metric} needs --eval_dino_model")


def _check_model(flag: str, name: str | None) -> None:
    # A Hub id can only be checked by loading it; a path that does not exist is certainly wrong.
    if name and not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name):
        raise UserError(f"{flag} {name}: no such folder")


def eval_options(a: EvalSettings, train_data_dir: str | None) -> EvalOptions:
    """The evaluation flags, checked (one-line errors, before any model loads; torch only for a valid evaluation)."""
    folder_data = train_data_dir is not None
    every = a.eval_every
    if every is None:
        every = EVAL_EVERY if folder_data or a.eval_data_dir else 0
    if every < 0:
        raise UserError(f"--eval_every must be >= 0 (got {every})")
    if a.eval_data_dir is not None and not Path(a.eval_data_dir).is_dir():
        raise UserError(f"--eval_data_dir {a.eval_data_dir}: no such folder")
    if every and not folder_data and not a.eval_data_dir:
        raise UserError("--eval_every with --dataset_name needs --eval_data_dir (a folder of evaluation pictures)")
    for flag, value in (("--eval_set_size", a.eval_set_size), ("--eval_num_images", a.eval_num_images)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1 (got {value})")
    if not (math.isfinite(a.norm_warn_factor) and a.norm_warn_factor > 0):
        raise UserError(f"--norm_warn_factor must be a finite number > 0 (got {a.norm_warn_factor})")
    _check_model("--eval_clip_model", a.eval_clip_model)
    _check_model("--eval_dino_model", a.eval_dino_model)
    select_best = None if a.select_best.lower() == "none" else a.select_best
    if select_best:
        _check_metric("--select_best", select_best, a.eval_clip_model, a.eval_dino_model)
    if a.early_stopping == "patience":
        _check_metric("--patience_metric", a.patience_metric, a.eval_clip_model, a.eval_dino_model)
    if not every:
        if a.early_stopping != "none":
            raise UserError(f"--early_stopping {a.early_stopping} needs the evaluation (--eval_every > 0)")
        return EvalOptions(None, None, None, None, a.eval_num_images, None, a.norm_warn_factor)
    from utils.evaluator import EvalConfig

    try:
        cfg = EvalConfig(eval_every=every, eval_set_size=a.eval_set_size, early_stopping=a.early_stopping,
                         dvar_window=a.dvar_window, dvar_threshold=a.dvar_threshold, dvar_direction=a.dvar_direction,
                         patience=a.patience, patience_metric=a.patience_metric, select_best=select_best)
        cfg.make_rule()  # the rule's own checks (window >= 2, threshold in (0, 1), ...)
    except ValueError as e:
        raise UserError(f"--early_stopping {a.early_stopping}: {e}") from None
    return EvalOptions(cfg, a.eval_data_dir, a.eval_clip_model, a.eval_dino_model, a.eval_num_images, a.eval_prompt,
                       a.norm_warn_factor)
