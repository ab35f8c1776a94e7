"""Selection: the globs as an NFA over path components, and the walk that finds candidates."""

import fnmatch
import os
import stat
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never evaluated on the host: old interpreters cannot subscript builtins
    from typing import Any

    from .paths import Json, States

from .descriptors import meta_of, open_chain
from .paths import (
    DEFAULTS,
    DIR_FLAGS,
    MAX_DEPTH,
    PROTECTED_DIRS,
    PROTECTED_NAMES,
    SKIPPED_LIMIT,
    Refused,
    abs_parts,
    as_bytes,
    disp,
    join,
    on_floor,
    read_mounts,
    show,
    unshow,
)


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
