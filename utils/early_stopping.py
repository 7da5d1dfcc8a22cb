"""When to stop and which step was best: small state machines fed one evaluation at a time.

Every rule keeps its whole state in a plain JSON-able dict (``state_dict`` / ``load_state_dict``), saved with each
checkpoint: a resumed run continues the same history and makes the same decision at the same step. Floats survive
JSON exactly (Python writes the shortest repr that reads back to the same double).

* :class:`DVAR` -- the variance rule of Voronov et al. ("Is This Loss Informative?", NeurIPS 2023): stop when the
  variance of the last ``window`` values of the deterministic loss, over the variance of the whole history, falls
  below ``threshold``.
* :class:`Patience` -- stop when a metric has not improved by ``min_delta`` for ``patience`` evaluations.
* :class:`BestStep` -- the step where a metric was best (for ``<name>-best``).
"""

from __future__ import annotations

import math

STOP_RULES = ("dvar", "patience")


def _check_finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number (got {value})")
    return value


class Rule:
    """What the loop calls: ``update(step, value) -> bool`` (True: stop now), ``stopped_at``, ``reason``."""

    name = ""

    def __init__(self):
        self.stopped_at: int | None = None
        self.last_step: int | None = None

    def update(self, step: int, value: float) -> bool:
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            # A resumed run re-evaluates a step it has already seen (e.g. the checkpoint's own step): ignore it, so
            # the history is the uninterrupted run's.
            return self.stopped_at is not None
        value = _check_finite(value, f"the {self.name} metric at step {step}")
        self.last_step = step
        if self.stopped_at is None and self._update(step, value):
            self.stopped_at = step
        return self.stopped_at is not None

    def _update(self, step: int, value: float) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _check_kind(self, state: dict, keys: tuple[str, ...]) -> None:
        if state.get("rule") != self.name:
            raise ValueError(f"not a {self.name} state: {state.get('rule')!r}")
        mine = self.state_dict()
        changed = [k for k in keys if state.get(k) != mine[k]]
        if changed:
            raise ValueError(f"the saved {self.name} rule has other settings ("
                             + ", ".join(f"{k} {state.get(k)} vs {mine[k]}" for k in changed) + ")")


class DVAR(Rule):
    """Variance of the last ``window`` values / variance of all values so far < ``threshold`` -> stop.

    ``window`` counts evaluations. The whole history's variance is kept as a running mean and sum of squared
    deviations (Welford), so the state holds only the last ``window`` values however long the run.
    ``min_evaluations`` (default: ``window``) delays the first decision: the ratio is 1 while the window is the whole
    history.
    """

    name = "dvar"

    def __init__(self, window: int, threshold: float, min_evaluations: int | None = None):
        super().__init__()
        if int(window) < 2:
            raise ValueError(f"the DVAR window must be at least 2 evaluations (got {window})")
        if not 0 < float(threshold) < 1:
            raise ValueError(f"the DVAR threshold must be between 0 and 1 (got {threshold})")
        self.window = int(window)
        self.threshold = float(threshold)
        self.min_evaluations = max(self.window, int(min_evaluations or 0))
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.recent: list[float] = []
        self.ratio: float | None = None

    def _update(self, step: int, value: float) -> bool:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)
        self.recent = (self.recent + [value])[-self.window:]
        if self.count < self.min_evaluations:
            return False
        self.ratio = variance_ratio(self.recent, self.m2 / self.count)
        return self.ratio < self.threshold

    def state_dict(self) -> dict:
        return {"rule": self.name, "window": self.window, "threshold": self.threshold,
                "min_evaluations": self.min_evaluations, "count": self.count, "mean": self.mean, "m2": self.m2,
                "recent": list(self.recent), "ratio": self.ratio, "last_step": self.last_step,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state, ("window", "threshold", "min_evaluations"))
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
        self.recent = [float(v) for v in state["recent"]]
        self.ratio, self.last_step, self.stopped_at = state["ratio"], state["last_step"], state["stopped_at"]


def variance_ratio(recent: list[float], total_variance: float) -> float:
    """Population variance of ``recent`` over ``total_variance`` (a flat history counts as settled: 0)."""
    n = len(recent)
    m = sum(recent) / n
    var = sum((v - m) ** 2 for v in recent) / n
    if total_variance <= 0:
        return 0.0
    return var / total_variance


class Patience(Rule):
    """Stop when ``patience`` evaluations in a row have not improved the best value by more than ``min_delta``.

    ``mode``: "min" (losses) or "max" (scores such as CLIP-I)."""

    name = "patience"

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 0.0):
        super().__init__()
        if int(patience) < 1:
            raise ValueError(f"patience must be at least 1 evaluation (got {patience})")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max' (got {mode!r})")
        self.patience, self.mode, self.min_delta = int(patience), mode, float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.waited = 0

    def _update(self, step: int, value: float) -> bool:
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.best_step, self.waited = value, step, 0
            return False
        self.waited += 1
        return self.waited >= self.patience

    def state_dict(self) -> dict:
        return {"rule": self.name, "patience": self.patience, "mode": self.mode, "min_delta": self.min_delta,
                "best": self.best, "best_step": self.best_step, "waited": self.waited, "last_step": self.last_step,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state, ("patience", "mode", "min_delta"))
        self.best, self.best_step, self.waited = state["best"], state["best_step"], int(state["waited"])
        self.last_step, self.stopped_at = state["last_step"], state["stopped_at"]


class BestStep:
    """The step with the best value of one metric; ``update`` returns True when this step is the new best (the
    caller then saves ``<name>-best``). Ties keep the earlier step."""

    def __init__(self, metric: str, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max' (got {mode!r})")
        self.metric, self.mode = metric, mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.last_step: int | None = None

    def update(self, step: int, value: float) -> bool:
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            return False
        value = _check_finite(value, f"{self.metric} at step {step}")
        self.last_step = step
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_step = value, step
            return True
        return False

    def describe(self) -> str:
        if self.best_step is None:
            return f"no evaluation of {self.metric} yet"
        return f"step {self.best_step}: the {'lowest' if self.mode == 'min' else 'highest'} {self.metric} " \
               f"({self.best:.6g})"

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            raise ValueError(f"the saved best-step choice follows {state.get('metric')} ({state.get('mode')}), "
                             f"this run {self.metric} ({self.mode})")
        self.best, self.best_step, self.last_step = state["best"], state["best_step"], state["last_step"]
