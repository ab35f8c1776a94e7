"""The `backup_check` action: is the newest backup recent enough, big enough, and intact?

Owned here: finding the backup time on the host (newest regular file under `path`, optionally
matching `pattern`; or a `marker` file's timestamp content or mtime; or a `command` that prints
an epoch or ISO time), measuring its age with the *host's* clock (the clock that stamped the
file), checking `min_size` and an optional sha256sum-format `checksum_file`, and turning that
into a verdict for the digest. It is read-only: it must never create, move or delete a file, so it
also runs during a dry-run, and it has nothing to roll back. A stale backup fails the step so the
run alerts; what to do about it is a human's call.

The host side is one stdlib-only Python 3 program, sent with `python3 -c` and given its request as
JSON on stdin: one round trip, and no path is ever spliced into a shell line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maintenancebot.actions import ActionContext, ActionReport, register_action
from maintenancebot.actions._probe import ProbeError, Size, run_python
from maintenancebot.models import Duration
from maintenancebot.transports.base import Transport


class BackupCheckArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(default=None, min_length=1)  # directory: its newest file counts
    pattern: str | None = Field(default=None, min_length=1)  # glob on the name (or relative path)
    marker: str | None = Field(default=None, min_length=1)  # file: timestamp content, or mtime
    command: str | None = Field(default=None, min_length=1)  # prints an epoch or ISO time
    max_age: Duration
    min_size: Size = 0
    checksum_file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        # Before field validation, so the shape is checked even while a value is a template.
        if not isinstance(data, dict):
            return data
        sources = [k for k in ("path", "marker", "command") if data.get(k)]
        if len(sources) != 1:
            raise ValueError("give exactly one of path, marker or command"
                             + (f" (got {', '.join(sources)})" if sources else ""))
        if data.get("pattern") and not data.get("path"):
            raise ValueError("pattern only applies to path")
        if data.get("command") and (data.get("min_size") or data.get("checksum_file")):
            raise ValueError("min_size and checksum_file need a file (path or marker), "
                             "not a command")
        return data


# Runs on the host. Kept compatible with old Python 3 (no walrus, no capture_output).
_FIND = r"""
import fnmatch, hashlib, json, os, stat, subprocess, sys, time
from datetime import datetime, timezone
req = json.load(sys.stdin)
def parse_time(text):
    text = (text.strip().splitlines() or [""])[0].strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return None
    return (when if when.tzinfo else when.astimezone()).timestamp()
def newest(root, pattern):
    best, count = None, 0
    for folder, _, names in os.walk(root):
        for name in names:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root)
            if pattern and not fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern):
                continue
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                count += 1
                if best is None or st.st_mtime > best[1]:
                    best = (full, st.st_mtime, st.st_size)
    return best, count
def checksum(listing, target):
    algos = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
    with open(listing, errors="replace") as f:
        entries = [line.rstrip("\n").split(None, 1) for line in f if line.strip()]
    base = os.path.basename(target)
    for digest, name in (e for e in entries if len(e) == 2):
        name = name.lstrip("*")
        if name == target or os.path.basename(name) == base:
            h = hashlib.new(algos.get(len(digest), "sha256"))
            with open(target, "rb") as data:
                for block in iter(lambda: data.read(1 << 20), b""):
                    h.update(block)
            return {"expected": digest.lower(), "actual": h.hexdigest(), "entry": name}
    return {"expected": None, "actual": None, "entry": None}
def find():
    if req["command"]:
        proc = subprocess.Popen(req["command"], shell=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)
        out, err = proc.communicate()
        when = parse_time(out) if proc.returncode == 0 else None
        if when is None:
            return {"error": "command %s: %s" % ("exit %d" % proc.returncode if proc.returncode
                    else "printed no epoch or ISO time", (err or out).strip()[-300:])}
        return {"target": None, "time": when, "size": None, "source": "command"}
    if req["marker"]:
        st = os.stat(req["marker"])
        with open(req["marker"], "rb") as f:
            when = parse_time(f.read(4096).decode("utf-8", "replace"))
        source = "content" if when is not None else "mtime"
        return {"target": req["marker"], "time": st.st_mtime if when is None else when,
                "size": st.st_size, "source": source}
    if not os.path.isdir(req["path"]):
        return {"error": "%s is not a directory" % req["path"]}
    best, count = newest(req["path"], req["pattern"])
    if best is None:
        return {"error": "no file%s under %s" % (" matching " + req["pattern"] if req["pattern"]
                                                 else "", req["path"]), "files": 0}
    return {"target": best[0], "time": best[1], "size": best[2], "source": "mtime", "files": count}
try:
    answer = find()
    if answer.get("target") and req["checksum_file"]:
        answer["checksum"] = checksum(req["checksum_file"], answer["target"])
except OSError as exc:
    answer = {"error": "%s: %s" % (exc.filename or "", exc.strerror or exc)}
answer["now"] = time.time()
print(json.dumps(answer))
"""


class BackupCheckAction:
    name: ClassVar[str] = "backup_check"
    Args: ClassVar[type[BaseModel]] = BackupCheckArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = True  # only looks, so a dry-run really runs it
    reversible: ClassVar[bool] = False  # nothing to undo

    def preview(self, transport: Transport, args: BackupCheckArgs, ctx: ActionContext
                ) -> ActionReport:
        return self.apply(transport, args, ctx)

    def apply(self, transport: Transport, args: BackupCheckArgs, ctx: ActionContext
              ) -> ActionReport:
        request = {"path": args.path, "pattern": args.pattern, "marker": args.marker,
                   "command": args.command, "checksum_file": args.checksum_file}
        try:
            found = run_python(transport, ctx, _FIND, request)
        except ProbeError as exc:
            return ActionReport(ok=False, changed=False, summary=f"cannot check backups: {exc}",
                                data={"stale": True, "reason": str(exc)})
        return judge(args, found)

    def rollback(self, transport: Transport, args: BackupCheckArgs, report: ActionReport,
                 ctx: ActionContext) -> ActionReport:
        return ActionReport(ok=True, changed=False, summary="backup_check changes nothing")


def judge(args: BackupCheckArgs, found: dict[str, Any]) -> ActionReport:
    """The verdict on what the host found: pure, so the rules are easy to read and test."""
    limits = {"max_age_seconds": args.max_age, "min_size": args.min_size}
    if found.get("error"):
        reason = str(found["error"])
        return ActionReport(ok=False, changed=False, summary=f"no backup found: {reason}",
                            data={**limits, "newest": None, "age_seconds": None, "size": None,
                                  "stale": True, "reason": reason, "files": found.get("files")})
    age = float(found["now"]) - float(found["time"])
    size = found.get("size")
    problems = _problems(args, age, size, found.get("checksum"))
    data = {
        **limits, "newest": found.get("target"), "age_seconds": round(age),
        "backup_time": datetime.fromtimestamp(float(found["time"]), UTC).isoformat(),
        "time_source": found.get("source"), "size": size, "files": found.get("files"),
        "stale": age > args.max_age, "checksum": _checksum_status(found.get("checksum")),
        "reason": "; ".join(problems) or None,
    }
    what = data["newest"] or "the backup"
    facts = f"{what} is {human_age(age)} old (limit {human_age(args.max_age)})"
    if size is not None:
        facts += f", {human_size(int(size))}"
    if data["checksum"]:
        facts += f", checksum {data['checksum']}"
    summary = f"backup problem: {'; '.join(problems)}" if problems else f"backup ok: {facts}"
    return ActionReport(ok=not problems, changed=False, summary=summary, data=data)


def _problems(args: BackupCheckArgs, age: float, size: Any, check: Any) -> list[str]:
    problems = []
    if age > args.max_age:
        problems.append(f"stale: newest backup is {human_age(age)} old, "
                        f"limit {human_age(args.max_age)}")
    if size is not None and int(size) < args.min_size:
        problems.append(f"too small: {human_size(int(size))} < {human_size(args.min_size)}")
    status = _checksum_status(check)
    if status and status != "ok":
        problems.append(f"checksum {status}")
    return problems


def _checksum_status(check: Any) -> str | None:
    if not check:
        return None
    if check.get("entry") is None:
        return "missing: the checksum file has no entry for the newest file"
    return "ok" if check["expected"] == check["actual"] else "mismatch"


def human_age(seconds: float) -> str:
    """'3d 4h', '2h 5m', '42s': two units at most; what a person reads in a digest."""
    seconds = int(abs(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # not reached


register_action(BackupCheckAction())
