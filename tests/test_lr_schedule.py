import pytest

from utils.errors import UserError
from utils.lr_schedule import LearningRate, SchedulePhase, parse_schedule, validate_learning_rate


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
