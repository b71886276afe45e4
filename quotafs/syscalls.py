"""Thin wrappers for the *at() syscalls that Python's os module does not expose.

They operate on O_PATH descriptors (AT_EMPTY_PATH), which is what lets quotafs work on
any inode without building a path to it, whatever the backing directory's path length.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_OMIT = (1 << 30) - 2

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
        else:
            times[slot].tv_sec, times[slot].tv_nsec = divmod(value, 1_000_000_000)
    # utimensat() cannot take AT_EMPTY_PATH on older kernels; /proc/self/fd works for any
    # inode type, symlinks included: the magic link resolves to the inode the descriptor
    # holds and is not followed any further.
    path = f"/proc/self/fd/{fd}".encode()
    _check(_libc.utimensat(AT_FDCWD, path, times, 0), "utimensat")


def raise_nofile_limit() -> int:
    """Let the daemon hold one O_PATH fd per live inode: raise RLIMIT_NOFILE as far as allowed."""
    import resource

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


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))
