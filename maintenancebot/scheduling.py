"""Cron schedules: parsing and next fire times, on APScheduler's own cron trigger.

The one module that imports apscheduler, so that validation, `maintenancebot schedule` and the
daemon read a schedule with the very same code and can never disagree about when a run fires.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def _cron_weekdays(field: str) -> str:
    """Crontab weekday field -> an explicit list of day names for APScheduler.

    APScheduler 3 numbers weekdays from Monday = 0 while cron uses Sunday = 0 (and 7), so handing
    it `0 3 * * 0` would run a Sunday job on Monday. Expanding to names removes the ambiguity.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.lower().split(","):
        spec, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if spec == "*":
            start, end = 0, 6
        else:
            low, _, high = spec.partition("-")
            start = _day_number(low)
            end = _day_number(high) if high else (6 if step_text else start)
        if step < 1 or start > end:
            raise ValueError(f"invalid weekday range {part!r}")
        days.update(day % 7 for day in range(start, end + 1, step))
    return ",".join(_DAY_NAMES[day] for day in sorted(days))


def _day_number(text: str) -> int:
    if text in _DAY_NAMES:
        return _DAY_NAMES.index(text)
    if text.isdigit() and 0 <= int(text) <= 7:
        return int(text)
    raise ValueError(f"invalid weekday {text!r} (use 0-7 or sun..sat)")


def cron_trigger(expression: str, timezone: str) -> CronTrigger:
    """A trigger for a 5-field crontab line; raises ValueError with a readable message."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            f"(minute hour day month weekday), got {len(fields)}"
        )
    minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(
            minute=minute, hour=hour, day=day, month=month,
            day_of_week=_cron_weekdays(weekday), timezone=ZoneInfo(timezone),
        )
    except (ValueError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {expression!r}: {exc}") from exc


def check_cron(expression: str, timezone: str = "UTC") -> str | None:
    """The problem with `expression` as a message, or None when it is a valid schedule."""
    try:
        cron_trigger(expression, timezone)
    except ValueError as exc:
        return str(exc)
    return None


def next_fire_times(expression: str, timezone: str, after: datetime, count: int = 3) -> list[datetime]:
    trigger = cron_trigger(expression, timezone)
    times: list[datetime] = []
    previous = None
    now = after
    while len(times) < count:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        times.append(fire)
        previous, now = fire, fire
    return times
