"""Fixtures shared by the whole suite.

`fleet` is three real OpenSSH sshd hosts on loopback, started once per test process (each xdist
worker gets its own). When sshd is missing it fails with the install hint instead of skipping, so
a machine without sshd can never pass the suite by accident.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from maintenancebot.testing.fleet import Fleet
from tests.daemon_world import clock, world  # noqa: F401 -- the daemon tests' fixtures
from tests.slack_desk import desk  # noqa: F401 -- the Slack tests' open approval request


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(tmp_path_factory.mktemp("fleet"), count=3) as running:
        yield running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests on the fleet need sshd; the marker lets `-m "not sshd"` pick the fast unit tests.
    for item in items:
        if "fleet" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sshd)
