"""Test and demo helpers that ship with the package: a throwaway fleet of real sshd hosts.

Nothing in the bot itself imports this package; tests, the README demo and the benchmarks do.
"""

from maintenancebot.testing.fleet import Fleet, FleetError

__all__ = ["Fleet", "FleetError"]
