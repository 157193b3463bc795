"""Cron schedules with H: the same name always gives the same value, in range; malformed ones are refused."""
import pytest

from mlpipe.schedule import ScheduleError, expand, fields


def test_h_is_stable_spread_and_in_range():
    assert expand("H 3 * * *", "credit-risk") == expand("H 3 * * *", "credit-risk")
    minutes = {int(expand("H 3 * * *", f"model-{i}").split()[0]) for i in range(200)}
    assert minutes <= set(range(60)) and len(minutes) > 40  # dozens of models do not start at once
    for i in range(100):
        m, h, dom, mon, dow = expand("H H H H H", f"m{i}").split()
        assert 0 <= int(m) <= 59 and 0 <= int(h) <= 23 and 1 <= int(dom) <= 28 and 1 <= int(mon) <= 12 and 0 <= int(dow) <= 6
        lo, step = expand("H/15 * * * *", f"m{i}").split()[0].split("/")
        assert step == "15" and 0 <= int(lo.split("-")[0]) < 15 and lo.endswith("-59")
        assert 8 <= int(expand("H H(8-17) * * 1-5", f"m{i}").split()[1]) <= 17


def test_plain_fields_pass_through():
    assert expand("*/5 1-3,7 * jan-mar mon-fri", "x") == "*/5 1-3,7 * jan-mar mon-fri"
    assert fields("17 3 * * *", "x") == {"minute": "17", "hour": "3", "day": "*", "month": "*", "weekday": "*"}


@pytest.mark.parametrize("bad, why", [
    ("H 3 * *", "has 4 fields"), ("61 * * * *", "outside 0-59"), ("H/0 * * * *", "step must be"),
    ("x * * * *", "not a valid minute"), ("5/10 * * * *", "needs a range or *"), ("H(9-3) * * * *", "empty"),
    ("* 24 * * *", "outside 0-23"), ("* * * * funday", "not a valid day of week"),
])
def test_malformed_schedules_are_refused(bad, why):
    with pytest.raises(ScheduleError) as exc:
        expand(bad, "x")
    assert why in str(exc.value), str(exc.value)
