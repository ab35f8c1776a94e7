"""The error tree. Every error the bot expects is a MaintenanceBotError; the CLI catches only these
and prints them as one clean line, so anything else is a bug and keeps its traceback."""

from __future__ import annotations

from dataclasses import dataclass


class MaintenanceBotError(Exception):
    """Base of every expected error."""


@dataclass(frozen=True)
class ConfigIssue:
    """One validation problem, located as FILE:LINE: field: message."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(MaintenanceBotError):
    """One or more problems in runbooks, inventories or the config file. Nothing ran."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class SelectionError(MaintenanceBotError):
    """A host pattern selected nothing, or named something the inventory lacks."""


class HostsBusy(MaintenanceBotError):
    """Hosts of a run are in another live run: nothing started (DESIGN §5, Overlap)."""

    def __init__(self, busy: dict[str, str]) -> None:
        self.busy = busy
        super().__init__("hosts are in another run, nothing started: " + ", ".join(
            f"{host} (held by {holder})" for host, holder in sorted(busy.items())))


class TemplateError(MaintenanceBotError):
    """A template failed to render (undefined variable, sandbox violation, bad filter)."""


class TransportError(MaintenanceBotError):
    """Base of everything that goes wrong between us and a host."""


class ConnectError(TransportError):
    """The host could not be reached or refused us (DNS, TCP, auth, host key)."""


class HostKeyError(ConnectError):
    """The host's key is unknown to known_hosts or differs from it. Never auto-accepted."""


class CommandTimeout(TransportError):
    """A command ran past its timeout and was killed. Carries what it printed so far."""

    def __init__(self, message: str, stdout: str = "", stderr: str = "", duration: float = 0.0):
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr
        self.duration = duration


class StoreError(MaintenanceBotError):
    """The run store is unusable (schema from the future, locked beyond patience, corrupt)."""


class NotFound(MaintenanceBotError):
    """A run, request or trash entry the user named does not exist."""
