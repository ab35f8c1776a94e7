"""The `packages` action: security (or all) package updates with apt or dnf, and their undo.

Owned here: what the package manager on a host would upgrade (parsed from `apt-get -s upgrade` or
`dnf check-update`, in pure functions tested against fixture outputs), waiting for a held dpkg lock
within a bound, the non-interactive upgrade of exactly the previewed packages, the versions before
and after, the reboot-required flag, and the rollback that reinstalls recorded versions when the
package manager still offers them. It must not run `apt-get update`/`dnf makecache` (refreshing
indexes is a runbook's explicit `run:` step, and it needs the network), restart services (that is
the `service` action's job; `NEEDRESTART_MODE=l` keeps needrestart from doing it), or reboot.

The step's `timeout` bounds every command, the lock wait included: give a packages step more
than `lock_timeout` plus the time the upgrade takes (e.g. `timeout: 30m`).

Seam for tests: `PackagesAction(lock_paths=...)` checks other lock files than dpkg's. A test
holds an fcntl lock on a temporary file and points an action instance at it, so the lock timeout
path runs for real without touching the system's dpkg lock. The registered instance uses dpkg's.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

from maintenancebot.actions import ActionContext, ActionReport, register_action
from maintenancebot.actions._pkgtools import (
    APT,
    DNF,
    PackageManager,
    Upgrade,
    lock_error,
    parse_versions,
)
from maintenancebot.actions._probe import ProbeError, run, run_python, tail
from maintenancebot.models import Duration, format_duration
from maintenancebot.transports.base import CommandResult, Transport

DPKG_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/cache/apt/archives/lock")

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_*?\[][A-Za-z0-9_.+:*?\[\]-]*$")


def _package_pattern(value: str) -> str:
    if not _NAME_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a package name or glob (like openssl or linux-*)")
    return value


class PackagesArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: Literal["security", "all"] = "security"
    manager: Literal["auto", "apt", "dnf"] = "auto"
    exclude: tuple[Annotated[str, AfterValidator(_package_pattern)], ...] = ()
    lock_timeout: Duration = 300.0
    reboot_check: bool = True


class _Failed(Exception):
    """Ends an apply/preview/rollback early with a plain reason (and what the tool printed)."""

    def __init__(self, summary: str, result: CommandResult | None = None, **data: Any) -> None:
        super().__init__(summary)
        self.summary, self.result, self.data = summary, result, data

    def report(self, **data: Any) -> ActionReport:
        result = self.result
        return ActionReport(
            ok=False, changed=bool(data.get("packages")), summary=self.summary,
            data={**data, **self.data, "error": self.summary},
            stdout=tail(result.stdout, 40) if result else "",
            stderr=tail(result.stderr, 40) if result else "", rc=result.rc if result else None,
        )


# A stdlib-only program run on the host: wait until no process holds a POSIX lock on any of the
# paths (F_GETLK asks without taking the lock, so we never block apt ourselves), or give up.
_LOCK_WAIT = r"""
import fcntl, json, os, struct, sys, time
req = json.load(sys.stdin)
deadline = time.monotonic() + req["timeout"]
def holder(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # absent, or unreadable to us: apt's own lock timeout still applies
    try:
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else pid
while True:
    held = [(p, holder(p)) for p in req["paths"]]
    held = [(p, pid) for p, pid in held if pid is not None]
    if not held or time.monotonic() >= deadline:
        break
    time.sleep(0.2)
answer = {"free": not held}
if held:
    path, pid = held[0]
    try:
        comm = open("/proc/%d/comm" % pid).read().strip() if pid > 0 else ""
    except OSError:
        comm = ""
    answer.update(path=path, pid=pid if pid > 0 else None, comm=comm)
print(json.dumps(answer))
"""


class PackagesAction:
    name: ClassVar[str] = "packages"
    Args: ClassVar[type[BaseModel]] = PackagesArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = False
    reversible: ClassVar[bool] = True

    def __init__(self, lock_paths: Sequence[str] = DPKG_LOCKS) -> None:
        self.lock_paths = tuple(lock_paths)

    # ------------------------------------------------------------------------------ contract

    def preview(self, transport: Transport, args: PackagesArgs, ctx: ActionContext) -> ActionReport:
        try:
            manager = self._detect(transport, args, ctx)
            plan, excluded = self._plan(transport, args, ctx, manager)
            reboot = self._reboot_required(transport, args, ctx, manager)
        except (_Failed, ProbeError) as exc:
            return _as_failure(exc).report(scope=args.scope)
        names = ", ".join(u.name for u in plan) or "nothing"
        return ActionReport(
            ok=True, changed=False,
            summary=f"would upgrade {len(plan)} {_kind(args)} package(s) with {manager.name}: "
                    f"{names}",
            data={"manager": manager.name, "scope": args.scope, "count": len(plan),
                  "packages": [u.as_dict() for u in plan], "excluded": excluded,
                  # Only today's flag: whether the upgrade will need a reboot is unknowable
                  # before it runs, so the preview does not claim `reboot_required`.
                  "reboot_required_now": reboot},
        )

    def apply(self, transport: Transport, args: PackagesArgs, ctx: ActionContext) -> ActionReport:
        data: dict[str, Any] = {"scope": args.scope}
        try:
            manager = self._detect(transport, args, ctx)
            data["manager"] = manager.name
            # Wait first: while another apt runs, the list of upgrades is still changing.
            self._wait_for_lock(transport, args, ctx, manager)
            plan, data["excluded"] = self._plan(transport, args, ctx, manager)
            data["planned"] = [u.name for u in plan]
            if plan:
                self._upgrade(transport, args, ctx, manager, plan, data)
            data.setdefault("packages", [])
            data["count"] = len(data["packages"])
            data["reboot_required"] = self._reboot_required(transport, args, ctx, manager)
        except (_Failed, ProbeError) as exc:
            return _as_failure(exc).report(**data)
        return _applied(args, data)

    def rollback(
        self, transport: Transport, args: PackagesArgs, report: ActionReport, ctx: ActionContext
    ) -> ActionReport:
        packages = report.data.get("packages", [])
        upgraded = [p for p in packages if p.get("from")]
        # A dependency the upgrade newly installed has no earlier version to go back to; it
        # stays, and the report says so rather than pretending the host is as it was.
        added = [p["name"] for p in packages if not p.get("from")]
        if not upgraded:
            return _with_added(ActionReport(
                ok=True, changed=False, summary="nothing was upgraded; nothing to undo"), added)
        manager = APT if report.data.get("manager") == "apt" else DNF
        try:
            restored = self._restore(transport, args, ctx, manager, upgraded)
        except (_Failed, ProbeError) as exc:
            restored = _as_failure(exc).report(unrestored=[p["name"] for p in upgraded])
        return _with_added(restored, added)

    # ------------------------------------------------------------------------------ steps

    def _detect(self, transport: Transport, args: PackagesArgs, ctx: ActionContext
                ) -> PackageManager:
        wanted = [APT, DNF] if args.manager == "auto" else [APT if args.manager == "apt" else DNF]
        probe = " || ".join(
            f"{{ command -v {shlex.quote(m.binary)} >/dev/null 2>&1 && echo {m.name}; }}"
            for m in wanted)
        found = run(transport, ctx, f"{probe} || true").stdout.split()
        for manager in wanted:
            if manager.name in found:
                return manager
        tools = " or ".join(m.binary for m in wanted)
        raise _Failed(f"no supported package manager on the host ({tools} not found)")

    def _plan(self, transport: Transport, args: PackagesArgs, ctx: ActionContext,
              manager: PackageManager) -> tuple[list[Upgrade], list[str]]:
        result = run(transport, ctx, manager.simulate(args.scope))
        if not manager.simulation_ok(result.rc):
            raise _Failed(f"{manager.binary} could not compute upgrades (rc {result.rc}): "
                          f"{tail(result.stderr or result.stdout, 3)}", result)
        plan, excluded = select(manager.parse_simulation(result.stdout, args.scope),
                                args.scope, args.exclude)
        if manager.name == "dnf" and plan:  # check-update does not say what is installed now
            installed = self._versions(transport, ctx, manager, [u.name for u in plan])
            plan = [u.with_old(installed.get(u.name)) for u in plan]
        return plan, excluded

    def _upgrade(self, transport: Transport, args: PackagesArgs, ctx: ActionContext,
                 manager: PackageManager, plan: list[Upgrade], data: dict[str, Any]) -> None:
        names = [u.name for u in plan]
        before = self._versions(transport, ctx, manager, names)
        data["before"] = before
        script, env = manager.install(names, args.scope, _seconds(args.lock_timeout))
        result = run(transport, ctx, script, env=env)
        after = self._versions(transport, ctx, manager, names)
        data["packages"] = changes(before, after)
        data["not_upgraded"] = [n for n in names if before.get(n) == after.get(n)]
        data["stdout"] = result.stdout
        if result.rc != 0:
            raise _Failed(self._install_failure(manager, args, result), result)

    def _install_failure(self, manager: PackageManager, args: PackagesArgs,
                         result: CommandResult) -> str:
        held = lock_error(result.stdout + result.stderr)
        if held is not None:
            return _lock_message(held[0], held[1], held[2], args.lock_timeout)
        return f"{manager.binary} failed (rc {result.rc}): {tail(result.stderr or result.stdout, 3)}"

    def _wait_for_lock(self, transport: Transport, args: PackagesArgs, ctx: ActionContext,
                       manager: PackageManager) -> None:
        if manager.name != "apt" or not self.lock_paths:
            return  # dnf waits on its own lock; the step timeout bounds that wait
        answer = run_python(transport, ctx, _LOCK_WAIT,
                            {"paths": list(self.lock_paths), "timeout": args.lock_timeout})
        if not answer.get("free"):
            raise _Failed(_lock_message(str(answer.get("path")), answer.get("pid"),
                                        str(answer.get("comm") or ""), args.lock_timeout))

    def _versions(self, transport: Transport, ctx: ActionContext, manager: PackageManager,
                  names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        return parse_versions(run(transport, ctx, manager.installed(names)).stdout)

    def _reboot_required(self, transport: Transport, args: PackagesArgs, ctx: ActionContext,
                         manager: PackageManager) -> bool | None:
        if not args.reboot_check:
            return None
        answer = run(transport, ctx, manager.reboot_probe).stdout.strip()
        return {"yes": True, "no": False}.get(answer)

    def _restore(self, transport: Transport, args: PackagesArgs, ctx: ActionContext,
                 manager: PackageManager, upgraded: list[dict[str, Any]]) -> ActionReport:
        names = [p["name"] for p in upgraded]
        current = self._versions(transport, ctx, manager, names)
        todo = [p for p in upgraded if current.get(p["name"]) != p["from"]]
        offered = manager.parse_available(run(transport, ctx, manager.available(names)).stdout)
        restorable = [p for p in todo if p["from"] in offered.get(p["name"], set())]
        missing = [f"{p['name']} {p['from']} (no longer offered by {manager.name})"
                   for p in todo if p not in restorable]
        result = None
        if restorable:
            self._wait_for_lock(transport, args, ctx, manager)
            script, env = manager.downgrade([(p["name"], p["from"]) for p in restorable],
                                            _seconds(args.lock_timeout))
            result = run(transport, ctx, script, env=env)
            now = self._versions(transport, ctx, manager, names)
            missing += [f"{p['name']} {p['from']} ({manager.binary} failed, rc {result.rc})"
                        for p in restorable if now.get(p["name"]) != p["from"]]
        return _restored(upgraded, todo, missing, result)


# ---------------------------------------------------------------------------------- pure


def select(upgrades: Iterable[Upgrade], scope: str, exclude: Sequence[str]
           ) -> tuple[list[Upgrade], list[str]]:
    """The upgrades to apply (in scope, not excluded, one per name) and the names excluded."""
    chosen: dict[str, Upgrade] = {}
    excluded: list[str] = []
    for upgrade in upgrades:
        if scope == "security" and not upgrade.security:
            continue
        if any(fnmatchcase(upgrade.name, pattern) for pattern in exclude):
            excluded.append(upgrade.name)
            continue
        chosen.setdefault(upgrade.name, upgrade)
    return list(chosen.values()), sorted(set(excluded))


def changes(before: dict[str, str], after: dict[str, str]) -> list[dict[str, str | None]]:
    """[{name, from, to}] for every package whose installed version differs."""
    return [{"name": name, "from": before.get(name), "to": after.get(name)}
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


def _applied(args: PackagesArgs, data: dict[str, Any]) -> ActionReport:
    count = data["count"]
    names = ", ".join(p["name"] for p in data["packages"])
    summary = (f"upgraded {count} {_kind(args)} package(s): {names}" if count
               else f"no {_kind(args)} updates to apply")
    if data.get("reboot_required"):
        summary += "; reboot required"
    stdout = data.pop("stdout", "")
    return ActionReport(ok=True, changed=bool(count), summary=summary, data=data,
                        stdout=tail(stdout, 40))


def _restored(upgraded: list[dict[str, Any]], todo: list[dict[str, Any]], missing: list[str],
              result: CommandResult | None) -> ActionReport:
    restored = len(todo) - len(missing)
    summary = f"reinstalled {restored} of {len(upgraded)} recorded version(s)"
    if len(todo) < len(upgraded):
        summary += f" ({len(upgraded) - len(todo)} already at the recorded version)"
    if missing:
        summary += "; could not restore: " + "; ".join(missing)
    return ActionReport(
        ok=not missing, changed=restored > 0, summary=summary,
        data={"restored": restored, "unrestored": missing},
        stdout=tail(result.stdout, 40) if result else "",
        stderr=tail(result.stderr, 40) if result else "", rc=result.rc if result else None,
    )


def _with_added(report: ActionReport, added: list[str]) -> ActionReport:
    if not added:
        return report
    return replace(report, summary=f"{report.summary}; left installed (new, nothing to go back "
                                   f"to): {', '.join(added)}", data={**report.data, "left": added})


def _lock_message(path: str, pid: object, comm: str, timeout: float) -> str:
    who = f"PID {pid}" + (f" ({comm})" if comm else "") if pid else "another process"
    return f"dpkg lock held by {who} for more than {format_duration(timeout)} ({path})"


def _as_failure(exc: Exception) -> _Failed:
    return exc if isinstance(exc, _Failed) else _Failed(str(exc))


def _kind(args: PackagesArgs) -> str:
    return "security" if args.scope == "security" else "available"


def _seconds(value: float) -> int:
    return max(1, int(value))


register_action(PackagesAction())
