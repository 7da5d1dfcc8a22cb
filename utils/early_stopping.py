"""When to stop and which step was best: small state machines fed one evaluation at a time.

Every rule keeps its whole state in a plain JSON-able dict (``state_dict`` / ``load_state_dict``), saved with each
checkpoint: a resumed run continues the same history and makes the same decision at the same step. Floats survive
JSON exactly (Python writes the shortest repr that reads back to the same double).

* :class:`DVAR` -- the variance rule of Voronov et al. ("Is This Loss Informative?", NeurIPS 2023): stop when the
  variance of the last ``window`` values of the deterministic loss, over the variance of the whole history, falls
  below ``threshold``; optionally with a window that grows with the run (``window_fraction``) and with a check that
  the trained weights no longer move in a consistent direction (``direction_threshold``).
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

    def update(self, step: int, value: float, vectors=None) -> bool:
        """Feed one evaluation; True once the rule has fired (it stays fired). ``vectors``: the trained weights at
        this step, for rules that watch them (DVAR's direction check)."""
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            # A resumed run re-evaluates a step it has already seen (e.g. the checkpoint's own step): ignore it, so
            # the history is the uninterrupted run's.
            return self.stopped_at is not None
        value = _check_finite(value, f"the {self.name} metric at step {step}")
        self.last_step = step
        if self.stopped_at is None and self._update(step, value, vectors):
            self.stopped_at = step
        return self.stopped_at is not None

    def _update(self, step: int, value: float, vectors) -> bool:
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
    """Variance of the last values / variance of all values so far < ``threshold`` -> stop.

    The paper's rule has a fixed window of ``window`` evaluations (``window_fraction`` 0). With ``window_fraction``
    f > 0 the window is the last max(``window``, ceil(f x n)) of the n values so far: it grows with the run, and a
    loss still falling steadily never stops it (over a straight line the ratio is f**2, e.g. 0.25 for f = 0.5).

    ``direction_threshold`` adds a second condition, on the trained weights (``vectors`` given to ``update``): the
    mean cosine between consecutive displacements of the weights (from one evaluation to the next) over the same
    window must be below it. While the optimizer still heads somewhere the displacements line up (cosine near 1);
    once it only jitters around a solution they are uncorrelated (near 0) -- Pflug's stationarity test for
    constant-step stochastic gradient methods. It keeps a pause in the loss between two learning phases (measured on
    tiny-world: lr 1e-3, steps 100-150, the concept not yet rendered) from passing for the end.

    ``min_evaluations`` (default: ``window``, or 2 x ``window`` with a growing window) delays the first decision.
    The state keeps every value (and the last weights and displacement), so a resumed run computes the same ratios
    bit for bit.
    """

    name = "dvar"

    def __init__(self, window: int, threshold: float, window_fraction: float = 0.0,
                 min_evaluations: int | None = None, direction_threshold: float | None = None):
        super().__init__()
        if int(window) < 2:
            raise ValueError(f"the DVAR window must be at least 2 evaluations (got {window})")
        if not 0 < float(threshold) < 1:
            raise ValueError(f"the DVAR threshold must be between 0 and 1 (got {threshold})")
        if not 0 <= float(window_fraction) < 1:
            raise ValueError(f"the DVAR window fraction must be in [0, 1) (got {window_fraction})")
        if direction_threshold is not None and not -1 < float(direction_threshold) <= 1:
            raise ValueError(f"the direction threshold is a cosine in (-1, 1] (got {direction_threshold})")
        self.window = int(window)
        self.threshold = float(threshold)
        self.window_fraction = float(window_fraction)
        default_min = 2 * self.window if self.window_fraction else self.window
        self.min_evaluations = max(self.window, int(min_evaluations or default_min))
        self.direction_threshold = None if direction_threshold is None else float(direction_threshold)
        self.values: list[float] = []
        self.ratio: float | None = None
        self.cosines: list[float] = []
        self.persistence: float | None = None
        self._previous: list[float] | None = None  # the weights at the last evaluation, flattened
        self._displacement: list[float] | None = None  # their change since the evaluation before

    def current_window(self) -> int:
        return max(self.window, math.ceil(self.window_fraction * len(self.values)))

    def _track_direction(self, vectors) -> None:
        flat = _flatten(vectors)
        if self._previous is not None:
            if len(flat) != len(self._previous):
                raise ValueError(f"the trained weights changed size ({len(self._previous)} -> {len(flat)} numbers)")
            move = [a - b for a, b in zip(flat, self._previous)]
            if self._displacement is not None:
                self.cosines.append(_cosine(self._displacement, move))
            self._displacement = move
        self._previous = flat

    def _update(self, step: int, value: float, vectors) -> bool:
        self.values.append(value)
        if self.direction_threshold is not None:
            if vectors is None:
                raise ValueError("DVAR with a direction threshold needs the trained weights at every evaluation")
            self._track_direction(vectors)
        if len(self.values) < self.min_evaluations:
            return False
        window = self.current_window()
        self.ratio = variance_ratio(self.values[-window:], variance(self.values))
        settled = self.ratio < self.threshold
        if self.direction_threshold is None:
            return settled
        recent = self.cosines[-window:]
        self.persistence = math.fsum(recent) / len(recent) if len(recent) >= window else None
        return settled and self.persistence is not None and self.persistence < self.direction_threshold

    def state_dict(self) -> dict:
        return {"rule": self.name, "window": self.window, "threshold": self.threshold,
                "window_fraction": self.window_fraction, "min_evaluations": self.min_evaluations,
                "direction_threshold": self.direction_threshold, "values": list(self.values), "ratio": self.ratio,
                "cosines": list(self.cosines), "persistence": self.persistence, "previous": self._previous,
                "displacement": self._displacement, "last_step": self.last_step, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state, ("window", "threshold", "window_fraction", "min_evaluations", "direction_threshold"))
        self.values = [float(v) for v in state["values"]]
        self.cosines = [float(v) for v in state.get("cosines", [])]
        self._previous, self._displacement = state.get("previous"), state.get("displacement")
        self.ratio, self.persistence = state["ratio"], state.get("persistence")
        self.last_step, self.stopped_at = state["last_step"], state["stopped_at"]


def _flatten(vectors) -> list[float]:
    """Trained weights (a tensor, a dict of tensors such as SDXL's clip_l/clip_g, or a list) as one list of floats."""
    if isinstance(vectors, dict):
        return [x for k in sorted(vectors) for x in _flatten(vectors[k])]
    if isinstance(vectors, (list, tuple)) and vectors and not isinstance(vectors[0], (int, float)):
        return [x for v in vectors for x in _flatten(v)]
    if hasattr(vectors, "detach"):
        return vectors.detach().double().cpu().flatten().tolist()
    return [float(x) for x in vectors]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(math.fsum(x * x for x in a)), math.sqrt(math.fsum(y * y for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def variance(values: list[float]) -> float:
    """Population variance, two-pass with exact sums (the same on every machine and after a resume)."""
    n = len(values)
    mean = math.fsum(values) / n
    return math.fsum((v - mean) ** 2 for v in values) / n


def variance_ratio(recent: list[float], total_variance: float) -> float:
    """Population variance of ``recent`` over ``total_variance`` (a flat history counts as settled: 0)."""
    if total_variance <= 0:
        return 0.0
    return variance(recent) / total_variance


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

    def _update(self, step: int, value: float, vectors) -> bool:
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
