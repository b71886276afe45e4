"""Thin wrappers for the *at() syscalls that Python's os module does not expose.

They operate on O_PATH descriptors (AT_EMPTY_PATH), which is what lets quotafs work on
any inode without building a path to it, whatever the backing directory's path length.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import resource
from collections.abc import Iterable, Iterator

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_OMIT = (1 << 30) - 2
UTIME_NOW = (1 << 30) - 1
NOW = -1  # for utimens_path_fd: the current time, set by the kernel (UTIME_NOW)

_libc.renameat2.argtypes = [
    ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(old_dirfd: int, old: bytes, new_dirfd: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dirfd, old, new_dirfd, new, flags), "renameat2")


def fchown_path_fd(fd: int, uid: int, gid: int) -> None:
    """chown the inode an O_PATH fd refers to, symlinks included (lchown semantics)."""
    _check(
        _libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                       AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        "fchownat",
    )


def utimens_path_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times on an O_PATH fd's inode; None leaves that time unchanged."""
    times = (_Timespec * 2)()
    for slot, value in enumerate((atime_ns, mtime_ns)):
        if value is None:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_OMIT
        elif value == NOW:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_NOW
        else:
            times[slot].tv_sec, times[slot].tv_nsec = divmod(value, 1_000_000_000)
    # utimensat() cannot take AT_EMPTY_PATH on older kernels; /proc/self/fd works for any
    # inode type, symlinks included: the magic link resolves to the inode the descriptor
    # holds and is not followed any further.
    path = f"/proc/self/fd/{fd}".encode()
    _check(_libc.utimensat(AT_FDCWD, path, times, 0), "utimensat")


# -- acting with a caller's filesystem identity ------------------------------------------

# setgroups(2) by number: glibc's setgroups() changes every thread of the process (the
# setxid broadcast), and the identity must be the calling thread's alone, as setfsuid's is.
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159}.get(platform.machine())
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]


def _setgroups_thread(groups: Iterable[int]) -> None:
    if _SYS_SETGROUPS is None:
        raise OSError(errno.ENOSYS, f"setgroups: no syscall number for {platform.machine()}")
    gids = list(groups)
    array = (ctypes.c_uint * max(1, len(gids)))(*gids)
    _check(_libc.syscall(_SYS_SETGROUPS, len(gids), array), "setgroups")


def _set_fs_ids(uid: int, gid: int) -> None:
    # setfsuid/setfsgid report no error; asking with an invalid id (-1) returns the current.
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    current = (_libc.setfsuid(0xFFFFFFFF) & 0xFFFFFFFF, _libc.setfsgid(0xFFFFFFFF) & 0xFFFFFFFF)
    if current != (uid, gid):
        raise OSError(errno.EPERM, f"setfsuid({uid})/setfsgid({gid}) refused")


class Identity:
    """Switch the calling thread's filesystem uid, gid and groups to a caller's and back.

    Meant for a root daemon: with a non-zero fsuid the kernel drops the filesystem
    capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN, CAP_FSETID, ...), so every
    permission check of the backing filesystem is the caller's own; switching back to
    fsuid 0 gives them back. Only the thread that switches is affected.
    """

    def __init__(self) -> None:
        self.uid = os.geteuid()
        self.gid = os.getegid()
        self._groups = os.getgroups()
        self.acting: tuple[int, int, tuple[int, ...]] | None = None  # whose, while switched

    @contextlib.contextmanager
    def caller(self, uid: int, gid: int, groups: Iterable[int]) -> Iterator[None]:
        """Within the block, filesystem syscalls run as (uid, gid, groups)."""
        who = (uid, gid, tuple(groups))
        self._switch(who)
        try:
            yield
        finally:
            self._restore()

    @contextlib.contextmanager
    def daemon(self) -> Iterator[None]:
        """The daemon's own identity back for bookkeeping inside a caller's block."""
        who = self.acting
        if who is None:
            yield
            return
        self._restore()
        try:
            yield
        finally:
            self._switch(who)

    def _switch(self, who: tuple[int, int, tuple[int, ...]]) -> None:
        uid, gid, groups = who
        try:
            _setgroups_thread(groups)
            _set_fs_ids(uid, gid)
        except BaseException:
            self._restore()
            raise
        self.acting = who

    def _restore(self) -> None:
        self.acting = None
        _set_fs_ids(self.uid, self.gid)
        _setgroups_thread(self._groups)


def raise_nofile_limit() -> int:
    """Let the daemon hold one O_PATH fd per live inode: raise RLIMIT_NOFILE as far as allowed."""

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = max(hard, int(f.read()))
        except OSError:
            pass
    for candidate in (target, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, max(candidate, hard)))
            return candidate
        except (ValueError, OSError):
            continue
    return soft
