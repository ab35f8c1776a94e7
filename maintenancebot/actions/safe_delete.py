"""The `safe_delete` action: move old files to a per-run trash (or delete them, when a runbook
says `mode: delete`), list exactly those files in a dry-run, and put them back on rollback.

Owned here: the runbook arguments and their static checks (the protected floor, absolute globs
without `..`), the one runner that ships the host-side program `actions/remote/safe_delete/`
(`python3 -I -c SOURCE`, request as JSON on stdin, one JSON report back), and the translation of
its report into an `ActionReport` (counts, bytes moved to trash or freed for good, top
directories, the files). Not here: any file-system decision. Every rule that keeps a deletion
safe (no symlink followed, roots resolved, floor, caps, races) is enforced on the host by the
remote program, so the `logs` action and the `trash` module get the same rules by sending it
their requests; nothing else in the bot deletes files.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from importlib import resources
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from maintenancebot.actions import ActionContext, ActionReport, register_action
from maintenancebot.actions._bundle import bundle
from maintenancebot.actions._probe import C_LOCALE, REMOTE_PYTHON, Size, tail
from maintenancebot.actions.backup_check import human_size
from maintenancebot.actions.remote import safe_delete as remote_program
from maintenancebot.actions.remote.safe_delete import paths as host_paths
from maintenancebot.models import Duration
from maintenancebot.transports.base import Command, Transport

DEFAULT_MIN_AGE = 3600.0
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 50 << 30
TOP_FILES_IN_SUMMARY = 5


_TEMPLATE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)


class HelperError(Exception):
    """The host program did not answer with a report (no python3, killed, garbled output)."""


# ---------------------------------------------------------------------------------- arguments


def check_absolute(value: str, what: str) -> str:
    """Absolute and free of `..`: the host refuses anything else, `validate` says so first."""
    if "{{" in value or "{%" in value:
        # A template is checked once rendered, and on the host; a `..` between literal slashes
        # is there whatever it renders to, so `validate` says so already.
        if ".." in _TEMPLATE.sub("\0", value).split("/"):
            raise ValueError(f"{what} contains '..': {value}")
        return value
    try:
        host_paths.abs_parts(value.encode("utf-8", "surrogateescape"), what)
    except host_paths.Refused as exc:
        raise ValueError(str(exc)) from None
    return value


def check_root(value: str) -> str:
    check_absolute(value, "within root")
    if "{{" in value or "{%" in value:
        return value
    parts = host_paths.abs_parts(value.encode("utf-8", "surrogateescape"), "within root")
    if host_paths.on_floor(host_paths.join(parts)) or host_paths.PROTECTED_DIRS.intersection(parts):
        raise ValueError(f"within root {value} is on the protected floor (/, /etc, /usr, /boot, "
                         "/bin, /sbin, /lib*, /root, /home and /home/*, /var, /var/lib, /proc, "
                         "/sys, /dev, .git/.ssh dirs): no runbook can delete there")
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class SelectionArgs(BaseModel):
    """What may be touched: shared by `safe_delete` and `logs`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    within: list[str] = Field(min_length=1)  # the allow-list: nothing outside these roots
    exclude: list[str] = Field(default_factory=list)  # globs on the path or the name
    min_age: Duration = DEFAULT_MIN_AGE  # never touch a file modified more recently
    max_files: int = Field(default=DEFAULT_MAX_FILES, ge=1)
    max_bytes: Size = DEFAULT_MAX_BYTES
    mode: Literal["trash", "delete"] = "trash"  # delete = for good, and only when written
    one_file_system: bool = True
    verbose: bool = False  # report every skipped candidate with the rule that kept it

    @field_validator("within", "exclude", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("within")
    @classmethod
    def _roots_off_the_floor(cls, roots: list[str]) -> list[str]:
        return [check_root(root) for root in roots]

    def selection(self) -> dict[str, Any]:
        return {"within": list(self.within), "exclude": list(self.exclude),
                "min_age": self.min_age, "max_files": self.max_files,
                "max_bytes": self.max_bytes, "one_file_system": self.one_file_system,
                "verbose": self.verbose}


class SafeDeleteArgs(SelectionArgs):
    paths: list[str] = Field(min_length=1)  # absolute globs; `**` is any depth
    older_than: Duration | None = None
    larger_than: Size | None = None

    @field_validator("paths", mode="before")
    @classmethod
    def _listify_paths(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("paths")
    @classmethod
    def _absolute_globs(cls, paths: list[str]) -> list[str]:
        for path in paths:
            check_absolute(path, "glob")
            if path.strip("/*") == "" and "{{" not in path:
                raise ValueError(f"glob {path!r} would match /")
        return paths

    def request(self) -> dict[str, Any]:
        return {**self.selection(), "paths": list(self.paths), "older_than": self.older_than,
                "larger_than": self.larger_than}


# ---------------------------------------------------------------------------------- the runner


@cache
def program() -> str:
    """The host-side package as one program text: its modules, exactly as tests import them."""
    return bundle(resources.files(remote_program))


def run_helper(transport: Transport, request: dict[str, Any], *, sudo: bool,
               timeout: float | None) -> dict[str, Any]:
    """Send `request` to the host program; return its report (ok or not).

    `-I` keeps the host's PYTHONPATH, user site and current directory out of a program that may
    run as root. The request travels on stdin, never inside the program text or a shell line."""
    script = shlex.join([REMOTE_PYTHON, "-I", "-c", program()])
    result = transport.run(Command(script=script, stdin=json.dumps(request).encode(),
                                   sudo=sudo, timeout=timeout, env=dict(C_LOCALE)))
    if result.rc == 127:
        raise HelperError(f"{REMOTE_PYTHON} is not installed on the host (safe_delete runs a "
                          "Python 3.6+ program there)")
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise HelperError(f"the safe_delete program failed on the host (rc {result.rc}): "
                          f"{tail(result.stderr or result.stdout)}") from None
    if not isinstance(report, dict) or "ok" not in report:
        raise HelperError(f"the safe_delete program answered {str(report)[:200]!r}")
    return report


def helper(transport: Transport, ctx: ActionContext, request: dict[str, Any]) -> dict[str, Any]:
    return run_helper(transport, request, sudo=ctx.sudo, timeout=ctx.timeout)


# ---------------------------------------------------------------------------------- reports


def file_facts(report: dict[str, Any], *, trashed: bool, dry_run: bool) -> dict[str, Any]:
    """The digest's view of one host report: counts, bytes, top directories, the files."""
    size = int(report.get("bytes") or 0)
    facts: dict[str, Any] = {
        "count": int(report.get("count") or 0), "bytes": size,
        "bytes_trashed": 0 if dry_run or not trashed else size,
        "bytes_freed": 0 if dry_run or trashed else size,
        "files": [f["path"] for f in report.get("files", [])],
        "top_dirs": [{"dir": d["dir"], "count": d["count"], "bytes": d["bytes"]}
                     for d in report.get("top_dirs", [])],
        "skipped_counts": report.get("skipped_counts", {}),
        "warnings": report.get("warnings", []),
        "errors": [f"{e['path']}: {e['error']}" for e in report.get("errors", [])],
    }
    if report.get("skipped"):
        facts["skipped"] = [f"{s['path']}: {s['rule']}" for s in report["skipped"]]
    if report.get("trash_dir_b64"):
        facts["trash"] = [{"dir": report["trash_dir"], "dir_b64": report["trash_dir_b64"]}]
    purge = report.get("purge")
    if purge and purge.get("purged"):
        # The bot's own expired trash, purged (or, in a plan, to be purged) by this step.
        facts["purged"] = [{"dir": p["dir"], "dir_b64": p["dir_b64"], "count": p["count"],
                            "bytes": p["bytes"]} for p in purge["purged"]]
        facts["bytes_purged"] = 0 if dry_run else int(purge["bytes"])
    return facts


def purge_note(facts: dict[str, Any], dry_run: bool) -> str:
    purged = facts.get("purged") or []
    if not purged:
        return ""
    size = human_size(sum(p["bytes"] for p in purged))
    return (f"; {'would purge' if dry_run else 'purged'} {len(purged)} trash dir(s) past "
            f"retention ({size})")


def with_retention(request: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Ask the host to purge this root's trash past the configured retention as well: the bot
    purges its own trash wherever it works, under the same rules (a plan only counts it)."""
    retention = ctx.state.get("trash_retention")
    return request if retention is None else {**request, "purge_retention": float(retention)}


def describe_files(count: int, size: int, files: list[str]) -> str:
    shown = ", ".join(files[:TOP_FILES_IN_SUMMARY])
    more = f" and {count - TOP_FILES_IN_SUMMARY} more" if count > TOP_FILES_IN_SUMMARY else ""
    return f"{count} file(s), {human_size(size)}" + (f": {shown}{more}" if count else "")


def restore_request(data: dict[str, Any], entry: dict[str, str]) -> dict[str, Any]:
    return {"op": "restore", "trash_dir": {"b64": entry["dir_b64"]},
            "within": list(data.get("within", []))}


def restore_trash(transport: Transport, data: dict[str, Any], *, sudo: bool,
                  timeout: float | None) -> ActionReport:
    """Bring back every file of the trash dirs recorded in `data` (a step's report data)."""
    restored, size, conflicts, errors = 0, 0, [], []
    for entry in data.get("trash", []):
        answer = run_helper(transport, restore_request(data, entry), sudo=sudo, timeout=timeout)
        restored += int(answer.get("count") or 0)
        size += int(answer.get("bytes") or 0)
        conflicts += [f"{c['path']}: {c['error']}" for c in answer.get("conflicts", [])]
        errors += [f"{e['path']}: {e['error']}" for e in answer.get("errors", [])]
        if answer.get("error") and not answer.get("errors"):
            errors.append(str(answer["error"]))
    summary = f"restored {restored} file(s), {human_size(size)} from the trash"
    if conflicts:
        summary += f"; {len(conflicts)} not restored (a file is back at its path, not clobbered)"
    if errors:
        summary += f"; {len(errors)} failed: {'; '.join(errors[:3])}"
    return ActionReport(ok=not conflicts and not errors, changed=restored > 0, summary=summary,
                        data={"restored": restored, "bytes": size, "conflicts": conflicts,
                              "errors": errors})


# ---------------------------------------------------------------------------------- the action


class SafeDeleteAction:
    name: ClassVar[str] = "safe_delete"
    Args: ClassVar[type[BaseModel]] = SafeDeleteArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = False
    reversible: ClassVar[bool] = True  # from the trash; `mode: delete` is the written exception

    def preview(self, transport: Transport, args: SafeDeleteArgs, ctx: ActionContext
                ) -> ActionReport:
        return self._run(transport, args, ctx, with_retention({**args.request(), "op": "plan"},
                                                              ctx))

    def apply(self, transport: Transport, args: SafeDeleteArgs, ctx: ActionContext
              ) -> ActionReport:
        request = {**args.request(), "op": args.mode,
                   "trash_id": [ctx.run_id, str(ctx.step_index)]}
        return self._run(transport, args, ctx, with_retention(request, ctx))

    def rollback(self, transport: Transport, args: SafeDeleteArgs, report: ActionReport,
                 ctx: ActionContext) -> ActionReport:
        if report.data.get("mode") == "delete" and report.data.get("count"):
            return ActionReport(ok=False, changed=False, summary=(
                f"{report.data['count']} file(s) were deleted for good (mode: delete); "
                "nothing to restore"))
        if not report.data.get("trash"):
            return ActionReport(ok=True, changed=False, summary="nothing was moved; nothing "
                                "to restore")
        try:
            return restore_trash(transport, dict(report.data), sudo=ctx.sudo, timeout=ctx.timeout)
        except HelperError as exc:
            return ActionReport(ok=False, changed=False, summary=f"cannot restore: {exc}")

    def _run(self, transport: Transport, args: SafeDeleteArgs, ctx: ActionContext,
             request: dict[str, Any]) -> ActionReport:
        op = request["op"]
        try:
            answer = helper(transport, ctx, request)
        except HelperError as exc:
            return ActionReport(ok=False, changed=False, summary=str(exc),
                                data={"action": self.name, "mode": args.mode, "error": str(exc)})
        facts = file_facts(answer, trashed=args.mode == "trash", dry_run=op == "plan")
        data = {"action": self.name, "mode": args.mode, "within": list(args.within), **facts}
        verb = {"plan": f"would {'move to trash' if args.mode == 'trash' else 'delete for good'}",
                "trash": "moved to trash", "delete": "deleted for good"}[op]
        summary = (f"{verb} {describe_files(facts['count'], facts['bytes'], facts['files'])}"
                   + purge_note(facts, op == "plan"))
        if not answer["ok"]:
            return self._failed(transport, ctx, answer, data, summary)
        return ActionReport(ok=True, changed=op != "plan" and facts["count"] > 0,
                            summary=summary, data=data)

    def _failed(self, transport: Transport, ctx: ActionContext, answer: dict[str, Any],
                data: dict[str, Any], summary: str) -> ActionReport:
        """A failed step leaves nothing half done: whatever it moved goes back at once (the
        engine rolls back completed steps only)."""
        reason = str(answer.get("error"))
        if data["errors"]:
            reason += f" ({data['errors'][0]})"
        data = {**data, "error": reason}
        if data.get("trash") and data["count"]:
            try:
                undo = restore_trash(transport, data, sudo=ctx.sudo, timeout=ctx.timeout)
            except HelperError as exc:
                undo = ActionReport(ok=False, changed=False, summary=str(exc))
            data = {**data, "undone": undo.ok, "undo": undo.summary}
            reason += f"; {undo.summary}"
        elif data["count"] and data["mode"] == "delete":
            reason += f"; {summary}"
        return ActionReport(ok=False, changed=bool(data["count"]) and not data.get("undone"),
                            summary=f"safe_delete failed: {reason}", data=data)


register_action(SafeDeleteAction())
