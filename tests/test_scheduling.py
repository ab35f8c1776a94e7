"""Cron parsing: crontab weekday numbering (Sunday = 0 or 7), time zones, readable errors."""

from datetime import UTC, datetime

from maintenancebot.scheduling import check_cron, next_fire_times

MONDAY = datetime(2026, 11, 23, tzinfo=UTC)


def weekdays(expression: str) -> list[str]:
    return [t.strftime("%a") for t in next_fire_times(expression, "UTC", MONDAY, 4)]


def test_sunday_is_zero_or_seven_as_in_crontab() -> None:
    assert weekdays("0 3 * * 0") == ["Sun"] * 4
    assert weekdays("0 3 * * 7") == ["Sun"] * 4
    assert weekdays("0 3 * * SUN") == ["Sun"] * 4


def test_weekday_ranges_and_steps_use_crontab_numbering() -> None:
    assert weekdays("0 3 * * 1-5") == ["Mon", "Tue", "Wed", "Thu"]
    assert weekdays("0 3 * * */2") == ["Tue", "Thu", "Sat", "Sun"]


def test_fire_times_follow_the_time_zone_across_dst() -> None:
    # Europe/Berlin leaves summer time on 2026-10-25: 03:00 local is 01:00 UTC before, 02:00 after.
    fires = next_fire_times("0 3 * * *", "Europe/Berlin", datetime(2026, 10, 24, tzinfo=UTC), 2)
    assert [f.astimezone(UTC).hour for f in fires] == [1, 2]


def test_bad_expressions_get_a_reason() -> None:
    assert "expected 5 fields" in (check_cron("* * *") or "")
    assert "61" in (check_cron("61 3 * * *") or "")
    assert "weekday" in (check_cron("0 3 * * 9") or "")
    assert check_cron("0 3 * * SUN", "Europe/Berlin") is None
