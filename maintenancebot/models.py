"""What runbooks, inventories and the config file *are*: immutable pydantic models, no I/O.

Field validators here check one value at a time (a duration, a cron expression, an identifier).
Checks that need the whole document or two documents at once (duplicate step names, group
references, host patterns against the inventory) live in `loader`, which also turns pydantic's
errors into FILE:LINE: field: message.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_duration(value: object) -> float:
    """'90s', '10m', '2h', '7d', '1w', '250ms' or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        # pydantic turns ValueError into a located validation error; TypeError it would not
        raise ValueError(f"invalid duration {value!r}")  # noqa: TRY004
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 2h, 7d)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _parse_share(value: object) -> int | str:
    """A count (3) or a share of the hosts ('25%'), kept as given for `resolve_share`."""
    if isinstance(value, bool):
        raise ValueError(f"invalid count or percentage {value!r}")  # noqa: TRY004
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    match = _PERCENT.match(str(value))
    if not match or not 0 <= float(match.group(1)) <= 100:
        raise ValueError(f"invalid count or percentage {value!r} (use e.g. 3 or 25%)")
    return f"{match.group(1)}%"


Share = Annotated[int | str, BeforeValidator(_parse_share)]


def _not_empty_batch(size: int | str) -> int | str:
    if size == 0 or (isinstance(size, str) and float(size.rstrip("%")) == 0):
        raise ValueError(f"a batch needs at least one host, got {size}")
    return size


BatchSize = Annotated[Share, AfterValidator(_not_empty_batch)]

# What every template is given besides the vars and registers (`plan`), which win over both:
# a var or register of one of these names would be silently out of reach.
RESERVED_NAMES = ("host", "run", "vars")


def not_reserved(name: str) -> str:
    """`name`, unless it is one of RESERVED_NAMES (ValueError, saying why)."""
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is a name every template already has "
                         f"({', '.join(RESERVED_NAMES)}); pick another")
    return name


def _no_reserved_keys(values: dict[str, Any]) -> dict[str, Any]:
    for key in values:
        not_reserved(key)
    return values


Vars = Annotated[dict[str, Any], AfterValidator(_no_reserved_keys)]


def resolve_share(share: int | str, total: int) -> int:
    """How many of `total` hosts a count or percentage means (a percentage rounds up, min 1)."""
    if isinstance(share, int):
        return share
    fraction = float(share.rstrip("%")) / 100
    if fraction == 0:
        return 0
    return max(1, -(-int(fraction * total * 1000) // 1000))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------------------------- runbooks


class Approval(_Model):
    required: bool = True
    timeout: Duration = 3600.0
    quorum: int = Field(default=1, ge=1)
    on_deny: Literal["skip", "rollback", "abort"] = "skip"


class Step(_Model):
    name: str = Field(min_length=1)
    run: str | None = None
    action: str | None = None
    args: dict[str, Any] = Field(default_factory=dict, alias="with")
    when: str | None = None
    register_as: str | None = Field(default=None, alias="register")
    readonly: bool = False
    sudo: bool | None = None
    timeout: Duration = 600.0
    rollback: str | None = None
    on_failure: Literal["stop", "continue", "rollback"] = "rollback"
    approval: Approval | None = None

    @field_validator("name", "run", "rollback", "when")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        # `run: |` with its block lost in an edit runs nothing and "succeeds": say so instead.
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("register_as")
    @classmethod
    def _register_is_identifier(cls, value: str | None) -> str | None:
        if value is not None and not _IDENTIFIER.match(value):
            raise ValueError(f"{value!r} is not a valid variable name")
        return None if value is None else not_reserved(value)

    @model_validator(mode="after")
    def _exactly_one_of_run_or_action(self) -> Step:
        if (self.run is None) == (self.action is None):
            raise ValueError("a step needs exactly one of 'run' or 'action'")
        if self.args and self.action is None:
            raise ValueError("'with' belongs to an 'action' step")
        return self

    @property
    def gated(self) -> bool:
        return self.approval is not None and self.approval.required


class Runbook(_Model):
    name: str = Field(min_length=1)
    description: str = ""
    schedule: str | None = None
    timezone: str = "UTC"
    window: Duration | None = None
    hosts: str | list[str] = "all"
    concurrency: int = Field(default=10, ge=1)
    batches: list[BatchSize] | None = None
    between_batches: str | None = None
    max_failures: Share | None = None
    timeout: Duration = 7200.0
    vars: Vars = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)

    @field_validator("hosts")
    @classmethod
    def _some_hosts(cls, value: str | list[str]) -> str | list[str]:
        patterns = [value] if isinstance(value, str) else value
        if not patterns or not all(pattern.strip() for pattern in patterns):
            raise ValueError("must name hosts or groups (all, a group, a glob, a list of them)")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like Europe/Berlin)")
        return value

    @property
    def host_patterns(self) -> list[str]:
        return [self.hosts] if isinstance(self.hosts, str) else list(self.hosts)


# ---------------------------------------------------------------------------------- inventory


class HostDefaults(_Model):
    user: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    identity_file: str | None = None
    sudo: bool = False
    connection: Literal["ssh", "local"] = "ssh"
    jump: str | None = None
    vars: Vars = Field(default_factory=dict)


class HostEntry(_Model):
    address: str | None = None
    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    identity_file: str | None = None
    sudo: bool | None = None
    connection: Literal["ssh", "local"] | None = None
    jump: str | None = None
    vars: Vars = Field(default_factory=dict)


class Group(_Model):
    hosts: list[str] = Field(default_factory=list)
    children: list[str] = Field(default_factory=list)
    vars: Vars = Field(default_factory=dict)


class Inventory(_Model):
    defaults: HostDefaults = Field(default_factory=HostDefaults)
    groups: dict[str, Group] = Field(default_factory=dict)
    hosts: dict[str, HostEntry | None] = Field(default_factory=dict)


class Host(_Model):
    """A host with every default and group var applied: what the engine and transports see."""

    name: str
    address: str
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    sudo: bool = False
    connection: Literal["ssh", "local"] = "ssh"
    jump: Host | None = None
    groups: tuple[str, ...] = ()
    vars: Vars = Field(default_factory=dict)


# ---------------------------------------------------------------------------------- config


class SshSettings(_Model):
    known_hosts: str | None = None
    identity_file: str | None = None
    connect_timeout: Duration = 10.0
    use_agent: bool = False


class Approvers(_Model):
    cli: list[str] = Field(default_factory=list)
    slack: list[str] = Field(default_factory=list)


class SlackSettings(_Model):
    token_env: str = "SLACK_BOT_TOKEN"
    webhook_url_env: str | None = None
    channel: str | None = None
    signing_secret_env: str = "SLACK_SIGNING_SECRET"
    base_url: str = "https://slack.com/api/"
    # Approval buttons reach the daemon one of two ways: Slack POSTs to an HTTP endpoint
    # (usually behind a TLS reverse proxy), or the daemon dials out over Socket Mode.
    interactivity_listen: str | None = None
    socket_mode: bool = False
    app_token_env: str = "SLACK_APP_TOKEN"

    @field_validator("interactivity_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value


def parse_address(value: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[::1]:PORT') -> (host, port); a bare ':PORT' means 127.0.0.1, and
    port 0 any free port (tests)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:8787")
    return host.strip("[]") or "127.0.0.1", int(port)


class LlmSettings(_Model):
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    run_token_budget: int = Field(default=8000, ge=0)
    daily_token_budget: int = Field(default=200000, ge=0)
    timeout: Duration = 30.0


class Settings(_Model):
    runbooks: str | None = None
    inventory: str | None = None
    state_dir: str = "/var/lib/maintenancebot"
    ssh: SshSettings = Field(default_factory=SshSettings)
    approvers: Approvers = Field(default_factory=Approvers)
    self_approval: bool = False
    slack: SlackSettings | None = None
    llm: LlmSettings | None = None
    misfire_grace: Duration = 6 * 3600.0
    trash_retention: Duration = 7 * 86400.0
