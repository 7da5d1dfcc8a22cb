import math
import re

import pytest

from utils.errors import UserError
from utils.lr_schedule import (
    LearningRate, SchedulePhase, is_schedule_string, parse_schedule, validate_learning_rate,
)


def test_a1111_example():
    assert parse_schedule("0.005:100, 1e-3:1000, 1e-5", 100000) == [
        SchedulePhase(0.005, 100), SchedulePhase(0.001, 1000), SchedulePhase(1e-5, 100000)]


def test_parsing_rules():
    # -1 means "until max" and ends parsing
    assert parse_schedule("0.1:-1, 0.2:5", 50) == [SchedulePhase(0.1, 50)]
    # a step past max is clamped and ends parsing
    assert parse_schedule("0.1:10, 0.2:80, 0.3:90", 50) == [SchedulePhase(0.1, 10), SchedulePhase(0.2, 50)]
    # three parts count as a bare rate (A1111 quirk); a bare rate ends parsing
    assert parse_schedule("0.1:10:20, 0.3:40", 50) == [SchedulePhase(0.1, 50)]
    # empty items are skipped, spaces are fine
    assert parse_schedule(" 0.1 : 10 ,, 0.2", 50) == [SchedulePhase(0.1, 10), SchedulePhase(0.2, 50)]
    # on resume, passed items are skipped
    assert parse_schedule("0.1:10, 0.2:20, 0.3", 50, cur_step=10) == [SchedulePhase(0.2, 20), SchedulePhase(0.3, 50)]


@pytest.mark.parametrize("bad", ["", "abc", "0.1:1e3", "0.1:ten", ",", "x:2:3", "x:10"])
def test_invalid_strings(bad):
    with pytest.raises(UserError, match="Invalid learning rate schedule"):
        validate_learning_rate(bad)


def test_schedule_rates_and_early_end():
    lr = LearningRate("0.005:3, 0.001:5", max_steps=100)
    assert [lr.rate(s) for s in range(5)] == [0.005] * 3 + [0.001] * 2
    assert not lr.finished(4) and lr.finished(5)
    assert lr.end_step() == 5  # schedule ends before max steps -> training ends early


def test_plain_number_with_diffusers_scheduler():
    lr = LearningRate("0.01", max_steps=10, scheduler="linear", warmup_steps=2, scale=2.0)
    assert lr.rate(0) == 0.0
    assert lr.rate(1) == pytest.approx(0.01)
    assert lr.rate(2) == pytest.approx(0.02)
    assert lr.rate(6) == pytest.approx(0.02 * 4 / 8)
    assert not lr.finished(10**6) and lr.end_step() == 10
    assert LearningRate("5e-3", max_steps=10).rate(7) == 5e-3


def test_unknown_scheduler():
    with pytest.raises(UserError, match="lr_scheduler"):
        LearningRate("0.01", max_steps=10, scheduler="nope")


def test_a_step_equal_to_max_steps_does_not_end_parsing():
    # only a step *beyond* max_steps ends parsing (A1111); an equal one is kept and parsing goes on
    assert parse_schedule("0.1:50, 0.2:60, 0.3", 50) == [SchedulePhase(0.1, 50), SchedulePhase(0.2, 50)]
    assert parse_schedule("0.1:50, 0.2:49", 50) == [SchedulePhase(0.1, 50), SchedulePhase(0.2, 49)]


def test_a_fresh_run_keeps_a_phase_ending_at_step_1():
    assert parse_schedule("0.1:1, 0.2", 10) == [SchedulePhase(0.1, 1), SchedulePhase(0.2, 10)]
    assert LearningRate("0.1:1, 0.2", 10).rate(0) == 0.1


@pytest.mark.parametrize("bad", ["0.1:x", " , ", "0.1:0"])
def test_the_error_quotes_the_schedule(bad):
    with pytest.raises(UserError, match=re.escape(repr(bad))):
        parse_schedule(bad, 10)
    with pytest.raises(UserError, match=re.escape(repr("abc"))):
        validate_learning_rate("abc")


def test_schedule_detection():
    assert is_schedule_string("0.1:5") and is_schedule_string("0.1, 0.2") and not is_schedule_string("1e-3")
    validate_learning_rate("0.1:1000000000, 0.2")  # any step is valid before max_steps is known
    validate_learning_rate("1e-3")


def test_scaled_schedule_and_rate_after_the_end():
    lr = LearningRate("0.01:2, 0.001:4", max_steps=10, scale=4.0)
    assert [lr.rate(s) for s in range(6)] == [0.04, 0.04, 0.004, 0.004, 0.004, 0.004]  # past the end: the last rate
    assert [lr.finished(s) for s in (3, 4, 5)] == [False, True, True]
    assert LearningRate("0.01:20", max_steps=10).end_step() == 10  # a schedule longer than max_steps: max_steps


def test_describe():
    assert LearningRate("0.005:3, 0.001", 10).describe() == "0.005 until step 3, 0.001 until step 10"
    assert LearningRate("5e-3", 10, scale=2.0).describe() == "0.01 (5e-3)"


def test_diffusers_schedule_options_reach_the_multiplier():
    restarts = LearningRate("1.0", max_steps=10, scheduler="cosine_with_restarts", num_cycles=2)
    assert restarts.rate(5) == pytest.approx(1.0)  # second cycle starts at the half
    assert restarts.rate(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert LearningRate("1.0", max_steps=10, scheduler="cosine").rate(5) == pytest.approx(0.5)
    # polynomial decay from the rate to diffusers' lr_end 1e-7, relative to the rate: (1 - 5/10)^2 = 0.25
    poly = LearningRate("2.0", max_steps=10, scheduler="polynomial", power=2.0)
    assert poly.rate(5) == pytest.approx(2.0 * ((1 - 1e-7) * 0.25 + 1e-7), rel=1e-9)
    # the defaults: one cycle, linear decay
    assert LearningRate("1.0", max_steps=10, scheduler="cosine_with_restarts").rate(5) == pytest.approx(0.5)
    assert LearningRate("1.0", max_steps=10, scheduler="polynomial").rate(5) == pytest.approx(0.5, rel=1e-6)
    cw = LearningRate("0.1", max_steps=10, scheduler="constant_with_warmup", warmup_steps=4)
    assert [cw.rate(s) for s in (0, 2, 4, 9)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


@pytest.mark.parametrize("name", ["reduce_lr_on_plateau", "piecewise_constant"])
def test_a_scheduler_name_we_cannot_use_is_a_one_line_error(name):
    # piecewise_constant needs step rules (diffusers raised AttributeError from inside its parser)
    with pytest.raises(UserError, match=f"--lr_scheduler '{name}'"):
        LearningRate("0.01", max_steps=10, scheduler=name)


def test_validation_reads_the_whole_schedule():
    with pytest.raises(UserError, match="Invalid learning rate schedule"):
        validate_learning_rate("0.1:10, 0.2:x")
