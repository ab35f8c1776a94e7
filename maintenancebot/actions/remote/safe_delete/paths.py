"""Constants, refusals, and paths: bytes inside, lossless {path, path_b64} pairs outside."""

import base64
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never evaluated on the host: old interpreters cannot subscript builtins
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
