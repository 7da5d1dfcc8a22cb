"""Everything measured and decided at an evaluation, in one object with one JSON-able state.

utils/eval_hook.py runs it as a step hook of the training loop (utils/training.py)::

    evaluator = Evaluator(EvalConfig(...), eval_set.to(device), noise_scheduler, prediction_type, vocab=...)
    share = evaluator.losses(predict, rank, world)         # this process's samples, zeros elsewhere
    per_sample = reduce_sum_over_processes(share)           # every process then holds all the losses
    result = evaluator.record(step, per_sample, vectors=..., extra={"clip_i": ...})
    # result.metrics -> trackers and evaluation.csv; result.new_best -> "<name>-best"; result.stop -> end the run
    checkpoint: evaluator.state_dict();  resume: evaluator.load_state_dict(...)
    at the end: evaluator.write_report(out_dir) (evaluation.json, evaluation.png); evaluator.summary()

Decisions depend only on the recorded values, so every process makes the same one, and a resumed run (with the
state from its checkpoint) makes the same decision at the same step as the uninterrupted run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from utils.early_stopping import DVAR, BestStep, Patience, Rule
from utils.eval_args import (  # the defaults measured on tiny-world live with the flags (fast --help)
    DVAR_DIRECTION,
    DVAR_THRESHOLD,
    DVAR_WINDOW,
    EVAL_EVERY,
    EVAL_SET_SIZE,
    PATIENCE,
    SELECT_BEST,
)
from utils.eval_report import NormWatch, VocabularyNorms, plot_curves
from utils.evaluation import DEFAULT_BANDS, EvalSet, Predict, evaluate, join_sets, summarize

DVAR_WINDOW_FRACTION = 0.0  # the paper's fixed window

HIGHER_IS_BETTER = ("clip_i", "clip_t", "dino")


def metric_mode(metric: str) -> str:
    """"max" for similarity scores, "min" for losses."""
    return "max" if metric in HIGHER_IS_BETTER else "min"


@dataclass
class EvalConfig:
    eval_every: int = EVAL_EVERY
    eval_set_size: int = EVAL_SET_SIZE
    eval_seed: int = 0
    eval_batch_size: int = 8
    early_stopping: str = "none"  # none | dvar | patience
    dvar_window: int = DVAR_WINDOW
    dvar_window_fraction: float = DVAR_WINDOW_FRACTION  # 0: the paper's fixed window
    dvar_threshold: float = DVAR_THRESHOLD
    dvar_direction: float | None = DVAR_DIRECTION  # None: the loss alone decides (the paper's rule)
    patience: int = PATIENCE
    patience_metric: str = "eval_loss"
    patience_min_delta: float = 0.0
    select_best: str | None = SELECT_BEST  # None: no <name>-best
    bands: int = DEFAULT_BANDS

    def __post_init__(self):
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1 step (got {self.eval_every})")
        if self.early_stopping not in ("none", "dvar", "patience"):
            raise ValueError(f"early_stopping must be none, dvar or patience (got {self.early_stopping!r})")

    def stop_metric(self) -> str | None:
        return {"none": None, "dvar": "eval_loss", "patience": self.patience_metric}[self.early_stopping]

    def make_rule(self) -> Rule | None:
        if self.early_stopping == "dvar":
            return DVAR(self.dvar_window, self.dvar_threshold, self.dvar_window_fraction,
                        direction_threshold=self.dvar_direction)
        if self.early_stopping == "patience":
            return Patience(self.patience, metric_mode(self.patience_metric), self.patience_min_delta)
        return None


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    new_best: bool = False
    stop: bool = False


class Evaluator:
    def __init__(self, cfg: EvalConfig, eval_set: EvalSet, noise_scheduler, prediction_type: str = "epsilon",
                 vocab: VocabularyNorms | dict[str, VocabularyNorms] | None = None, norm_factor: float = 1.0):
        self.cfg = cfg
        self.eval_set = eval_set
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type
        self.rule = cfg.make_rule()
        self.best = BestStep(cfg.select_best, metric_mode(cfg.select_best)) if cfg.select_best else None
        self.norms = NormWatch(vocab, norm_factor) if vocab is not None else None
        self.history: list[dict] = []  # one {"step": s, metric: value, ...} per evaluation, for the CSV and the plot

    def due(self, step: int) -> bool:
        return step > 0 and step % self.cfg.eval_every == 0

    def losses(self, predict: Predict, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Per-sample losses of this process's share (samples rank, rank + world, ...), zeros for the others: summed
        over the processes (all-reduce) it is the whole set's losses, whatever the number of processes."""
        mine = self.my_share(rank, world)
        values = evaluate(predict, self.eval_set, self.noise_scheduler, self.prediction_type,
                          self.cfg.eval_batch_size, indices=mine) if mine else torch.zeros(0)
        return self.spread(mine, values)

    def my_share(self, rank: int, world: int) -> list[int]:
        """The samples this process evaluates: rank, rank + world, ..."""
        return list(range(rank, len(self.eval_set), world))

    def spread(self, mine: list[int], values: torch.Tensor) -> torch.Tensor:
        """This process's losses at their places in the set, zeros elsewhere."""
        out = torch.zeros(len(self.eval_set), dtype=torch.float32)
        out[mine] = values
        return out

    def record(self, step: int, per_sample: torch.Tensor, vectors=None,
               extra: dict[str, float] | None = None, choose: bool = True) -> EvalResult:
        """The metrics of this evaluation, and what follows from them: a new best step, a stop.

        ``choose=False``: the starting point (the untrained weights), in the history and the stopping rule's
        values but never the best step.

        ``vectors``: the trained weights now -- an embedding's [n, dim] table, or {"clip_l": ..., "clip_g": ...}
        for SDXL -- for the norm metrics and DVAR's direction check (required when that check is on)."""
        metrics = summarize(self.eval_set, per_sample.cpu(), self.cfg.bands)
        warnings: list[str] = []
        if vectors is not None and self.norms is not None:
            norm_metrics, warnings = self.norms.check(step, vectors)
            metrics.update(norm_metrics)
        metrics.update(extra or {})
        result = EvalResult(int(step), metrics, warnings)
        if self.history and self.history[-1]["step"] >= step:
            return result  # a resumed run re-evaluating a step it already recorded: nothing new to decide
        self.history.append({"step": int(step), **metrics})
        if self.best is not None and choose:
            result.new_best = self.best.update(step, self._metric(self.cfg.select_best, metrics))
        if self.rule is not None:
            result.stop = self.rule.update(step, self._metric(self.cfg.stop_metric(), metrics), vectors)
        return result

    @staticmethod
    def _metric(name: str, metrics: dict) -> float:
        if name not in metrics:
            raise ValueError(f"the metric {name!r} is not measured in this run (measured: {', '.join(metrics)})")
        return metrics[name]

    @property
    def stopped_at(self) -> int | None:
        return self.rule.stopped_at if self.rule is not None else None

    def summary(self) -> dict:
        """For the run summary and the settings file: where the run stopped and which step is the best, and why."""
        out: dict = {"evaluations": len(self.history), "eval_every": self.cfg.eval_every,
                     "early_stopping": self.cfg.early_stopping, "stopped_at": self.stopped_at}
        if self.rule is not None and self.stopped_at is not None:
            out["stop_reason"] = self.stop_reason()
        if self.best is not None:
            out.update(best_step=self.best.best_step, best_metric=self.best.metric, best_value=self.best.best,
                       best_reason=self.best.describe())
        return out

    def stop_reason(self) -> str:
        rule = self.rule
        if isinstance(rule, DVAR):
            text = (f"the evaluation loss settled: the variance of its last {rule.current_window()} values is "
                    f"{rule.ratio:.3g} of its whole history's (threshold {rule.threshold})")
            if rule.persistence is not None:
                text += (f", and the trained weights stopped moving in one direction (mean cosine of consecutive "
                         f"moves {rule.persistence:.2f}, threshold {rule.direction_threshold})")
            return text
        if isinstance(rule, Patience):
            return (f"{self.cfg.patience_metric} did not improve for {rule.patience} evaluations (best "
                    f"{rule.best:.6g} at step {rule.best_step})")
        return ""

    def plot(self, path: Path, title: str = "") -> Path | None:
        if not self.history:
            return None
        loss_keys = [k for k in self.history[0] if k.startswith("eval_loss")]
        panels = {"evaluation loss": {k.replace("eval_loss_", "").replace("eval_loss", "overall"):
                                      [(h["step"], h[k]) for h in self.history if k in h] for k in loss_keys}}
        norm_keys = [k for k in self.history[-1] if k.startswith("norm") and "/" in k and "_z/" not in k]
        if norm_keys:
            panels["vector norms"] = {k.replace("norm/", "vector ").replace("norm_", ""):
                                      [(h["step"], h[k]) for h in self.history if k in h] for k in norm_keys}
            if self.norms is not None:
                panels["vector norms"]["vocabulary max"] = [(h["step"], self.norms.max_norm) for h in self.history]
        scores = [k for k in HIGHER_IS_BETTER if any(k in h for h in self.history)]
        if scores:
            panels["image scores"] = {k: [(h["step"], h[k]) for h in self.history if k in h] for k in scores}
        best = self.best.best_step if self.best is not None else None
        return plot_curves(path, panels, {"early stop": self.stopped_at, "best": best}, title=title)

    def write_report(self, out_dir: Path, title: str = "") -> list[Path]:
        """``evaluation.json`` (the summary and every evaluation's metrics) and ``evaluation.png`` (the curves, the
        stop and best steps marked) in ``out_dir``; each written to a temporary name and renamed."""
        import json

        from utils.fileio import atomic_path

        out_dir = Path(out_dir)
        path = out_dir / "evaluation.json"
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps({**self.summary(), "history": self.history}, indent=1), encoding="utf-8")
        png = self.plot(out_dir / "evaluation.png", title=title)
        return [path] + ([png] if png else [])

    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "eval_set": self.eval_set.fingerprint(),
                "rule": self.rule.state_dict() if self.rule is not None else None,
                "best": self.best.state_dict() if self.best is not None else None,
                "norms": self.norms.state_dict() if self.norms is not None else None,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("eval_set") != self.eval_set.fingerprint():
            raise ValueError("the checkpoint's evaluation set differs from this run's (other pictures, size or seed): "
                             "its curve and decisions would not continue")
        if self.rule is not None and state.get("rule"):
            self.rule.load_state_dict(state["rule"])
        if self.best is not None and state.get("best"):
            self.best.load_state_dict(state["best"])
        if self.norms is not None and state.get("norms"):
            self.norms.load_state_dict(state["norms"])
        self.history = [dict(h) for h in state.get("history", [])]


def joint_losses(evaluators: list[Evaluator], predict: Predict, rank: int = 0, world: int = 1,
                 batch_size: int | None = None) -> list[torch.Tensor]:
    """``Evaluator.losses`` of several evaluators of one model (e.g. one per embedding of a many-embedding run,
    each prompt naming its own embedding) in shared forward passes of ``batch_size`` samples (default: the sum of
    their batch sizes). The same numbers as one by one, up to the float rounding of another batch size."""
    if not evaluators:
        return []
    first = evaluators[0]
    parts = [(ev.eval_set, ev.my_share(rank, world)) for ev in evaluators]
    joined = join_sets(parts)
    size = batch_size or sum(ev.cfg.eval_batch_size for ev in evaluators)
    losses = evaluate(predict, joined, first.noise_scheduler, first.prediction_type, size) if len(joined) \
        else torch.zeros(0)
    out, start = [], 0
    for ev, (_, mine) in zip(evaluators, parts):
        out.append(ev.spread(mine, losses[start:start + len(mine)]))
        start += len(mine)
    return out
