"""Host patterns and inventory resolution: groups, globs, exclusions, precedence, jump hosts."""

import pytest

from maintenancebot.errors import SelectionError
from maintenancebot.inventory import resolve_inventory
from maintenancebot.models import Inventory, Runbook
from maintenancebot.plan import RunbookSource, build_plan, split_batches

INVENTORY = Inventory.model_validate({
    "defaults": {"user": "maint", "sudo": True, "vars": {"tier": "default"}},
    "groups": {
        "web": {"hosts": ["web-01", "web-02", "web-03"], "vars": {"tier": "web"}},
        "db": {"hosts": ["db-01", "db-legacy"]},
        "linux": {"children": ["web", "db"]},
    },
    "hosts": {
        "bastion": {"address": "192.0.2.1", "sudo": False},
        "web-01": {"address": "192.0.2.11", "vars": {"tier": "canary"}},
        "web-02": None, "web-03": {}, "db-01": {"jump": "bastion"}, "db-legacy": {},
    },
})
FLEET = resolve_inventory(INVENTORY)


def names(patterns: list[str], narrow: list[str] | None = None) -> list[str]:
    return [host.name for host in FLEET.select(patterns, narrow)]


def test_groups_names_and_exclusions() -> None:
    assert names(["web:db:!db-legacy"]) == ["web-01", "web-02", "web-03", "db-01"]


def test_globs_and_intersections() -> None:
    assert names(["*-0[12]"]) == ["web-01", "web-02", "db-01"]
    assert names(["linux:&web:!web-03"]) == ["web-01", "web-02"]


def test_command_line_narrows_and_never_widens() -> None:
    assert names(["web"], ["web-02:db-01"]) == ["web-02"]


def test_unknown_names_and_empty_selections_are_errors() -> None:
    with pytest.raises(SelectionError, match="unknown host or group: wbe"):
        names(["wbe"])
    with pytest.raises(SelectionError, match="^host pattern 'web:&db' selects no hosts$"):
        names(["web:&db"])
    with pytest.raises(SelectionError, match=r"^--hosts 'db' selects none of the runbook's 3 "
                       r"hosts \('web'\); it can only narrow them$"):
        names(["web"], ["db"])


def test_host_settings_follow_defaults_then_groups_then_host() -> None:
    web1, web2 = FLEET.hosts["web-01"], FLEET.hosts["web-02"]
    assert (web1.vars["tier"], web2.vars["tier"], FLEET.hosts["bastion"].vars["tier"]) == (
        "canary", "web", "default")
    assert web2.address == "web-02" and web2.user == "maint" and web2.sudo is True
    assert FLEET.hosts["bastion"].sudo is False
    assert FLEET.hosts["db-01"].jump is not None and FLEET.hosts["db-01"].jump.address == "192.0.2.1"
    assert set(web1.groups) >= {"web", "linux"}


def test_batches_put_a_canary_first_and_repeat_the_last_size() -> None:
    hosts = [f"h{i}" for i in range(10)]
    assert [len(b) for b in split_batches(hosts, [1, "25%", "100%"])] == [1, 3, 6]
    assert [len(b) for b in split_batches(hosts, [4])] == [4, 4, 2]
    assert split_batches(hosts, None) == (tuple(hosts),)


@pytest.mark.parametrize(("concurrency", "batches", "first"), [
    (10, None, ["web-01", "web-02", "web-03"]),  # every host at once
    (2, None, ["web-01", "web-02"]),  # no more than run at once
    (10, [1, "100%"], ["web-01"]),  # a canary starts alone
])
def test_the_first_hosts_are_those_a_run_starts_at_once(
        concurrency: int, batches: list[int | str] | None, first: list[str]) -> None:
    runbook = Runbook.model_validate({"name": "t", "hosts": "web", "concurrency": concurrency,
                                      "batches": batches, "steps": [{"name": "s", "run": "true"}]})
    plan = build_plan(runbook, FLEET, RunbookSource.from_text(None, b""))
    assert [host.name for host in plan.first_hosts()] == first
