"""Directory descriptors: the only way the program reaches a file (O_NOFOLLOW, one level at a
time from `/`), and moving or copying between them without clobbering."""

import errno
import hashlib
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never evaluated on the host: old interpreters cannot subscript builtins
    from .paths import Json

from .paths import (
    CHUNK,
    DIR_FLAGS,
    NEW_FLAGS,
    READ_FLAGS,
    TRASH_NAME,
    Changed,
    Conflict,
    Refused,
    disp,
)


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
