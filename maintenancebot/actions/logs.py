"""The `logs` action: for logs that do not rotate themselves, gzip rotated files older than N
days and prune compressed ones older than M days (keeping the newest K per directory).

Owned here: turning log-minded arguments (directories, name patterns, two ages) into requests
for the safe_delete host program, in a fixed order, and their report. Not here: any file
operation. Both halves are safe_delete requests, so they obey every rule of it (roots, floor,
no symlink followed, caps, min_age, races, private trash): pruning is a `trash` (or, when the
runbook says `mode: delete`, a `delete`); compressing is a `compress`, which writes `<name>.gz`
with the original's mode, owner and mtime and then trashes the original through the same code.
There is no second deletion path.

Prune runs before compress: the .gz files made by this run are never pruned by it, so the
dry-run (two plans on today's tree) lists exactly what the real run does.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field, field_validator

from maintenancebot.actions import ActionContext, ActionReport, register_action
from maintenancebot.actions.safe_delete import (
    HelperError,
    SelectionArgs,
    describe_files,
    file_facts,
    helper,
    purge_note,
    restore_trash,
    with_retention,
)
from maintenancebot.models import Duration
from maintenancebot.transports.base import Transport

DAY = 86400.0
COMPRESSED = ["*.gz", "*.xz", "*.bz2", "*.zst", "*.lz4", "*.zip"]


class LogsArgs(SelectionArgs):
    rotated: list[str] = Field(default_factory=lambda: ["*.log.[0-9]*", "*.[0-9]"])
    compress_after: Duration | None = DAY  # None: do not compress
    compressed: list[str] = Field(default_factory=lambda: ["*.gz"])
    prune_after: Duration | None = 30 * DAY  # None: do not prune
    keep_newest: int = Field(default=0, ge=0)  # compressed files kept per directory, any age
    recursive: bool = True
    level: int = Field(default=6, ge=1, le=9)

    @field_validator("rotated", "compressed")
    @classmethod
    def _names_only(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if "/" in pattern or pattern in ("", ".", ".."):
                raise ValueError(f"{pattern!r}: a file name pattern, without '/'")
        return patterns

    def globs(self, names: list[str]) -> list[str]:
        middle = "/**/" if self.recursive else "/"
        return [f"{_escape(root.rstrip('/'))}{middle}{name}" for root in self.within
                for name in names]

    def halves(self) -> list[tuple[str, dict[str, Any]]]:
        """(phase, request) in the order they run; each request without its op."""
        base = self.selection()
        phases = []
        if self.prune_after is not None:
            phases.append(("prune", {**base, "paths": self.globs(self.compressed),
                                     "older_than": self.prune_after,
                                     "keep_newest": self.keep_newest}))
        if self.compress_after is not None:
            phases.append(("compress", {
                **base, "paths": self.globs(self.rotated), "older_than": self.compress_after,
                "exclude": [*base["exclude"], *COMPRESSED], "regular_only": True,
                "level": self.level}))
        return phases


def _escape(path: str) -> str:
    """A directory name taken literally inside a glob (fnmatch's only escape is [x])."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


class LogsAction:
    name: ClassVar[str] = "logs"
    Args: ClassVar[type[BaseModel]] = LogsArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = False
    reversible: ClassVar[bool] = True

    def preview(self, transport: Transport, args: LogsArgs, ctx: ActionContext) -> ActionReport:
        return self._run(transport, args, ctx, dry_run=True)

    def apply(self, transport: Transport, args: LogsArgs, ctx: ActionContext) -> ActionReport:
        return self._run(transport, args, ctx, dry_run=False)

    def rollback(self, transport: Transport, args: LogsArgs, report: ActionReport,
                 ctx: ActionContext) -> ActionReport:
        if not report.data.get("trash"):
            return ActionReport(ok=True, changed=False, summary="nothing went to the trash; "
                                "nothing to restore" + ("" if args.mode == "trash" else
                                                        " (mode: delete is for good)"))
        try:
            # Newest first: the compressed originals come back (and their .gz go), then the
            # pruned archives.
            data = {**report.data, "trash": list(reversed(report.data["trash"]))}
            return restore_trash(transport, data, sudo=ctx.sudo, timeout=ctx.timeout)
        except HelperError as exc:
            return ActionReport(ok=False, changed=False, summary=f"cannot restore: {exc}")

    def _run(self, transport: Transport, args: LogsArgs, ctx: ActionContext, *, dry_run: bool
             ) -> ActionReport:
        data: dict[str, Any] = {"action": self.name, "mode": args.mode,
                                "within": list(args.within), "trash": []}
        parts: list[str] = []
        ok, changed = True, False
        for phase, request in args.halves():
            op = "plan" if dry_run else ("compress" if phase == "compress" else args.mode)
            request = {**request, "op": op, "trash_id": [ctx.run_id, f"{ctx.step_index}-{phase}"]}
            if phase == "compress":
                request["mode"] = args.mode
            if not parts:  # once per step: both halves share the first root's trash
                request = with_retention(request, ctx)
            try:
                answer = helper(transport, ctx, request)
            except HelperError as exc:
                return ActionReport(ok=False, changed=changed, summary=str(exc),
                                    data={**data, "error": str(exc)})
            facts = file_facts(answer, trashed=args.mode == "trash", dry_run=dry_run)
            for entry in facts.pop("trash", []):
                data["trash"].append({**entry, "count": facts["count"], "bytes": facts["bytes"]})
            for key in ("purged", "bytes_purged"):
                if key in facts:
                    data[key] = facts.pop(key)
            data[phase] = facts
            changed |= not dry_run and facts["count"] > 0
            verb = {"prune": "pruned", "compress": "compressed"}[phase]
            parts.append(f"{'would be ' if dry_run else ''}{verb} "
                         f"{describe_files(facts['count'], facts['bytes'], facts['files'])}")
            if not answer["ok"]:
                ok = False
                parts.append(f"{phase} failed: {answer.get('error')}")
                break  # compressing after a failed prune would act on a tree we misjudged
        for key in ("count", "bytes", "bytes_trashed", "bytes_freed"):
            data[key] = sum(data[p][key] for p in ("prune", "compress") if p in data)
        data["files"] = [f for p in ("prune", "compress") if p in data for f in data[p]["files"]]
        data["top_dirs"] = [d for p in ("prune", "compress") if p in data
                            for d in data[p]["top_dirs"]][:10]
        summary = ("; ".join(parts) or "nothing to do (prune_after and compress_after are off)"
                   ) + purge_note(data, dry_run)
        if not ok and data["trash"]:
            # As safe_delete: a failed step leaves nothing half done (the engine rolls back
            # completed steps only), so what this one moved goes back now.
            undo = self.rollback(transport, args, ActionReport(False, changed, "", data), ctx)
            data["undone"], changed = undo.ok, changed and not undo.ok
            summary += f"; {undo.summary}"
        return ActionReport(ok=ok, changed=changed, summary=summary, data=data)


register_action(LogsAction())
