"""Hostile file trees for the safe_delete, trash and logs tests, and ways to compare them.

Every tree lives in the test's own directory under a fleet host's root; the only outside paths
it points at are `/etc` and `/etc/passwd`, through symlinks that must never be followed (the
tests check `/etc` is untouched with `etc_fingerprint`, without writing there)."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

from tests.harness import tree_digest

HOUR, DAY = 3600, 86400
OLD = 3 * DAY
NEWLINE = "line\nbreak.log"
BAD_UTF8 = os.fsdecode(b"bad-\xff\xfe-name.log")
SPACES = "with  spaces .log"
OTHER_UID = 4321  # a file owned by someone else: its owner must come back too (when root)


def aged(path: Path, content: bytes = b"data\n", age: float = OLD, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)
    stamp = time.time() - age
    os.utime(path, (stamp - 5, stamp))  # distinct atime and mtime: both must come back
    return path


def old_link(path: Path, target: str, age: float = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def build_hostile(base: Path) -> Path:
    """base/outside (never to be touched) and base/root (the `within` root); returns root."""
    outside = base / "outside"
    aged(outside / "precious.log", b"precious\n")
    aged(outside / "dir" / "keep.log", b"keep\n")
    root = base / "root"
    app = root / "app"
    aged(app / "old.log", b"old log\n" * 100, mode=0o640)
    aged(app / "sub" / "deep" / "older.log", b"deeper\n", age=10 * DAY, mode=0o600)
    aged(app / "fresh.log", b"written a minute ago\n", age=60)  # under min_age: stays
    aged(app / NEWLINE, b"newline\n")
    aged(app / BAD_UTF8, b"not utf-8\n")
    aged(app / SPACES, b"spaces\n")
    owned = aged(app / "owned.log", b"someone else's\n", mode=0o604)
    if os.geteuid() == 0:
        os.chown(owned, OTHER_UID, OTHER_UID)
        os.utime(owned, (time.time() - OLD - 5, time.time() - OLD))
    for name in ("server.key", "site.pem", "site.crt", "id_ed25519"):
        aged(app / name, b"secret material\n")
    aged(app / ".git" / "objects" / "pack.log", b"git internals\n")
    aged(app / ".ssh" / "authorized.log", b"ssh\n")
    os.mkfifo(app / "pipe.log")
    old_link(app / "etc-dir", "/etc")  # a symlinked directory pointing at /etc
    old_link(app / "passwd.log", "/etc/passwd")  # a symlinked file pointing at /etc/passwd
    old_link(app / "escape.log", "../../outside/precious.log")
    old_link(app / "escape-dir", "../../outside/dir")
    return root


# The files a `within: [root]`, `paths: [root/**]` trash must move, and nothing else.
MOVABLE = {"app/old.log", "app/sub/deep/older.log", f"app/{NEWLINE}", f"app/{BAD_UTF8}",
           f"app/{SPACES}", "app/owned.log", "app/etc-dir", "app/passwd.log", "app/escape.log",
           "app/escape-dir"}


def files_digest(base: Path) -> dict[str, str]:
    """`tree_digest`, except that a directory's mtime and size are left out: moving a file out
    and back changes its directory's mtime, and that is not the file's metadata. Owners are
    included (tree_digest leaves them out); atimes are not (hashing a file reads it)."""
    result = {}
    for rel, line in tree_digest(base).items():
        mode = int(line.split()[0], 8)
        st = os.lstat(base / rel)
        result[rel] = f"dir {mode:o} {st.st_uid}" if stat.S_ISDIR(mode) else \
            f"{line} {st.st_uid}:{st.st_gid}"
    return result


def without_trash(digest: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digest.items() if ".maintenancebot-trash" not in k}


def outside_of(digest: dict[str, str], root_rel: str) -> dict[str, str]:
    return {k: v for k, v in digest.items() if k != root_rel and not k.startswith(root_rel + "/")}


def etc_fingerprint() -> str:
    """/etc's entry list and a few files' content: what a followed symlink would have moved."""
    names = sorted(os.listdir("/etc"))
    files = b"".join(Path("/etc", n).read_bytes() for n in ("passwd", "hostname")
                     if Path("/etc", n).is_file())
    return hashlib.sha256("\0".join(names).encode() + files).hexdigest()
