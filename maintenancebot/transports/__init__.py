"""Transports: the only code that talks to hosts. `open_transport` picks one for a host."""

from __future__ import annotations

from maintenancebot.models import Host, SshSettings
from maintenancebot.transports.base import Command, CommandResult, Transport


def open_transport(host: Host, ssh: SshSettings) -> Transport:
    """A connected-on-demand transport for `host` (nothing is contacted until `connect`)."""
    if host.connection == "local":
        from maintenancebot.transports.local import LocalTransport

        return LocalTransport(host)
    from maintenancebot.transports.ssh import SshTransport

    return SshTransport(host, ssh)


__all__ = ["Command", "CommandResult", "Transport", "open_transport"]
