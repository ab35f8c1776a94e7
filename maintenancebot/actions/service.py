"""The `service` action: start, stop, restart or reload a service, then check that it is healthy.

Owned here: reading a unit's state before acting (so a rollback knows what to go back to), the
action itself, the health check with retries (unit state, and optionally an HTTP URL, a TCP port
and a command, all probed *on the host* because the service listens there), and the rollback to
the previous running/stopped state. It must not enable, disable or mask units (it records
`is-enabled` but never changes it), edit unit files, or reboot.

Seam (systemd is not PID 1 on test machines): `manager: command` replaces systemctl with shell
commands the runbook gives: `status` (exit 0 = running), `start`, `stop`, and optionally `reload`
and `restart` (default: stop, then start). Everything else - state recording, health retries,
HTTP/TCP probes, rollback - is the same code for both managers, so tests drive a unit-like
background process over real sshd. Those commands are runbook-authored shell, like `run:`.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maintenancebot.actions import ActionContext, ActionReport, register_action
from maintenancebot.actions._probe import ProbeError, run, run_python, tail
from maintenancebot.errors import CommandTimeout
from maintenancebot.models import Duration, format_duration
from maintenancebot.transports.base import Transport

_UNIT = re.compile(r"^[A-Za-z0-9_.:@\\][A-Za-z0-9_.:@\\-]*$")
_TCP = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_RUNNING = {"active", "reloading", "activating"}
_DONE = {"restart": "restarted", "reload": "reloaded", "start": "started", "stop": "stopped"}


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    active: bool = True  # the unit must be running (after stop: must be stopped)
    http: str | None = None  # a URL fetched on the host; any status below 400 is healthy
    tcp: str | None = None  # "host:port" the host must be able to connect to
    command: str | None = None  # shell run on the host; exit 0 is healthy
    retries: int = Field(default=5, ge=1, le=100)
    interval: Duration = 2.0
    timeout: Duration = 5.0

    @field_validator("http")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @field_validator("tcp")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        match = _TCP.match(value) if value is not None else None
        if value is not None and (match is None or not 0 < int(match.group(2)) < 65536):
            raise ValueError(f"{value!r} is not host:port (like 127.0.0.1:8080)")
        return value


class ServiceArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: str = Field(min_length=1)
    action: Literal["restart", "reload", "start", "stop"] = "restart"
    health: Health = Field(default_factory=Health)
    manager: Literal["systemd", "command"] = "systemd"
    status: str | None = None
    start: str | None = None
    stop: str | None = None
    reload: str | None = None
    restart: str | None = None

    @field_validator("unit")
    @classmethod
    def _unit_name(cls, value: str) -> str:
        if not _UNIT.match(value):
            raise ValueError(f"{value!r} is not a unit name (like nginx or nginx.service)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _commands_match_manager(cls, data: Any) -> Any:
        # Before field validation, so the shape is checked even while a value is a template.
        if not isinstance(data, dict):
            return data
        manager, action = data.get("manager", "systemd"), data.get("action", "restart")
        given = [k for k in ("status", "start", "stop", "reload", "restart") if data.get(k)]
        if manager == "systemd" and given:
            raise ValueError(f"{', '.join(given)}: only with manager: command")
        missing = [k for k in ("status", "start", "stop") if not data.get(k)]
        if manager == "command" and missing:
            raise ValueError(f"manager: command needs {', '.join(missing)}")
        if manager == "command" and action == "reload" and not data.get("reload"):
            raise ValueError("action: reload with manager: command needs a reload command")
        health = data.get("health") or {}
        if isinstance(health, BaseModel):
            health = health.model_dump()
        probes = [k for k in ("http", "tcp", "command")
                  if isinstance(health, dict) and health.get(k)]
        if action == "stop" and probes:
            raise ValueError(f"health {', '.join(probes)}: a stopped service cannot answer them")
        return data


@dataclass(frozen=True)
class UnitState:
    active: str  # systemd's ActiveState words: active, inactive, failed, activating, ...
    enabled: str | None = None  # is-enabled (systemd only)

    @property
    def running(self) -> bool:
        return self.active in _RUNNING

    def as_dict(self) -> dict[str, Any]:
        return {"active": self.active, "enabled": self.enabled}


class _Failed(Exception):
    """The manager could not do what was asked; the message says what and why."""


class _Manager:
    """How to read and change a unit's state: systemctl, or the runbook's own commands."""

    def __init__(self, transport: Transport, args: ServiceArgs, ctx: ActionContext) -> None:
        self.transport, self.args, self.ctx = transport, args, ctx

    def state(self) -> UnitState:
        if self.args.manager == "command":
            result = run(self.transport, self.ctx, self.args.status or "false")
            return UnitState("active" if result.rc == 0 else "inactive")
        unit = shlex.quote(self.args.unit)
        result = run(self.transport, self.ctx,
                     f"systemctl is-active -- {unit}; systemctl is-enabled -- {unit} || true")
        words = result.stdout.split()
        if not words:
            raise _Failed(f"cannot read the state of {self.args.unit}: "
                          f"{tail(result.stderr, 2) or 'systemctl printed nothing'}")
        return UnitState(words[0], words[1] if len(words) > 1 else None)

    def describe(self) -> dict[str, str]:
        """Read-only: `systemctl show` properties, or the status command's verdict."""
        if self.args.manager == "command":
            return {"ActiveState": self.state().active}
        argv = ["systemctl", "show", "-p", "LoadState,ActiveState,SubState,UnitFileState",
                "--", self.args.unit]
        result = run(self.transport, self.ctx, shlex.join(argv))
        if result.rc != 0:
            raise _Failed(f"cannot read {self.args.unit}: {tail(result.stderr, 2)}")
        shown = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        if shown.get("LoadState") == "not-found":
            raise _Failed(f"unit {self.args.unit} not found on the host")
        return shown

    def perform(self, verb: str) -> None:
        for script in self._scripts(verb):
            result = run(self.transport, self.ctx, script)
            if result.rc != 0 and not (verb == "restart" and script == self.args.stop):
                raise _Failed(f"{verb} {self.args.unit} failed (rc {result.rc}): "
                              f"{tail(result.stderr or result.stdout, 3)}")

    def _scripts(self, verb: str) -> list[str]:
        if self.args.manager == "systemd":
            return [shlex.join(["systemctl", verb, "--", self.args.unit])]
        if verb == "restart" and not self.args.restart:
            # Without a restart command: stop (allowed to fail if it was not running), start.
            return [self.args.stop or "", self.args.start or ""]
        return [getattr(self.args, verb) or ""]


# A stdlib-only program run on the host: fetch a URL and/or connect to a port, once. Proxies are
# ignored on purpose: the service is local to the host, a proxy would answer for it.
_PROBE = r"""
import json, socket, sys, urllib.error, urllib.request
req = json.load(sys.stdin)
out = {}
if req.get("http"):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req["http"], timeout=req["timeout"]) as resp:
            out["http"] = [resp.status < 400, "HTTP %d" % resp.status]
    except urllib.error.HTTPError as exc:
        out["http"] = [False, "HTTP %d" % exc.code]
    except Exception as exc:
        out["http"] = [False, str(getattr(exc, "reason", exc))]
if req.get("tcp"):
    host, _, port = req["tcp"].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=req["timeout"]).close()
        out["tcp"] = [True, "connected"]
    except OSError as exc:
        out["tcp"] = [False, exc.strerror or str(exc)]
print(json.dumps(out))
"""


class ServiceAction:
    name: ClassVar[str] = "service"
    Args: ClassVar[type[BaseModel]] = ServiceArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = False
    reversible: ClassVar[bool] = True

    def preview(self, transport: Transport, args: ServiceArgs, ctx: ActionContext) -> ActionReport:
        try:
            shown = _Manager(transport, args, ctx).describe()
        except (_Failed, ProbeError) as exc:
            return ActionReport(ok=False, changed=False, summary=str(exc),
                                data={"unit": args.unit, "error": str(exc)})
        state = shown.get("ActiveState", "unknown")
        sub = f" ({shown['SubState']})" if shown.get("SubState") else ""
        enabled = f", {shown['UnitFileState']}" if shown.get("UnitFileState") else ""
        return ActionReport(
            ok=True, changed=False,
            summary=f"{args.unit} is {state}{sub}{enabled}; would {args.action} it, then check "
                    f"{_checks_text(args)}",
            data={"unit": args.unit, "action": args.action, "manager": args.manager,
                  "state": shown, "checks": _check_names(args)},
        )

    def apply(self, transport: Transport, args: ServiceArgs, ctx: ActionContext) -> ActionReport:
        manager = _Manager(transport, args, ctx)
        data: dict[str, Any] = {"unit": args.unit, "action": args.action, "manager": args.manager}
        try:
            before = manager.state()
            data["before"] = before.as_dict()
            manager.perform(args.action)
        except (_Failed, ProbeError) as exc:
            return ActionReport(ok=False, changed="before" in data, summary=str(exc),
                                data={**data, "error": str(exc)})
        verdict = _check_health(transport, args, ctx, manager)
        data["health"] = verdict
        passed = verdict["passed"]
        summary = f"{_DONE[args.action]} {args.unit}"
        summary += (f"; healthy after {verdict['attempts']} check(s)" if passed
                    else f"; unhealthy after {verdict['attempts']} check(s): {verdict['failed']}")
        return ActionReport(ok=passed, changed=True, summary=summary, data=data)

    def rollback(self, transport: Transport, args: ServiceArgs, report: ActionReport,
                 ctx: ActionContext) -> ActionReport:
        before = report.data.get("before")
        if not before:
            return ActionReport(ok=True, changed=False, summary="nothing was done; nothing to undo")
        manager = _Manager(transport, args, ctx)
        was_running = UnitState(str(before["active"])).running
        try:
            now = manager.state()
            if now.running == was_running:
                return _unchanged(args, was_running)
            manager.perform("start" if was_running else "stop")
            after = manager.state()
        except (_Failed, ProbeError) as exc:
            return ActionReport(ok=False, changed=False, summary=f"could not restore: {exc}",
                                data={"restored": False, "error": str(exc)})
        restored = after.running == was_running
        wanted = "running" if was_running else "stopped"
        summary = (f"{args.unit} is {wanted} again, as before the step" if restored else
                   f"could not bring {args.unit} back to {wanted}: it is {after.active}")
        return ActionReport(ok=restored, changed=True, summary=summary,
                            data={"restored": restored, "state": after.as_dict()})


# ---------------------------------------------------------------------------------- health


def _check_health(transport: Transport, args: ServiceArgs, ctx: ActionContext,
                  manager: _Manager) -> dict[str, Any]:
    """Probe until every check passes or the retries are spent; the last results tell why."""
    health = args.health
    results: dict[str, list[Any]] = {}
    attempt = 0
    for attempt in range(1, health.retries + 1):
        results = _probe_once(transport, args, ctx, manager)
        if all(ok for ok, _ in results.values()):
            break
        if attempt < health.retries:
            time.sleep(health.interval)
    failed = "; ".join(f"{name}: {detail}" for name, (ok, detail) in results.items() if not ok)
    return {"passed": not failed, "attempts": attempt, "failed": failed,
            "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in results.items()}}


def _probe_once(transport: Transport, args: ServiceArgs, ctx: ActionContext,
                manager: _Manager) -> dict[str, list[Any]]:
    health = args.health
    results: dict[str, list[Any]] = {}
    if health.active:
        try:
            state = manager.state()
            results["active"] = [state.running == (args.action != "stop"), state.active]
        except _Failed as exc:
            results["active"] = [False, str(exc)]
    if health.http or health.tcp:
        request = {"http": health.http, "tcp": health.tcp, "timeout": health.timeout}
        try:
            results.update(run_python(transport, ctx, _PROBE, request,
                                      timeout=2 * health.timeout + 5))
        except ProbeError as exc:
            results["probe"] = [False, str(exc)]
    if health.command:
        results["command"] = _command_check(transport, ctx, health)
    return results


def _command_check(transport: Transport, ctx: ActionContext, health: Health) -> list[Any]:
    try:
        result = run(transport, ctx, health.command or "true", timeout=health.timeout)
    except CommandTimeout:
        return [False, f"timed out after {format_duration(health.timeout)}"]
    detail = f"exit {result.rc}" + (f": {tail(result.stderr or result.stdout, 1)}"
                                    if result.rc else "")
    return [result.rc == 0, detail]


def _check_names(args: ServiceArgs) -> list[str]:
    health = args.health
    names = [("stopped" if args.action == "stop" else "active")] if health.active else []
    names += [f"http {health.http}"] if health.http else []
    names += [f"tcp {health.tcp}"] if health.tcp else []
    names += [f"command {health.command!r}"] if health.command else []
    return names


def _checks_text(args: ServiceArgs) -> str:
    names = _check_names(args)
    if not names:
        return "nothing (no health checks)"
    health = args.health
    return (f"{', '.join(names)} (up to {health.retries} tries, "
            f"{format_duration(health.interval)} apart)")


def _unchanged(args: ServiceArgs, was_running: bool) -> ActionReport:
    state = "running" if was_running else "stopped"
    note = (f"; a {args.action} itself cannot be undone" if args.action in ("restart", "reload")
            else "")
    return ActionReport(ok=True, changed=False,
                        summary=f"{args.unit} is {state}, as before the step{note}",
                        data={"restored": True})


register_action(ServiceAction())
