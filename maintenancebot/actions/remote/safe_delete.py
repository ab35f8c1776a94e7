"""safe_delete: select, trash, delete, compress, restore and purge files on a host, without ever
following a symlink out of the allowed roots.

Sent to hosts as the program text of `python3 -I -c SOURCE` (under `sudo -n` when the step asks);
the JSON request comes on stdin and exactly one JSON report goes to stdout (exit status 0 when the
report says ok, 1 otherwise). Standard library only, Python 3.6+ (annotations are quoted so that
old interpreters never evaluate them), never imports maintenancebot. It is one file on purpose:
it travels as one program text. Importable for tests: `handle(request) -> report`. Ops: plan
(dry-run), trash, delete, compress (gzip, then trash the original), restore, purge. The
request/report schema is documented in `handle`.

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
import errno
import fnmatch
import gzip
import hashlib
import json
import os
import re
import stat
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never evaluated on the host: old interpreters cannot subscript builtins
    from collections.abc import Callable
    from typing import Any

    Json = dict[str, Any]
    States = frozenset[int]

FORMAT = "maintenancebot-trash/1"
TRASH_NAME = b".maintenancebot-trash"
MANIFEST = b"manifest.json"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
FLOOR_SELF = {b"/", b"/home", b"/var", b"/var/lib"}
FLOOR_TREES = (b"/etc", b"/boot", b"/usr", b"/bin", b"/sbin", b"/root", b"/proc", b"/sys", b"/dev")
PROTECTED_NAMES = (b"*.key", b"*.pem", b"*.crt", b"id_*", b".git", TRASH_NAME)
PROTECTED_DIRS = {b".git", b".ssh", b".gnupg", TRASH_NAME}
DEFAULTS = {"max_files": 10000, "max_bytes": 50 << 30, "min_age": 3600}
MAX_DEPTH = 200  # two Python frames per level stay well under the default recursion limit
SKIPPED_LIMIT = 1000
CHUNK = 1 << 20
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Refused(Exception):
    """The request as a whole is refused; nothing was changed."""


class Changed(Exception):
    """A file or directory changed between the scan and the action: it is left alone."""


class Conflict(Exception):
    """The destination name is taken: it is never overwritten."""


# ---- paths: bytes inside, lossless pairs outside ----

def show(path: "bytes", key: "str" = "path") -> "Json":
    return {key: disp(path), key + "_b64": base64.b64encode(path).decode("ascii")}


def unshow(entry: "Json", key: "str" = "path") -> "bytes":
    return base64.b64decode(entry[key + "_b64"])


def disp(path: "bytes") -> "str":
    return path.decode("utf-8", "backslashreplace")


def as_bytes(value: "Any", what: "str") -> "bytes":
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        return base64.b64decode(value["b64"])
    raise Refused(f"{what}: expected a string or {{\"b64\": ...}}, got {value!r}")


def abs_parts(path: "bytes", what: "str") -> "list[bytes]":
    """The components of an absolute path; relative paths, `..` and NUL are refused."""
    if not path.startswith(b"/") or b"\0" in path:
        raise Refused(f"{what} is not an absolute path: {disp(path)}")
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise Refused(f"{what} contains '..': {disp(path)}")
    return parts


def join(parts: "list[bytes]") -> "bytes":
    return b"/" + b"/".join(parts)


def inside(path: "bytes", top: "bytes") -> "bool":
    return path == top or path.startswith(top.rstrip(b"/") + b"/")


def on_floor(path: "bytes") -> "bool":
    """True for the protected floor: system trees, and the roots that hold everyone's data."""
    parts = path.split(b"/")
    if path in FLOOR_SELF or (len(parts) == 3 and parts[1] == b"home"):
        return True
    if parts[1].startswith(b"lib"):
        return True
    return any(inside(path, top) for top in FLOOR_TREES)


def read_mounts() -> "frozenset[bytes]":
    """Every mount point (bind mounts of files included: they share st_dev with their parent)."""
    try:
        with open("/proc/self/mountinfo", "rb") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return frozenset()  # no /proc: the st_dev check still holds
    unescape = re.compile(rb"\\([0-7]{3})")
    fields = [line.split(b" ") for line in lines]
    return frozenset(
        unescape.sub(lambda m: bytes([int(m.group(1), 8)]), f[4]) for f in fields if len(f) > 4)


# ---- directory descriptors: the only way we reach anything ----

def open_chain(parts: "list[bytes]", create: "int | None" = None, start: "int | None" = None,
               private_from: "int | None" = None) -> "int":
    """Open the directory `start`/parts (or /parts) one level at a time, never following a link.

    A symlink anywhere on the way fails with ELOOP/ENOTDIR. With `create`, missing levels are made
    with exactly that mode (umask notwithstanding). From level index `private_from` on, every
    directory must be ours and writable by nobody else (the trash)."""
    fd = os.open(b"/" if start is None else b".", DIR_FLAGS, dir_fd=start)
    try:
        for i, name in enumerate(parts):
            made = False
            if create is not None:
                try:
                    os.mkdir(name, create, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
            if made and create is not None:
                os.fchmod(fd, create)
            if private_from is not None and i >= private_from:
                check_private(fd, name)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_private(fd: "int", name: "bytes") -> "None":
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise Refused(f"trash directory {disp(name)} is not private (owner uid {st.st_uid}, "
                      f"mode {stat.S_IMODE(st.st_mode):o}); refusing to use it")


def open_trash(parts: "list[bytes]", create: "int | None" = None) -> "int":
    """Open a trash dir given as absolute parts; the levels from TRASH_NAME on must be private."""
    return open_chain(parts, create=create, private_from=parts.index(TRASH_NAME))


def lexists(dfd: "int", name: "bytes") -> "bool":
    try:
        os.lstat(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False


def same(a: "os.stat_result", b: "os.stat_result") -> "bool":
    return ((a.st_dev, a.st_ino, stat.S_IFMT(a.st_mode), a.st_size, a.st_mtime_ns)
            == (b.st_dev, b.st_ino, stat.S_IFMT(b.st_mode), b.st_size, b.st_mtime_ns))


def sha256_fd(fd: "int") -> "str":
    digest = hashlib.sha256()
    for block in iter(lambda: os.read(fd, CHUNK), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_at(dfd: "int", name: "bytes") -> "str":
    fd = os.open(name, READ_FLAGS, dir_fd=dfd)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def meta_of(st: "os.stat_result") -> "Json":
    return {"type": "symlink" if stat.S_ISLNK(st.st_mode) else "file",
            "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def set_meta(dfd: "int", name: "bytes", meta: "Json") -> "None":
    """Give `name` the recorded owner, mode and times (chown first: it clears setuid bits)."""
    times = (meta["atime_ns"], meta["mtime_ns"])
    if meta["type"] == "symlink":
        if os.geteuid() == 0:
            os.chown(name, meta["uid"], meta["gid"], dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=times, dir_fd=dfd, follow_symlinks=False)
        return
    fd = os.open(name, READ_FLAGS, dir_fd=dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Changed("not a regular file any more")
        if os.geteuid() == 0:
            os.fchown(fd, meta["uid"], meta["gid"])
        os.fchmod(fd, meta["mode"])
        os.utime(fd, ns=times)
    finally:
        os.close(fd)


def write_all(fd: "int", data: "bytes") -> "None":
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_across(sfd: "int", sname: "bytes", dfd: "int", dname: "bytes",
                st: "os.stat_result") -> "None":
    """The EXDEV fallback: copy, fsync, verify size and sha256, set metadata. The caller unlinks
    the source. O_EXCL/symlink() never overwrite an existing destination."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(sname, dir_fd=sfd), dname, dir_fd=dfd)
    else:
        src = os.open(sname, READ_FLAGS, dir_fd=sfd)
        try:
            if not same(os.fstat(src), st):
                raise Changed("changed before copy")
            dst = os.open(dname, NEW_FLAGS, 0o600, dir_fd=dfd)
            digest, size = hashlib.sha256(), 0
            try:
                for block in iter(lambda: os.read(src, CHUNK), b""):
                    digest.update(block)
                    size += len(block)
                    write_all(dst, block)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        if size != st.st_size or sha256_at(dfd, dname) != digest.hexdigest():
            os.unlink(dname, dir_fd=dfd)
            raise OSError(errno.EIO, "copy verification failed")
    set_meta(dfd, dname, meta_of(st))
    os.fsync(dfd)


def move_no_clobber(sfd: "int", sname: "bytes", dfd: "int", dname: "bytes",
                    st: "os.stat_result") -> "None":
    """Move out of a directory only we can write (the trash): link() is atomic and fails if the
    destination exists, so a file that reappeared is never clobbered; then drop the trash name."""
    try:
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise Conflict("exists at the original path; not overwritten") from None
        if exc.errno == errno.EXDEV:
            copy_across(sfd, sname, dfd, dname, st)
        elif exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):  # no hard links here
            if lexists(dfd, dname):
                raise Conflict("exists at the original path; not overwritten") from None
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            return
        else:
            raise
    os.unlink(sname, dir_fd=sfd)


# ---- globs: an NFA over path components, so the walk prunes what cannot match ----

def closure(pat: "list[bytes]", states: "set[int]") -> "States":
    todo = list(states)
    while todo:
        i = todo.pop()
        if i < len(pat) and pat[i] == b"**" and i + 1 not in states:
            states.add(i + 1)  # `**` may also match zero levels
            todo.append(i + 1)
    return frozenset(states)


def advance(pat: "list[bytes]", states: "States", name: "bytes") -> "States":
    nxt = set()
    for i in states:
        if i < len(pat) and pat[i] == b"**":
            nxt.add(i)
        elif i < len(pat) and fnmatch.fnmatchcase(name, pat[i]):
            nxt.add(i + 1)
    return closure(pat, nxt)


class Root:
    def __init__(self, given: "bytes", globs: "list[list[bytes]]") -> None:
        self.given = abs_parts(given, "within root")
        self.real = abs_parts(os.path.realpath(given), "within root")
        self.path = join(self.real)
        protected = PROTECTED_DIRS.intersection(self.real)
        if on_floor(self.path) or on_floor(join(self.given)) or protected:
            raise Refused(f"within root is on the protected floor: {disp(self.path)}")
        try:
            fd = open_chain(self.real)
        except OSError as exc:
            raise Refused(f"within root {disp(self.path)}: {exc.strerror}") from None
        st = os.fstat(fd)
        os.close(fd)
        self.dev, self.ino = st.st_dev, st.st_ino
        # A glob may name the root as given or as resolved; the part below the root is the same.
        self.matchers = []  # type: list[tuple[list[bytes], States]]
        for pat in globs:
            for prefix in (self.given, self.real):
                states = closure(pat, {0})
                for name in prefix:
                    states = advance(pat, states, name)
                if states and (pat, states) not in self.matchers:
                    self.matchers.append((pat, states))


class Candidate:
    def __init__(self, root: "Root", rel: "list[bytes]", st: "os.stat_result",
                 parent: "os.stat_result", target: "bytes | None") -> None:
        self.root, self.rel, self.st, self.target = root, rel, st, target
        self.parent_id = (parent.st_dev, parent.st_ino)
        self.path = join(root.real + rel)


# ---- selection ----

class Scan:
    """One selection pass over the roots: the request's filters and what they let through."""

    def __init__(self, req: "Json") -> None:
        self.now_ns = int(number(req, "now", time.time()) * 1e9)
        self.min_age_ns = int(number(req, "min_age", DEFAULTS["min_age"]) * 1e9)
        older, self.larger = number(req, "older_than", None), number(req, "larger_than", None)
        self.older_ns = None if older is None else int(older * 1e9)
        self.max_files = int(number(req, "max_files", DEFAULTS["max_files"]))
        self.max_bytes = int(number(req, "max_bytes", DEFAULTS["max_bytes"]))
        keep = number(req, "keep_newest", None)
        self.keep_newest = None if keep is None else int(keep)
        # A link has nothing to compress; a plan for a compress says so with regular_only.
        self.regular_only = req.get("op") == "compress" or bool(req.get("regular_only"))
        self.one_fs = bool(req.get("one_file_system", True))
        self.verbose = bool(req.get("verbose", False))
        self.exclude = [as_bytes(p, "exclude") for p in listof(req, "exclude")]
        only = req.get("only")  # optional: approved paths from a plan; nothing else may go
        self.only = None if only is None else {as_bytes(p, "only") for p in listof(req, "only")}
        self.mounts = read_mounts()
        self.warnings = []  # type: list[str]
        globs = []
        for raw in listof(req, "paths", required=True):
            pat = abs_parts(as_bytes(raw, "glob"), "glob")
            if all(p == b"**" for p in pat):
                self.warnings.append(f"glob {raw!r} matches / and was dropped")
            else:
                globs.append(pat)
        self.roots = [Root(as_bytes(r, "within"), globs)
                      for r in listof(req, "within", required=True)]
        for pat in globs:
            if not any(pat is p for root in self.roots for p, _ in root.matchers):
                self.warnings.append(f"glob {disp(join(pat))} is outside every within root")
        self.found = {}  # type: dict[bytes, Candidate]
        self.skipped = []  # type: list[Json]
        self.skipped_counts = {}  # type: dict[str, int]

    def run(self) -> "list[Candidate]":
        for root in self.roots:
            if root.matchers:
                fd = open_chain(root.real)
                try:
                    self.walk(root, fd, [], [s for _, s in root.matchers])
                finally:
                    os.close(fd)
        if self.keep_newest:
            self.keep_newest_per_dir()
        return sorted(self.found.values(), key=lambda c: c.path)

    def keep_newest_per_dir(self) -> "None":
        """Leave the `keep_newest` most recent candidates of every directory where they are."""
        by_dir = {}  # type: dict[bytes, list[Candidate]]
        for cand in self.found.values():
            by_dir.setdefault(os.path.dirname(cand.path), []).append(cand)
        for group in by_dir.values():
            group.sort(key=lambda c: (-c.st.st_mtime_ns, c.path))
            for cand in group[:self.keep_newest]:
                del self.found[cand.path]
                self.skip(cand.path, "keep-newest")

    def skip(self, path: "bytes", rule: "str") -> "None":
        self.skipped_counts[rule] = self.skipped_counts.get(rule, 0) + 1
        if self.verbose and len(self.skipped) < SKIPPED_LIMIT:
            self.skipped.append(dict(show(path), rule=rule))

    def walk(self, root: "Root", fd: "int", rel: "list[bytes]", states: "list[States]") -> "None":
        parent = os.fstat(fd)
        for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                continue  # vanished while we looked
            here = [*rel, name]
            nxt = [advance(pat, s, name) for (pat, _), s in zip(root.matchers, states)]
            full = [pat for (pat, _), s in zip(root.matchers, nxt) if len(pat) in s]
            if stat.S_ISDIR(st.st_mode):
                if any(pat[-1] != b"**" for pat in full):  # named, not merely passed through
                    self.skip(join(root.real + here), "directory")
                if any(i < len(pat) for (pat, _), s in zip(root.matchers, nxt) for i in s):
                    self.enter(root, fd, here, st, nxt)
            elif full:
                self.consider(root, fd, here, st, parent)

    def enter(self, root: "Root", fd: "int", rel: "list[bytes]", st: "os.stat_result",
              states: "list[States]") -> "None":
        path = join(root.real + rel)
        rule = self.dir_rule(root, path, rel[-1], st, len(rel))
        if rule:
            self.skip(path, rule)
            return
        try:
            sub = os.open(rel[-1], DIR_FLAGS, dir_fd=fd)
        except OSError as exc:  # ELOOP: it became a symlink since the lstat
            self.skip(path, f"unreadable: {exc.strerror}")
            return
        try:
            now = os.fstat(sub)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                self.walk(root, sub, rel, states)
            else:
                self.skip(path, "changed-during-run")
        finally:
            os.close(sub)

    def dir_rule(self, root: "Root", path: "bytes", name: "bytes", st: "os.stat_result",
                 depth: "int") -> "str | None":
        if name in PROTECTED_DIRS:
            return "protected-dir"
        if path in self.mounts:
            return "mount-point"
        if self.one_fs and st.st_dev != root.dev:
            return "other-filesystem"
        return "too-deep" if depth > MAX_DEPTH else None

    def file_rule(self, root: "Root", rel: "list[bytes]", st: "os.stat_result") -> "str | None":
        """Why this lstat result may not go, or None. Checked at scan and again before acting."""
        path, name = join(root.real + rel), rel[-1]
        if any(fnmatch.fnmatchcase(name, pat) for pat in PROTECTED_NAMES):
            return "protected-name"
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            return "special-file"
        if self.regular_only and not stat.S_ISREG(st.st_mode):
            return "not-a-regular-file"
        if path in self.mounts:
            return "mount-point"
        if self.one_fs and st.st_dev != root.dev:
            return "other-filesystem"
        return self.filter_rule(root, rel, st)

    def filter_rule(self, root: "Root", rel: "list[bytes]", st: "os.stat_result"
                    ) -> "str | None":
        """The runbook's own filters (the rules above are the ones it cannot lift)."""
        path = join(root.real + rel)
        forms = (path, join(root.given + rel), rel[-1])
        if any(fnmatch.fnmatchcase(f, pat) for f in forms for pat in self.exclude):
            return "exclude"
        age_ns = self.now_ns - st.st_mtime_ns
        if age_ns < self.min_age_ns:
            return "min-age"
        if self.older_ns is not None and age_ns <= self.older_ns:
            return "older-than"
        if self.larger is not None and st.st_size <= self.larger:
            return "larger-than"
        if self.only is not None and path not in self.only:
            return "not-approved"
        return None

    def consider(self, root: "Root", fd: "int", rel: "list[bytes]", st: "os.stat_result",
                 parent: "os.stat_result") -> "None":
        path = join(root.real + rel)
        rule = self.file_rule(root, rel, st)
        if rule or path in self.found:  # (already found: overlapping roots)
            if rule:
                self.skip(path, rule)
            return
        target = os.readlink(rel[-1], dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
        self.found[path] = Candidate(root, rel, st, parent, target)
        # Stop early: a runaway glob must not cost hours. (keep_newest may later drop some, so
        # with it the cap counts candidates before that rule: stricter, never looser.)
        if len(self.found) > self.max_files:
            raise Refused(f"more than max_files={self.max_files} files match; nothing was done")


def number(req: "Json", key: "str", default: "float | None") -> "Any":
    value = req.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise Refused(f"{key} must be a non-negative number")
    return value


def listof(req: "Json", key: "str", required: "bool" = False) -> "list[Any]":
    value = req.get(key) or []
    if not isinstance(value, list) or (required and not value):
        raise Refused(f"{key} must be a {'non-empty ' if required else ''}list")
    return value


def listing(cand: "Candidate") -> "Json":
    out = dict(show(cand.path), size=cand.st.st_size, mtime=cand.st.st_mtime_ns / 1e9,
               type=meta_of(cand.st)["type"])
    if cand.target is not None:
        out.update(show(cand.target, "link_target"))
    return out


def top_dirs(files: "list[Json]") -> "list[Json]":
    sums = {}  # type: dict[bytes, list[int]]
    for item in files:
        acc = sums.setdefault(os.path.dirname(unshow(item)), [0, 0])
        acc[0], acc[1] = acc[0] + 1, acc[1] + item["size"]
    ranked = sorted(sums.items(), key=lambda kv: (-kv[1][1], kv[0]))[:10]
    return [dict(show(d, "dir"), count=c, bytes=b) for d, (c, b) in ranked]


# ---- apply: trash, delete or compress ----

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


# ---- restore and purge ----

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


# ---- entry points ----

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
