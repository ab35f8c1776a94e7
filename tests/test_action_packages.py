"""The `packages` action: parsers against fixture outputs of apt and dnf, then the real apt-get of
this Debian machine in simulate mode over the sshd fleet. Nothing here upgrades a package: apply
runs only where the plan is provably empty, and the lock test fails before anything is listed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maintenancebot.actions import ActionContext, ActionReport, action_arg_errors
from maintenancebot.actions._pkgtools import (
    APT,
    DNF,
    lock_error,
    parse_apt_madison,
    parse_apt_simulation,
    parse_dnf_check_update,
    parse_versions,
)
from maintenancebot.actions.packages import PackagesAction, PackagesArgs, changes, select
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports import Transport, open_transport

FIXTURES = Path(__file__).parent / "fixtures" / "packages"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def ctx(dry_run: bool = False) -> ActionContext:
    return ActionContext(run_id="t", step_index=0, step_name="x", sudo=False, timeout=60,
                         dry_run=dry_run)


# ------------------------------------------------------------------------------ parsing (pure)


def test_apt_simulation_lists_upgrades_with_old_and_new_versions() -> None:
    upgrades = {u.name: u for u in parse_apt_simulation(fixture("apt-upgrade-debian.txt"))}
    assert sorted(upgrades) == ["base-files", "libpq5", "libssl3", "openssl", "tzdata", "zip"]
    assert upgrades["libpq5"].as_dict() == {
        "name": "libpq5", "from": "15.12-0+deb12u2", "to": "15.13-0+deb12u1"}
    assert upgrades["libssl3"].new == "3.0.16-1~deb12u1"  # trailing "[openssl:amd64 ]" ignored


def test_apt_security_means_the_candidate_comes_from_a_security_suite() -> None:
    upgrades = parse_apt_simulation(fixture("apt-upgrade-debian.txt"))
    assert sorted(u.name for u in upgrades if u.security) == ["libpq5", "libssl3", "openssl", "zip"]
    ubuntu = parse_apt_simulation(fixture("apt-upgrade-ubuntu.txt"))
    assert sorted(u.name for u in ubuntu if u.security) == [
        "curl", "libcurl4", "linux-headers-5.15.0-131", "linux-headers-generic", "python3-urllib3"]


def test_apt_new_packages_are_not_upgrades() -> None:
    plan = APT.parse_simulation(fixture("apt-upgrade-ubuntu.txt"), "all")
    assert "linux-headers-5.15.0-131" not in {u.name for u in plan}
    assert {u.name: u.old for u in plan}["openssh-client"] == "1:8.9p1-3ubuntu0.10"


def test_dnf_check_update_parses_wrapped_names_and_stops_at_obsoletes() -> None:
    upgrades = parse_dnf_check_update(fixture("dnf-check-update-security.txt"), security=True)
    assert [u.name for u in upgrades] == [
        "kernel", "kernel-core", "openssl", "openssl-libs", "python3-setuptools-wheel",
        "NetworkManager-libnm-ovs-cloud-setup"]
    assert all(u.security and u.old is None for u in upgrades)
    assert upgrades[2].new == "1:3.2.2-6.el9_5.1" and upgrades[2].origin == "baseos"
    assert upgrades[-1].new == "1:1.48.10-5.el9_5"


def test_dnf_available_versions_are_read_from_the_list_table() -> None:
    offered = DNF.parse_available(fixture("dnf-list-available.txt"))
    assert offered["openssl"] == {"1:3.2.2-6.el9_5", "1:3.2.2-6.el9_5.1"}
    assert offered["kernel"] == {"5.14.0-503.23.1.el9_5"}


def test_installed_versions_from_dpkg_query_and_rpm() -> None:
    assert parse_versions(fixture("dpkg-query.txt")) == {
        "libpq5": "15.12-0+deb12u2", "openssl": "3.0.15-1~deb12u1", "zip": "3.0-13"}
    rpm = parse_versions(fixture("rpm-q.txt"))
    assert rpm == {"kernel": "5.14.0-503.22.1.el9_5, 5.14.0-503.21.1.el9_5",
                   "openssl": "1:3.2.2-6.el9_5"}


def test_madison_lists_every_offered_version() -> None:
    offered = parse_apt_madison(fixture("apt-madison.txt"))
    assert offered["libpq5"] == {"15.13-0+deb12u1", "15.12-0+deb12u2"}
    assert offered["openssl"] == {"3.0.16-1~deb12u1"}


def test_apt_lock_message_names_path_and_holder() -> None:
    assert lock_error(fixture("apt-lock-error.txt")) == (
        "/var/lib/dpkg/lock-frontend", 4242, "unattended-upgr")
    assert lock_error("E: Unable to locate package nosuch") is None


def test_select_keeps_scope_and_drops_excluded_globs() -> None:
    upgrades = parse_apt_simulation(fixture("apt-upgrade-debian.txt"))
    plan, excluded = select(upgrades, "security", ("libssl*", "zip"))
    assert [u.name for u in plan] == ["libpq5", "openssl"]
    assert excluded == ["libssl3", "zip"]
    everything, _ = select(upgrades, "all", ())
    assert len(everything) == 6


def test_changes_report_only_packages_whose_version_moved() -> None:
    assert changes({"a": "1", "b": "1"}, {"a": "2", "b": "1"}) == [
        {"name": "a", "from": "1", "to": "2"}]


def test_commands_quote_every_package_name() -> None:
    script, env = APT.install(["libpq5", "a;b"], "security", 30)
    assert script.endswith("install --only-upgrade libpq5 'a;b'")
    assert "DPkg::Lock::Timeout=30" in script and env["DEBIAN_FRONTEND"] == "noninteractive"
    down, _ = DNF.downgrade([("openssl", "1:3.2.2-6.el9_5")], 30)
    assert down == "dnf -y downgrade openssl-1:3.2.2-6.el9_5"


def test_args_are_validated_statically() -> None:
    errors = action_arg_errors("packages", {
        "scope": "most", "exclude": ["ok-name", "rm -rf"], "lock_timeout": "soon", "color": 1})
    fields = {loc[0] for loc, _ in errors}
    assert fields == {"scope", "exclude", "lock_timeout", "color"}
    assert action_arg_errors("packages", {"lock_timeout": "{{ patience }}"}) == []
    assert PackagesArgs.model_validate({}).lock_timeout == 300


# ------------------------------------------------------------------------------ real apt-get


@pytest.fixture()
def transport(fleet: Fleet) -> Iterator[Transport]:
    host = fleet.hosts[0]
    link = open_transport(host, fleet.ssh_settings)
    link.connect()
    yield link
    link.close()


@pytest.fixture(scope="module")
def upgradable() -> set[str]:
    """What apt itself (a different front end than ours) says is upgradable on this machine."""
    out = subprocess.run(["apt", "list", "--upgradable"], capture_output=True, text=True,
                         env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, check=True).stdout
    return {line.split("/", 1)[0] for line in out.splitlines() if "/" in line}


def test_preview_lists_what_the_real_apt_would_upgrade(
        transport: Transport, upgradable: set[str]) -> None:
    action = PackagesAction()
    everything = action.preview(transport, PackagesArgs(scope="all"), ctx(dry_run=True))
    security = action.preview(transport, PackagesArgs(), ctx(dry_run=True))
    assert everything.ok and security.ok, (everything.summary, security.summary)
    assert everything.data["manager"] == "apt" and everything.changed is False
    names = {p["name"] for p in everything.data["packages"]}
    assert names <= upgradable
    assert {p["name"] for p in security.data["packages"]} <= names
    assert security.data["count"] == len(security.data["packages"])
    for package in everything.data["packages"]:
        assert package["from"] and package["to"] and package["from"] != package["to"]
    assert security.data["reboot_required_now"] in (True, False)
    assert "reboot_required" not in security.data


def test_apply_with_nothing_in_scope_changes_nothing(
        transport: Transport, upgradable: set[str]) -> None:
    # Excluding "*" leaves nothing to install whatever the cache holds: this test must never
    # really upgrade the machine it runs on.
    report = PackagesAction().apply(transport, PackagesArgs(exclude=("*",)), ctx())
    assert report.ok and not report.changed, report.summary
    assert report.data["count"] == 0 and report.data["packages"] == []
    assert report.data["planned"] == [] and "no security updates" in report.summary
    assert set(report.data["excluded"]) <= upgradable
    assert report.data["reboot_required"] in (True, False)


_HOLDER = """
import fcntl, sys, time
f = open(sys.argv[1], "w")
fcntl.lockf(f, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """A real process holding a POSIX (fcntl) write lock on `path`, as dpkg holds its lock."""
    path.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
        text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture()
def held_lock(tmp_path: Path) -> Iterator[tuple[str, int]]:
    path = tmp_path / "lock-frontend"
    holder = _hold_lock(path, 60)
    yield str(path), holder.pid
    holder.kill()
    holder.wait()


def test_apply_waits_for_a_held_lock_then_fails_clearly(
        transport: Transport, held_lock: tuple[str, int]) -> None:
    path, pid = held_lock
    action = PackagesAction(lock_paths=[path])
    started = time.monotonic()
    report = action.apply(transport, PackagesArgs(scope="all", lock_timeout=1), ctx())
    waited = time.monotonic() - started
    assert not report.ok and not report.changed
    assert report.summary.startswith(f"dpkg lock held by PID {pid} (python")
    assert "for more than 1s" in report.summary and path in report.summary
    assert 1.0 <= waited < 10
    assert "planned" not in report.data  # failed before listing, so nothing was installed


def test_apply_goes_on_once_the_lock_is_released(transport: Transport, tmp_path: Path) -> None:
    holder = _hold_lock(tmp_path / "lock", 1.0)
    try:
        action = PackagesAction(lock_paths=[str(tmp_path / "lock")])
        started = time.monotonic()
        report = action.apply(transport, PackagesArgs(exclude=("*",), lock_timeout=20), ctx())
        assert report.ok and report.data["count"] == 0, report.summary
        assert time.monotonic() - started >= 0.5  # it did wait for the holder
    finally:
        holder.kill()
        holder.wait()


def _installed(name: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True,
                          text=True, check=True).stdout


def test_rollback_says_which_versions_it_cannot_restore(transport: Transport) -> None:
    recorded = [{"name": "dpkg", "from": "0.0-not-offered", "to": _installed("dpkg")},
                {"name": "no-such-package-xyz", "from": "1.0", "to": "1.1"}]
    report = PackagesAction().rollback(transport, PackagesArgs(), _applied(recorded), ctx())
    assert not report.ok and not report.changed
    assert report.data["restored"] == 0
    assert report.data["unrestored"] == [
        "dpkg 0.0-not-offered (no longer offered by apt)",
        "no-such-package-xyz 1.0 (no longer offered by apt)"]
    assert "could not restore" in report.summary


def test_rollback_skips_packages_already_at_the_recorded_version(transport: Transport) -> None:
    recorded = [{"name": "dpkg", "from": _installed("dpkg"), "to": "99:9"}]
    report = PackagesAction().rollback(transport, PackagesArgs(), _applied(recorded), ctx())
    assert report.ok and not report.changed, report.summary
    assert "already at the recorded version" in report.summary


def test_rollback_says_new_dependencies_stay_installed(transport: Transport) -> None:
    recorded = [{"name": "linux-image-6.1.0-99-amd64", "from": None, "to": "6.1.999-1"}]
    report = PackagesAction().rollback(transport, PackagesArgs(), _applied(recorded), ctx())
    assert report.ok and not report.changed
    assert report.summary == ("nothing was upgraded; nothing to undo; left installed (new, "
                              "nothing to go back to): linux-image-6.1.0-99-amd64")


def test_a_missing_package_manager_is_a_clear_failure(transport: Transport) -> None:
    report = PackagesAction().preview(transport, PackagesArgs(manager="dnf"), ctx(dry_run=True))
    assert not report.ok and report.summary == "no supported package manager on the host (dnf not found)"


def _applied(packages: list[dict[str, Any]]) -> ActionReport:
    return ActionReport(ok=True, changed=True, summary="",
                        data={"manager": "apt", "packages": packages, "count": len(packages)})


# ------------------------------------------------------------------------------ whole engine


def test_dry_run_through_the_engine_lists_the_packages(fleet: Fleet, tmp_path: Path) -> None:
    pytest.importorskip("maintenancebot.store", reason="the run store is not written yet")
    from tests.harness import Bench

    bench = Bench(fleet, tmp_path)
    outcome = bench.run("""
        hosts: all
        steps:
          - name: Security updates
            action: packages
            with: {scope: all, exclude: ["linux-*"]}
    """, dry_run=True, narrow=[fleet.names[0]])
    step = bench.steps(outcome.run_id, fleet.names[0])[0]
    assert step["status"] == "would_run", step
    details = step["details"]
    assert details["manager"] == "apt" and details["count"] == len(details["packages"])
    assert not any(p["name"].startswith("linux-") for p in details["packages"])
