"""Learning rate as a pure function of the optimizer step.

Two sources: A1111's schedule strings (``"0.005:100, 1e-3:1000, 1e-5"``, a1111-compat §3.2) and a plain number with one
of diffusers' scheduler names. Because the rate depends only on the step, resuming needs no scheduler state and gives
the same rates as an uninterrupted run on any number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from utils.errors import UserError

_INVALID = (
    'Invalid learning rate schedule {text!r}. It should be a number or, for example, like '
    '"0.001:100, 0.00001:1000, 1e-5:10000" to have lr of 0.001 until step 100, 0.00001 until 1000, and 1e-5 until 10000.'
)


@dataclass(frozen=True)
class SchedulePhase:
    rate: float
    end_step: int  # the rate applies while step < end_step


def is_schedule_string(text: str) -> bool:
    """True for A1111 schedule strings (anything with ``:`` or ``,``); False for a plain number."""
    return ":" in text or "," in text


def parse_schedule(text: str, max_steps: int, cur_step: int = 0) -> list[SchedulePhase]:
    """Parse like A1111: ``RATE:STEP`` pairs, stopping at the first bare rate, ``N:-1`` = until max_steps.

    Items whose step is already passed (``step <= cur_step``, i.e. on resume) are skipped. A step beyond max_steps is
    clamped and ends parsing. Raises UserError for a string that yields no phase or has a non-number.
    """
    phases: list[SchedulePhase] = []
    try:
        for item in text.split(","):
            if not item.strip():
                continue
            parts = item.split(":")
            if len(parts) == 2:
                step = int(parts[1])
                rate = float(parts[0])
                if step > cur_step:
                    phases.append(SchedulePhase(rate, min(step, max_steps)))
                    if step > max_steps:
                        break
                elif step == -1:
                    phases.append(SchedulePhase(rate, max_steps))
                    break
            else:  # one part, or A1111's quirk: three or more parts count as a bare rate
                phases.append(SchedulePhase(float(parts[0]), max_steps))
                break
    except ValueError:
        raise UserError(_INVALID.format(text=text)) from None
    if not phases:
        raise UserError(_INVALID.format(text=text))
    return phases


def validate_learning_rate(text: str) -> None:
    """Fail early (before any model loads) on a learning rate that is neither a number nor a valid schedule, or
    whose rates are not finite non-negative numbers (``nan`` parses as a float but would train NaN)."""
    if is_schedule_string(text):
        rates = [p.rate for p in parse_schedule(text, max_steps=1 << 62)]
    else:
        try:
            rates = [float(text)]
        except ValueError:
            raise UserError(_INVALID.format(text=text)) from None
    bad = [r for r in rates if not math.isfinite(r) or r < 0]
    if bad:
        raise UserError(f"--learning_rate {text!r}: {bad[0]:g} is not a usable rate (it must be a finite number >= 0)")


def validate_scheduler(name: str, warmup_steps: int = 0, num_cycles: int = 1, power: float = 1.0) -> None:
    """Fail early on an unknown ``--lr_scheduler`` (the step count does not matter for that)."""
    _diffusers_multiplier(name, warmup_steps, max(1, warmup_steps) + 1, num_cycles, power)


class LearningRate:
    """``rate(step)`` for an optimizer step, and ``finished(step)`` when an A1111 schedule has run out."""

    def __init__(self, text: str, max_steps: int, scheduler: str = "constant", warmup_steps: int = 0,
                 scale: float = 1.0, num_cycles: int = 1, power: float = 1.0):
        self.text = text
        self.max_steps = max_steps
        self.phases: list[SchedulePhase] | None = None
        self._multiplier = None
        if is_schedule_string(text):
            # The start step is 0 even on resume: the same phases, evaluated at the resumed step, give the same rate.
            self.phases = parse_schedule(text, max_steps)
            self.phases = [SchedulePhase(p.rate * scale, p.end_step) for p in self.phases]
        else:
            validate_learning_rate(text)
            self.base = float(text) * scale
            self._multiplier = _diffusers_multiplier(scheduler, warmup_steps, max_steps, num_cycles, power)

    def _phase_index(self, step: int) -> int:
        i = 0
        while i < len(self.phases) and step >= self.phases[i].end_step:
            i += 1
        return i

    def finished(self, step: int) -> bool:
        return self.phases is not None and self._phase_index(step) >= len(self.phases)

    def rate(self, step: int) -> float:
        if self.phases is None:
            return self.base * self._multiplier(step)
        i = self._phase_index(step)
        return self.phases[min(i, len(self.phases) - 1)].rate

    def end_step(self) -> int:
        """The step at which training stops: the schedule's last phase end (which may be < max_steps)."""
        return self.max_steps if self.phases is None else min(self.max_steps, self.phases[-1].end_step)

    def describe(self) -> str:
        if self.phases is None:
            return f"{self.base:g} ({self.text})"
        return ", ".join(f"{p.rate:g} until step {p.end_step}" for p in self.phases)


def _diffusers_multiplier(name: str, warmup_steps: int, max_steps: int, num_cycles: int, power: float):
    """diffusers' named schedules as a multiplier function of the step (its LambdaLR lambdas, used directly)."""
    import torch
    from diffusers.optimization import get_scheduler

    try:
        dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(name, optimizer=dummy, num_warmup_steps=warmup_steps, num_training_steps=max_steps,
                              num_cycles=num_cycles, power=power)
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # piecewise_constant without rules: AttributeError
        raise UserError(f"--lr_scheduler {name!r}: {e}") from None
    lambdas = getattr(sched, "lr_lambdas", None)
    if not lambdas:
        raise UserError(f"--lr_scheduler {name!r} is not supported (it is not a function of the step)")
    return lambdas[0]
