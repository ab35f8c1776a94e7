"""safe_delete: select, trash, delete, compress, restore and purge files on a host, without ever
following a symlink out of the allowed roots.

Sent to hosts as the program text of `python3 -I -c SOURCE` (under `sudo -n` when the step asks);
the JSON request comes on stdin and exactly one JSON report goes to stdout (exit status 0 when the
report says ok, 1 otherwise). Standard library only, Python 3.6+ (annotations are quoted so that
old interpreters never evaluate them), never imports maintenancebot. It travels as one program
text: `actions/_bundle.py` joins this package's modules, which therefore import each other only
as `from .module import names` and share one namespace. Importable for tests: `handle(request)
-> report`. Ops: plan (dry-run), trash, delete, compress (gzip, then trash the original),
restore, purge. The request/report schema is documented in `handle`.

Rules that hold whatever the request says:
* Only regular files and symlinks are moved or deleted. Directories never are (emptied ones stay),
  nor devices, sockets and fifos.
* Symlinks are never followed: a matching symlink is moved as a link and its target is untouched;
  the walk never enters a symlinked directory, nor a mount point (a bind mount could bring /etc
  inside a root). With one_file_system (default) nothing on another st_dev than its root's is
  touched; turning it off only admits same-mount subvolumes (btrfs), never mount points.
* Every candidate lies inside a `within` root: roots are realpath'd, then the walk starts there
  and follows no link, so the path we report is the real path.
* The protected floor cannot be lifted: roots /, /home, /home/*, /var, /var/lib and anything at or
  under /etc /boot /usr /bin /sbin /lib* /root /proc /sys /dev are refused; files named *.key
  *.pem *.crt id_* .git, and everything inside .git, .ssh, .gnupg and trash dirs, never qualify.
* Globs must be absolute and free of `..`; `**` (a whole component) is any depth; a glob that
  matches `/` is dropped, and a root itself is never a candidate.
* Races: directories are opened one level at a time from `/` with O_NOFOLLOW and files addressed
  relative to those descriptors. Right before acting, the parent is re-opened that way and the
  file re-lstat'ed (same dev/inode/type/size/mtime, still qualifying); otherwise it is skipped.
  After a move the trash copy is lstat'ed again: a file swapped in between is put back.
* Caps: over max_files candidates or max_bytes bytes, nothing at all is done.
* min_age (default 1 h): a file modified more recently is never touched.
* The trash is private: `.maintenancebot-trash` and everything below it must be owned by us and
  writable by nobody else, or we refuse to use it (a planted trash dir with a forged manifest
  could otherwise make a restore write files anywhere). Restores only write inside the `within`
  roots the request names.

Paths travel losslessly. In a report or manifest every path is a pair {"path": display,
"path_b64": base64 of the exact bytes} (other keys likewise: trash_path, link_target, dir); the
display form decodes UTF-8 with backslashreplace and is for humans only. In a request a path is
a string (UTF-8; lone surrogates as surrogateescape) or {"b64": "..."} for arbitrary bytes.
Trash layout: <first within root>/.maintenancebot-trash/<run>/<step>/files/<original path minus
its leading slash>, and .../<step>/manifest.json (written atomically before the first move and
again at the end). The first root's filesystem is where the files usually are, so a move is a
rename; across filesystems it is copy, fsync, verify size and sha256, then unlink.
"""

import base64
import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never evaluated on the host: old interpreters cannot subscript builtins
    from collections.abc import Callable

    from .paths import Json

from .apply import apply, describe, trash_id
from .paths import TRASH_NAME, Refused, join, show
from .restore import run_purge, run_restore
from .selection import Scan, listing, number, top_dirs


def handle(request: "Json", after_scan: "Callable[[], None] | None" = None) -> "Json":
    """Run one request and return its report; never raises.

    Request: {"op": "plan"|"trash"|"delete"|"compress"|"restore"|"purge", "paths": [glob],
    "within": [dir], "exclude": [glob], "older_than": s, "larger_than": bytes, "min_age": s
    (3600), "max_files": n (10000), "max_bytes": n (50 GiB), "one_file_system": bool (true),
    "keep_newest": n (per directory), "only": [path] (approved subset), "trash_id": [run, step]
    (trash, compress), "mode": "trash"|"delete" (compress), "level": 1-9 (compress),
    "purge_retention": s (plan, trash, delete, compress: also purge the first root's expired
    trash, or count it in a plan), "trash_dir":
    dir (restore), "trash_base": dir, "retention": s, "runs": [run], "dry_run": bool (purge),
    "now": epoch s, "verbose": bool}; paths as documented above. "paths" of a restore are
    optional globs on original paths.
    Report: {"ok", "op", "error", "files", "count", "bytes", "top_dirs", "skipped",
    "skipped_counts", "errors", "warnings", "trash_dir", "manifest", "restored", "conflicts",
    "purged", "kept"} (the last ones per op). `after_scan` is a test seam: it runs between the
    scan and the first move."""
    op = request.get("op") if isinstance(request, dict) else None
    report = {"ok": True, "op": op, "error": None, "version": 1, "files": [], "count": 0,
              "bytes": 0, "top_dirs": [], "skipped": [], "skipped_counts": {}, "errors": [],
              "warnings": [], "trash_dir": None, "manifest": None}  # type: Json
    scan = None  # type: Scan | None
    try:
        if op in ("plan", "trash", "delete", "compress"):
            scan = Scan(request)
            if op == "trash" or (op == "compress" and request.get("mode", "trash") == "trash"):
                trash_id(request)  # refuse a bad trash id before any work
            elif op == "compress" and request.get("mode") != "delete":
                raise Refused("compress mode must be trash or delete")
            run_select(scan, request, report, after_scan)
        elif op == "restore":
            run_restore(request, report)
        elif op == "purge":
            run_purge(request, report, float(number(request, "now", time.time())))
        else:
            raise Refused(f"unknown op {op!r}")
    except Refused as exc:
        report.update(ok=False, error=str(exc))
    except Exception as exc:  # noqa: BLE001 -- one JSON answer whatever happens; cause readable
        report.update(ok=False, error=f"{type(exc).__name__}: {describe(exc)}")
    if scan is not None:
        report.update(skipped=scan.skipped, skipped_counts=scan.skipped_counts,
                      warnings=scan.warnings)
    if report["errors"]:
        report["ok"] = False
        report["error"] = report["error"] or f"{len(report['errors'])} file(s) failed"
    return report


def run_select(scan: "Scan", req: "Json", report: "Json",
               after_scan: "Callable[[], None] | None") -> "None":
    cands = scan.run()
    files = [listing(c) for c in cands]
    total = sum(c.st.st_size for c in cands)
    report.update(matched=len(cands), matched_bytes=total)  # count/files: what was acted on
    if total > scan.max_bytes:
        raise Refused(f"{total} bytes match, more than max_bytes={scan.max_bytes}; nothing was "
                      "done")
    if req["op"] != "plan":  # a plan's files are the selection itself
        if after_scan is not None:
            after_scan()
        files = apply(scan, cands, req, report)
    report.update(files=files, count=len(files), bytes=sum(f["size"] for f in files),
                  top_dirs=top_dirs(files))
    purge_expired(scan, req, report)


def purge_expired(scan: "Scan", req: "Json", report: "Json") -> "None":
    """With purge_retention: the bot purging its own old trash under the first root, as part of
    the step (a plan only counts it). A purge problem is a warning: the step's own work stands."""
    retention = number(req, "purge_retention", None)
    if retention is None:
        return
    base = join([*scan.roots[0].real, TRASH_NAME])
    sub = {"errors": []}  # type: Json
    try:
        run_purge({"trash_base": {"b64": base64.b64encode(base).decode("ascii")},
                   "retention": retention, "dry_run": req["op"] == "plan"},
                  sub, scan.now_ns / 1e9)
    except (Refused, OSError) as exc:
        sub["errors"].append(dict(show(base), error=describe(exc)))
    report["purge"] = {"purged": sub.get("purged", []), "count": sub.get("count", 0),
                       "bytes": sub.get("bytes", 0), "dry_run": req["op"] == "plan"}
    scan.warnings.extend(f"purge of {e['path']}: {e['error']}" for e in sub["errors"])


def main() -> "None":
    try:
        request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
        if not isinstance(request, dict):
            raise ValueError("the request must be a JSON object")  # noqa: TRY004
        report = handle(request)
    except ValueError as exc:
        report = {"ok": False, "op": None, "error": f"bad request: {exc}"}
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    sys.stdout.flush()
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
