"""Cron schedules: parsing, next fire times, and the daemon's live scheduler, on APScheduler.

The one module that imports apscheduler, so that validation, `maintenancebot schedule` and the
daemon read a schedule with the very same code and can never disagree about when a run fires.
`CronScheduler` only says *when*: it hands each due fire time to a callback and decides nothing
about overlap, misfires or leases (that is the daemon, from the store's records).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.executors.base import BaseExecutor  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

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


class _CronTrigger(CronTrigger):  # type: ignore[misc]
    """APScheduler's cron trigger, with cron's rule for the hour that repeats when DST ends.

    APScheduler 3 fires `30 2 * * *` twice on that night (02:30 CEST and 02:30 CET); cron runs a
    job at a fixed hour once, and only jobs with a wildcard hour (`0 * * * *`) again, because
    they follow real time. A weekly maintenance must not run twice because of a clock change.
    """

    def __init__(self, *, fixed_hour: bool, **fields: Any) -> None:
        super().__init__(**fields)
        self.fixed_hour = fixed_hour

    def get_next_fire_time(self, previous_fire_time: datetime | None,
                           now: datetime) -> datetime | None:
        while True:
            fire: datetime | None = super().get_next_fire_time(previous_fire_time, now)
            if fire is None or not (self.fixed_hour and _second_occurrence(fire)):
                return fire
            previous_fire_time = now = fire


def _second_occurrence(moment: datetime) -> bool:
    """`moment` is the second pass of a wall-clock time that happens twice (DST end)."""
    return moment.fold == 1 and moment.replace(fold=0).utcoffset() != moment.utcoffset()


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
        return _CronTrigger(
            minute=minute, hour=hour, day=day, month=month,
            day_of_week=_cron_weekdays(weekday), timezone=ZoneInfo(timezone),
            fixed_hour=not hour.startswith("*"),
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


def fire_times_between(expression: str, timezone: str, after: datetime, until: datetime,
                       limit: int = 10_000) -> list[datetime]:
    """Fire times in (after, until], oldest first, at most `limit` (the newest are kept)."""
    trigger = cron_trigger(expression, timezone)
    times: list[datetime] = []
    previous: datetime | None = None
    now = after
    while True:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire > until:
            return times[-limit:]
        if fire > after:
            times.append(fire)
        previous, now = fire, fire


FireCallback = Callable[[str, datetime], None]


class _FireExecutor(BaseExecutor):  # type: ignore[misc]
    """Hands the due fire time itself to the callback (APScheduler 3 does not pass it to a job
    function). The callback returns quickly: the daemon starts runs in its own threads."""

    def __init__(self, on_fire: FireCallback) -> None:
        super().__init__()
        self._on_fire = on_fire

    def _do_submit_job(self, job: Any, run_times: Sequence[datetime]) -> None:
        try:
            # Coalesced: fires the scheduler slept through are one decision, for the newest.
            self._on_fire(job.id, run_times[-1].astimezone(UTC))
        except Exception:  # a bug in one decision must not stop the scheduler thread
            log.exception("deciding on the fire of %s at %s failed", job.id, run_times[-1])
        self._run_job_success(job.id, [])


def _never_called() -> None:
    raise AssertionError("fires go through _FireExecutor")


class CronScheduler:
    """A real APScheduler BackgroundScheduler with one cron job per scheduled runbook."""

    def __init__(self, on_fire: FireCallback) -> None:
        # local: the scheduler machinery (multiprocessing, executor pools) is the daemon's alone;
        # a `run` or `validate` of a scheduled runbook only needs the cron trigger above
        from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
            BackgroundScheduler,
        )

        self._scheduler = BackgroundScheduler(timezone=UTC)
        self._scheduler.add_executor(_FireExecutor(on_fire), alias="fire")
        self._lock = threading.Lock()

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def wakeup(self) -> None:
        """Look at the clock again now (tests move a fake clock; a real one needs no help)."""
        self._scheduler.wakeup()

    def set(self, name: str, expression: str, timezone: str) -> None:
        """Schedule (or re-schedule) `name`; the next fire is computed from now."""
        with self._lock:
            self._scheduler.add_job(
                _never_called, cron_trigger(expression, timezone), id=name, name=name,
                executor="fire", replace_existing=True, coalesce=True,
                # Misfires and overlap are decided by the daemon from the store, not here.
                misfire_grace_time=None, max_instances=1_000_000,
            )

    def remove(self, name: str) -> None:
        with self._lock:
            if self._scheduler.get_job(name) is not None:
                self._scheduler.remove_job(name)

    def next_fires(self) -> dict[str, datetime | None]:
        return {job.id: getattr(job, "next_run_time", None)
                for job in self._scheduler.get_jobs()}
