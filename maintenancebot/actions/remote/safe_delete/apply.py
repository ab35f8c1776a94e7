"""Apply a selection: trash, delete or compress each candidate, re-checked right before."""

import errno
import gzip
import json
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never evaluated on the host: old interpreters cannot subscript builtins
    from .paths import Json

from .descriptors import (
    copy_across,
    lexists,
    meta_of,
    open_chain,
    open_trash,
    same,
    set_meta,
    sha256_at,
)
from .paths import (
    CHUNK,
    FORMAT,
    MANIFEST,
    NEW_FLAGS,
    READ_FLAGS,
    SAFE_ID,
    TRASH_NAME,
    Changed,
    Conflict,
    Refused,
    abs_parts,
    as_bytes,
    disp,
    join,
    on_floor,
    show,
    unshow,
)
from .selection import Candidate, Scan, listing, number


def trash_root(req: "Json", key: "str") -> "tuple[bytes, list[bytes]]":
    path = as_bytes(req.get(key) or "", key)
    parts = abs_parts(path, key)
    if TRASH_NAME not in parts or on_floor(join(parts)):
        raise Refused(f"{key} must lie under a {disp(TRASH_NAME)} directory off the protected "
                      "floor")
    return join(parts), parts


def trash_id(req: "Json") -> "list[bytes]":
    """The <run>/<step> names of this step's trash dir: plain names, so they cannot climb out."""
    given = req.get("trash_id")
    if not isinstance(given, list) or len(given) != 2 or not all(
            isinstance(p, str) and SAFE_ID.match(p) for p in given):
        raise Refused("trash_id must be [run, step], each [A-Za-z0-9._-] and not starting "
                      "with a dot")
    return [p.encode("ascii") for p in given]


def read_manifest(tfd: "int") -> "Json | None":
    try:
        fd = os.open(MANIFEST, READ_FLAGS, dir_fd=tfd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        manifest = json.loads(handle.read().decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Refused(f"manifest.json is not a {FORMAT} manifest")
    return manifest


def write_manifest(tfd: "int", manifest: "Json") -> "None":
    """tmp + fsync + rename + fsync(dir): a crash leaves the old or the new manifest, whole."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode("ascii")
    tmp = b".manifest.json.tmp"
    if lexists(tfd, tmp):
        os.unlink(tmp, dir_fd=tfd)
    fd = os.open(tmp, NEW_FLAGS, 0o600, dir_fd=tfd)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, MANIFEST, src_dir_fd=tfd, dst_dir_fd=tfd)
    os.fsync(tfd)


def recheck(scan: "Scan", cand: "Candidate") -> "tuple[int, os.stat_result]":
    """Re-open the parent from / without following links and re-lstat the file; raise Changed
    unless it is still the very file the scan chose and still qualifies. Returns the parent fd."""
    try:
        pfd = open_chain(cand.root.real + cand.rel[:-1])
    except OSError as exc:  # ELOOP/ENOTDIR: a directory on the way was swapped for a symlink
        raise Changed(f"parent directory changed: {exc.strerror}") from None
    try:
        pst = os.fstat(pfd)
        if (pst.st_dev, pst.st_ino) != cand.parent_id:
            raise Changed("parent directory was replaced")
        st = os.lstat(cand.rel[-1], dir_fd=pfd)
        if not same(st, cand.st) or scan.file_rule(cand.root, cand.rel, st):
            raise Changed("file changed since the scan")
    except BaseException:
        os.close(pfd)
        raise
    return pfd, st


def trash_one(scan: "Scan", cand: "Candidate", tfd: "int", entry: "Json") -> "None":
    pfd, st = recheck(scan, cand)
    name = cand.rel[-1]
    try:
        dfd = open_chain([b"files", *cand.root.real, *cand.rel[:-1]], create=0o700, start=tfd,
                         private_from=0)
        try:
            if lexists(dfd, name):
                raise Conflict("already in the trash")
            try:  # the trash is private (0700): renaming into it cannot be raced
                os.rename(name, name, src_dir_fd=pfd, dst_dir_fd=dfd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                copy_across(pfd, name, dfd, name, st)
                if not same(os.lstat(name, dir_fd=pfd), st):
                    raise Changed("file changed during the copy; original kept, copy in trash"
                                  ) from None
                os.unlink(name, dir_fd=pfd)
            moved = os.lstat(name, dir_fd=dfd)
            if (moved.st_dev, moved.st_ino, stat.S_IFMT(moved.st_mode)) != (
                    st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)) and moved.st_dev == st.st_dev:
                put_back(dfd, pfd, name)
            entry.update(meta_of(moved), state="trashed")
            if stat.S_ISREG(moved.st_mode):
                entry["sha256"] = sha256_at(dfd, name)
        finally:
            os.close(dfd)
    finally:
        os.close(pfd)


def put_back(dfd: "int", pfd: "int", name: "bytes") -> "None":
    """Something else was swapped in between the last check and the rename: return it."""
    if lexists(pfd, name):
        raise Changed("swapped during the move; the newcomer stays in the trash, the original "
                      "name is taken")
    os.rename(name, name, src_dir_fd=dfd, dst_dir_fd=pfd)
    raise Changed("swapped during the move; put back, nothing moved")


def delete_one(scan: "Scan", cand: "Candidate") -> "None":
    pfd, _ = recheck(scan, cand)
    try:
        os.unlink(cand.rel[-1], dir_fd=pfd)
    finally:
        os.close(pfd)


def gzip_one(scan: "Scan", cand: "Candidate", entry: "Json", level: "int") -> "None":
    """Write <name>.gz next to the file (never over an existing one) with the original's mode,
    owner and times; the caller then trashes or deletes the original."""
    pfd, st = recheck(scan, cand)
    gz = cand.rel[-1] + b".gz"
    try:
        if lexists(pfd, gz):
            raise Conflict(f"{disp(gz)} exists; not overwritten")
        src = os.open(cand.rel[-1], READ_FLAGS, dir_fd=pfd)
        try:
            if not same(os.fstat(src), st):
                raise Changed("changed before compression")
            dst = os.open(gz, NEW_FLAGS, 0o600, dir_fd=pfd)
            try:
                with os.fdopen(os.dup(dst), "wb") as raw, gzip.GzipFile(
                        filename="", mode="wb", fileobj=raw, compresslevel=level,
                        mtime=int(st.st_mtime)) as packed:
                    for block in iter(lambda: os.read(src, CHUNK), b""):
                        packed.write(block)
                os.fsync(dst)
            except BaseException:
                os.unlink(gz, dir_fd=pfd)
                raise
            finally:
                os.close(dst)
        finally:
            os.close(src)
        set_meta(pfd, gz, meta_of(st))
        entry.update(show(join(cand.root.real + cand.rel[:-1] + [gz]), "derived"),
                     derived_sha256=sha256_at(pfd, gz),
                     derived_size=os.lstat(gz, dir_fd=pfd).st_size)
    finally:
        os.close(pfd)


def drop_derived(scan: "Scan", cand: "Candidate", entry: "Json") -> "None":
    """Undo gzip_one when the original could not go: the .gz is ours and unchanged."""
    try:
        pfd = open_chain(cand.root.real + cand.rel[:-1])
    except OSError:
        return  # the directory went away or was swapped: the .gz went with it, nothing to undo
    try:
        remove_derived(pfd, cand.rel[-1] + b".gz", entry)
    finally:
        os.close(pfd)


def remove_derived(pfd: "int", gz: "bytes", entry: "Json") -> "bool":
    try:
        st = os.lstat(gz, dir_fd=pfd)
    except FileNotFoundError:
        return True
    if stat.S_ISREG(st.st_mode) and sha256_at(pfd, gz) == entry.get("derived_sha256"):
        os.unlink(gz, dir_fd=pfd)
        return True
    return False


def apply(scan: "Scan", cands: "list[Candidate]", req: "Json", report: "Json") -> "list[Json]":
    """Trash, delete or compress each candidate; returns the listings of those that went."""
    op = req["op"]
    to_trash = op == "trash" or (op == "compress" and req.get("mode", "trash") == "trash")
    tfd, manifest = -1, {}  # type: int, Json
    entries = [dict(show(c.path), state="pending", sha256=None, **meta_of(c.st)) for c in cands]
    if to_trash:
        if not cands:
            return []  # nothing to move: no trash dir is made
        tparts = [*scan.roots[0].real, TRASH_NAME, *trash_id(req)]
        tfd = open_trash(tparts, create=0o700)
        manifest = read_manifest(tfd) or {"format": FORMAT, "created": scan.now_ns / 1e9,
                                          "op": op, "files": []}
        for cand, entry in zip(cands, entries):
            entry.update(show(join([*tparts, b"files", *cand.root.real, *cand.rel]), "trash_path"))
            if cand.target is not None:
                entry.update(show(cand.target, "link_target"))
        manifest["files"].extend(entries)
        write_manifest(tfd, manifest)  # before the first move: a crash stays restorable
        report.update(show(join(tparts), "trash_dir"), **show(join([*tparts, MANIFEST]),
                                                              "manifest"))
    done = []  # type: list[Json]
    try:
        for cand, entry in zip(cands, entries):
            try:
                item = act_on(scan, cand, entry, req, tfd, report)
            except Exception as exc:  # noqa: BLE001 -- e.g. the trash turned non-private
                # Stop at once, but still report what was done, so that it can be undone.
                report["errors"].append(dict(show(cand.path), error="stopped: " + describe(exc)))
                break
            if item is not None:
                done.append(item)
    finally:
        if to_trash:
            write_manifest(tfd, manifest)
            os.close(tfd)
    return done


def act_on(scan: "Scan", cand: "Candidate", entry: "Json", req: "Json", tfd: "int",
           report: "Json") -> "Json | None":
    op = req["op"]
    item = listing(cand)
    try:
        if op == "compress":
            gzip_one(scan, cand, entry, int(number(req, "level", 6)))
            item.update(show(unshow(entry, "derived"), "derived"),
                        derived_size=entry["derived_size"])
        try:
            if tfd >= 0:
                trash_one(scan, cand, tfd, entry)
                item.update(show(unshow(entry, "trash_path"), "trash_path"))
            else:
                delete_one(scan, cand)
                entry["state"] = "deleted"
        except (Changed, Conflict, OSError):
            if op == "compress":
                drop_derived(scan, cand, entry)
            raise
    except Changed as exc:
        # Listed even without `verbose`: a race with someone else is worth a look.
        scan.skipped_counts["changed-during-run"] = scan.skipped_counts.get(
            "changed-during-run", 0) + 1
        scan.skipped.append(dict(show(cand.path), rule=f"changed-during-run: {exc}"))
        entry["state"] = "not-moved"
        return None
    except (Conflict, OSError) as exc:
        report["errors"].append(dict(show(cand.path), error=describe(exc)))
        entry["state"] = "failed"
        return None
    return item


def describe(exc: "BaseException") -> "str":
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename
        return exc.strerror + (f": {disp(os.fsencode(name))}" if isinstance(name, (str, bytes))
                               else "")
    return str(exc) or type(exc).__name__
