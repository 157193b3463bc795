"""Cron schedules with Jenkins-style ``H``: a value derived from the model's name.

``H 3 * * *`` runs every model at 03:xx, each at its own minute, so dozens of models do not all
start at once. The same name always gives the same minute: a second Ansible run changes nothing.

    H         a value in the field's whole range (minute 0-59, hour 0-23, day 1-28, month 1-12, weekday 0-6)
    H(a-b)    a value in a..b
    H/n       every n, starting at a value in 0..n-1 (minute, hour) derived from the name

Everything else is passed through after a syntax check: numbers, ranges, lists, steps and ``*``.
"""
from __future__ import annotations

import hashlib
import re

FIELDS = ("minute", "hour", "day of month", "month", "day of week")
RANGES = ((0, 59), (0, 23), (1, 28), (1, 12), (0, 6))  # day 1-28: H never picks a day some months lack
LIMITS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}
_H = re.compile(r"^H(?:\((\d+)-(\d+)\))?(?:/(\d+))?$")
_PLAIN = re.compile(r"^(\*|\d+(?:-\d+)?|[a-z]{3}(?:-[a-z]{3})?)(?:/(\d+))?$")


class ScheduleError(ValueError):
    pass


def _hash(name: str, field: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}\0{field}".encode()).digest()[:8], "big")


def _number(text: str, field: int) -> int:
    if text.isdigit():
        value = int(text)
    elif field in _NAMES and text in _NAMES[field]:
        value = _NAMES[field].index(text) + (1 if field == 3 else 0)
    else:
        raise ScheduleError(f"{text!r} is not a valid {FIELDS[field]}")
    lo, hi = LIMITS[field]
    if not lo <= value <= hi:
        raise ScheduleError(f"{FIELDS[field]} {value} is outside {lo}-{hi}")
    return value


def _field(text: str, field: int, name: str) -> str:
    out = []
    for part in text.lower().split(","):
        part = part.strip()
        h = _H.match(part.upper()) if part.upper().startswith("H") else None
        if h:
            lo, hi = RANGES[field]
            if h.group(1) is not None:
                lo, hi = _number(h.group(1), field), _number(h.group(2), field)
                if lo > hi:
                    raise ScheduleError(f"H({lo}-{hi}): the range is empty")
            step = int(h.group(3)) if h.group(3) else None
            if step is not None:
                if step < 1 or step > hi - lo + 1:
                    raise ScheduleError(f"H/{step}: the step must be between 1 and {hi - lo + 1} for the {FIELDS[field]}")
                start = lo + _hash(name, field) % step
                out.append(f"{start}-{hi}/{step}")
            else:
                out.append(str(lo + _hash(name, field) % (hi - lo + 1)))
            continue
        m = _PLAIN.match(part)
        if not m:
            raise ScheduleError(f"{part!r} is not a valid {FIELDS[field]} field")
        if m.group(1) != "*":
            bounds = [_number(x, field) for x in m.group(1).split("-")]
            if len(bounds) == 2 and bounds[0] > bounds[1]:
                raise ScheduleError(f"{part!r}: the range is empty")
        if m.group(2) is not None and int(m.group(2)) < 1:
            raise ScheduleError(f"{part!r}: the step must be 1 or more")
        if m.group(2) is not None and m.group(1) != "*" and "-" not in m.group(1):
            raise ScheduleError(f"{part!r}: a step needs a range or *, e.g. {m.group(1)}-{LIMITS[field][1]}/{m.group(2)}")
        out.append(part)
    return ",".join(out)


def expand(schedule: str, name: str) -> str:
    """The five-field cron schedule with every H resolved for ``name``; ScheduleError when malformed."""
    if not isinstance(schedule, str):
        raise ScheduleError(f"{schedule!r} is not a cron schedule")
    fields = schedule.split()
    if len(fields) != 5:
        raise ScheduleError(f"{schedule!r} has {len(fields)} fields; a cron schedule has 5 "
                            "(minute hour day-of-month month day-of-week)")
    return " ".join(_field(f, i, name) for i, f in enumerate(fields))


def fields(schedule: str, name: str) -> dict:
    """The expanded schedule as ansible.builtin.cron arguments."""
    minute, hour, day, month, weekday = expand(schedule, name).split()
    return {"minute": minute, "hour": hour, "day": day, "month": month, "weekday": weekday}
