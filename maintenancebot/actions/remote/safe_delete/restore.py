"""Restore files from the trash, and purge expired trash."""

import errno
import fnmatch
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never evaluated on the host: old interpreters cannot subscript builtins
    from .paths import Json

from .apply import describe, read_manifest, remove_derived, trash_root, write_manifest
from .descriptors import (
    lexists,
    meta_of,
    move_no_clobber,
    open_chain,
    open_trash,
    set_meta,
    sha256_at,
)
from .paths import (
    DIR_FLAGS,
    MANIFEST,
    PROTECTED_DIRS,
    TRASH_NAME,
    Changed,
    Conflict,
    Refused,
    abs_parts,
    as_bytes,
    disp,
    inside,
    join,
    on_floor,
    read_mounts,
    show,
    unshow,
)
from .selection import listof, number


def restore_one(tfd: "int", tdir: "bytes", entry: "Json", roots: "list[bytes]") -> "None":
    orig = abs_parts(unshow(entry), "original path")
    path = join(orig)
    if on_floor(path) or PROTECTED_DIRS.intersection(orig):
        raise Refused("original path is on the protected floor")
    holders = [root for root in roots if inside(path, root) and path != root]
    if not holders:
        raise Refused("original path lies outside the within roots")
    top = abs_parts(max(holders, key=len), "within root")
    tpath = unshow(entry, "trash_path")
    if not tpath.startswith(tdir + b"/"):
        raise Refused("trash path lies outside the trash dir")
    tparts = abs_parts(b"/" + tpath[len(tdir) + 1:], "trash path")
    sfd = open_chain(tparts[:-1], start=tfd, private_from=0)
    try:
        st = os.lstat(tparts[-1], dir_fd=sfd)
        if meta_of(st)["type"] != entry["type"] or (
                entry.get("sha256") and sha256_at(sfd, tparts[-1]) != entry["sha256"]):
            raise Changed("the trash copy differs from the manifest")
        # The root must still be there; only directories below it are made again. Both steps
        # refuse parents reached through symlinks.
        rfd = open_chain(top)
        try:
            dfd = open_chain(orig[len(top):-1], create=0o755, start=rfd)
        finally:
            os.close(rfd)
        try:
            move_no_clobber(sfd, tparts[-1], dfd, orig[-1], st)
            set_meta(dfd, orig[-1], entry)
            if entry.get("derived_b64") and not remove_derived(
                    dfd, os.path.basename(unshow(entry, "derived")), entry):
                raise Conflict("restored, but the .gz made from it changed since; left in place")
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def within_roots(req: "Json") -> "list[bytes]":
    roots = []
    for raw in listof(req, "within", required=True):
        root = join(abs_parts(os.path.realpath(as_bytes(raw, "within")), "within root"))
        if on_floor(root):
            raise Refused(f"within root is on the protected floor: {disp(root)}")
        roots.append(root)
    return roots


def run_restore(req: "Json", report: "Json") -> "None":
    tdir, tparts = trash_root(req, "trash_dir")
    roots = within_roots(req)
    wanted = [as_bytes(p, "paths") for p in listof(req, "paths")]
    report.update(show(tdir, "trash_dir"), restored=[], conflicts=[])
    try:
        tfd = open_trash(tparts)
    except FileNotFoundError:
        raise Refused(f"no trash dir {disp(tdir)} (purged already?)") from None
    try:
        manifest = read_manifest(tfd)
        if manifest is None:
            raise Refused(f"no manifest in {disp(tdir)}")
        for entry in manifest["files"]:
            restore_entry(tfd, tdir, entry, roots, wanted, report)
        write_manifest(tfd, manifest)
    finally:
        os.close(tfd)
    report["count"] = len(report["restored"])
    report["bytes"] = sum(item["size"] for item in report["restored"])


def restore_entry(tfd: "int", tdir: "bytes", entry: "Json", roots: "list[bytes]",
                  wanted: "list[bytes]", report: "Json") -> "None":
    orig = unshow(entry)
    if entry["state"] not in ("trashed", "pending") or (wanted and not any(
            orig == w or fnmatch.fnmatchcase(orig, w) for w in wanted)):
        return
    if entry["state"] == "pending" and os.path.lexists(orig):
        return  # listed before the moves began, and never moved: nothing to bring back
    try:
        restore_one(tfd, tdir, entry, roots)
    except FileNotFoundError as exc:
        if entry["state"] == "trashed":  # a pending one was simply never moved
            report["errors"].append(dict(show(orig), error=f"missing: {describe(exc)}"))
        return
    except Conflict as exc:
        report["conflicts"].append(dict(show(orig), error=str(exc)))
        return
    except (Changed, Refused, OSError) as exc:
        report["errors"].append(dict(show(orig), error=describe(exc)))
        return
    entry["state"] = "restored"
    report["restored"].append(dict(show(orig), size=entry["size"], type=entry["type"]))


def remove_tree(pfd: "int", name: "bytes", dev: "int", totals: "list[int]", dry: "bool",
                top: "bool" = True) -> "None":
    """rm -r without following links: symlinks are unlinked as links, never entered. Counts
    the files and bytes it frees (the trash dir's own manifest frees bytes, not a file)."""
    fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    try:
        if os.fstat(fd).st_dev != dev:
            raise OSError(errno.EXDEV, "another filesystem inside the trash; left alone")
        for sub in sorted(os.fsencode(n) for n in os.listdir(fd)):
            st = os.lstat(sub, dir_fd=fd)
            if stat.S_ISDIR(st.st_mode):
                remove_tree(fd, sub, dev, totals, dry, top=False)
                continue
            if not dry:
                os.unlink(sub, dir_fd=fd)
            totals[0] += 0 if top and sub == MANIFEST else 1
            totals[1] += st.st_size if stat.S_ISREG(st.st_mode) else 0
    finally:
        os.close(fd)
    if not dry:
        os.rmdir(name, dir_fd=pfd)


def run_purge(req: "Json", report: "Json", now: "float") -> "None":
    """Remove the trash dirs under `trash_base` whose manifest is older than `retention`
    (optionally only those of the named runs); with dry_run, only count them."""
    _, parts = trash_root(req, "trash_base")
    if parts[-1] != TRASH_NAME:
        raise Refused(f"trash_base must end in {disp(TRASH_NAME)}")
    retention = number(req, "retention", None)
    if retention is None:
        raise Refused("retention (seconds) is required")
    runs = None if req.get("runs") is None else {as_bytes(r, "runs") for r in listof(req, "runs")}
    dry = bool(req.get("dry_run", False))
    mounts, totals = read_mounts(), [0, 0]
    report.update(purged=[], kept=0, dry_run=dry)
    try:
        bfd = open_trash(parts)
    except FileNotFoundError:
        report["count"], report["bytes"] = totals
        return  # nothing was ever trashed here, or it is all gone: nothing to purge
    try:
        for rel in trash_dirs(bfd):
            if runs is None or rel[0] in runs:
                purge_one(bfd, parts, rel, (now, retention, dry), mounts, totals, report)
    finally:
        os.close(bfd)
    report["count"], report["bytes"] = totals


def purge_one(bfd: "int", parts: "list[bytes]", rel: "list[bytes]", how: "tuple[float, float, bool]",
              mounts: "frozenset[bytes]", totals: "list[int]", report: "Json") -> "None":
    now, retention, dry = how
    path = join(parts + rel)
    if any(inside(m, path) for m in mounts):
        report["errors"].append(dict(show(path), error="holds a mount point"))
        return
    try:
        pfd = open_chain(rel[:-1], start=bfd, private_from=0)
    except (OSError, Refused) as exc:
        report["errors"].append(dict(show(path), error=describe(exc)))
        return
    try:
        tfd = open_chain(rel[-1:], start=pfd, private_from=0)
        try:
            created = (read_manifest(tfd) or {}).get("created", now)
            dev = os.fstat(tfd).st_dev
        finally:
            os.close(tfd)
        if created + retention > now:
            report["kept"] += 1
            return
        before = list(totals)
        remove_tree(pfd, rel[-1], dev, totals, dry)
        report["purged"].append(dict(show(path, "dir"), created=created,
                                     count=totals[0] - before[0], bytes=totals[1] - before[1]))
        if len(rel) == 2 and not dry:  # the run dir goes once its last step dir has
            try:
                os.rmdir(rel[0], dir_fd=bfd)
            except OSError:
                pass
    except (OSError, Refused) as exc:
        report["errors"].append(dict(show(path), error=describe(exc)))
    finally:
        os.close(pfd)


def trash_dirs(bfd: "int") -> "list[list[bytes]]":
    """Trash dirs under a base: <base>/<run> or <base>/<run>/<step>, each with a manifest.
    Symlinks and other filesystems are never entered; anything without a manifest stays."""
    found = []  # type: list[list[bytes]]
    dev = os.fstat(bfd).st_dev
    for run in sorted(os.fsencode(n) for n in os.listdir(bfd)):
        st = os.lstat(run, dir_fd=bfd)
        if not stat.S_ISDIR(st.st_mode) or st.st_dev != dev:
            continue
        fd = os.open(run, DIR_FLAGS, dir_fd=bfd)
        try:
            if lexists(fd, MANIFEST):
                found.append([run])
                continue
            for step in sorted(os.fsencode(n) for n in os.listdir(fd)):
                sst = os.lstat(step, dir_fd=fd)
                if stat.S_ISDIR(sst.st_mode) and sst.st_dev == dev:
                    sfd = os.open(step, DIR_FLAGS, dir_fd=fd)
                    try:
                        if lexists(sfd, MANIFEST):
                            found.append([run, step])
                    finally:
                        os.close(sfd)
        finally:
            os.close(fd)
    return found
