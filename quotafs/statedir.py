"""The per-user state directory: the records of detached mounts and their daemons' logs.

Shared by the client (which writes a record when it detaches a daemon, and reads it to
clean up after one that died) and the daemon (which removes its own record and empty log
when it exits); standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import urllib.parse
from typing import IO, Any

from quotafs.errors import ExitCode, QuotafsError


def _state_base() -> str:
    if os.geteuid() == 0:
        return "/run/quotafs"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "quotafs")
    return os.path.join(tempfile.gettempdir(), f"quotafs-{os.geteuid()}")


def _open_state_dir() -> int:
    """A descriptor of the per-user state directory, made 0700 if missing.

    It may sit in a shared /tmp, so one that is a link, not a directory, another user's,
    or open to group/other is refused: someone else could plant links or records there.
    Files in it are reached through this descriptor, never by a path that could be swapped.
    """
    base = _state_base()
    fd = -1
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(base, 0o700)
        st = os.lstat(base)
        problem = _state_dir_problem(st)
        if problem is None:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if not os.path.samestat(os.fstat(fd), st):
                problem = "was replaced while it was checked"
    except OSError as exc:
        problem = f"cannot be made or opened: {exc.strerror}"
    if problem is not None:
        if fd >= 0:
            os.close(fd)
        raise QuotafsError(f"refusing the state directory {base}: it {problem}",
                           ExitCode.PERMISSION)
    return fd


def _state_dir_problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"has mode {st.st_mode & 0o777:o}: others must have no access (700)"
    return None


def state_dir() -> str:
    """Per-user directory for daemon logs and mount records (checked, see above)."""
    os.close(_open_state_dir())
    return _state_base()


def _record_name(mountpoint: str) -> str:
    # Escaped, so that /X/a_b and /X/a/b differ; hashed when too long for a file name.
    name = urllib.parse.quote(mountpoint, safe="")
    if len(name) > 200:
        name = "sha256-" + hashlib.sha256(mountpoint.encode(errors="surrogateescape")).hexdigest()
    return name


def record_path(mountpoint: str) -> str:
    return os.path.join(_state_base(), _record_name(mountpoint) + ".json")


def log_path(mountpoint: str) -> str:
    return os.path.join(_state_base(), _record_name(mountpoint) + ".log")


def open_log(mountpoint: str) -> IO[bytes]:
    """The detached daemon's log, opened for appending inside the checked state directory."""
    dir_fd = _open_state_dir()
    try:
        fd = os.open(_record_name(mountpoint) + ".log",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return os.fdopen(fd, "ab")


def write_record(mountpoint: str, record: dict[str, Any]) -> None:
    """Write the record under a fresh name (O_EXCL: never through a planted link), then
    rename it into place, so that a reader never sees half a record."""
    name = _record_name(mountpoint) + ".json"
    tmp = f".{name}.{os.getpid()}.tmp"
    dir_fd = _open_state_dir()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def read_record(mountpoint: str) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, QuotafsError):
        dir_fd = _open_state_dir()
        try:
            fd = os.open(_record_name(mountpoint) + ".json",
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        with os.fdopen(fd) as f:
            record: dict[str, Any] = json.load(f)
            return record
    return None


def drop_log_if_empty(mountpoint: str, fd: int | None = None) -> None:
    """Remove the mount's log if nothing was logged (a log is kept only when it holds
    something to read); with `fd`, only if the log is the file `fd` writes to (a daemon's
    stderr: an attached daemon's is not its log)."""
    with contextlib.suppress(OSError, QuotafsError):
        dir_fd = _open_state_dir()
        try:
            name = _record_name(mountpoint) + ".log"
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if st.st_size == 0 and (fd is None or os.path.samestat(st, os.fstat(fd))):
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def forget_record(mountpoint: str, pid: int | None = None) -> None:
    """Remove the mount's record (only if it names `pid`, when given: the daemon's own)."""
    if pid is not None and (read_record(mountpoint) or {}).get("pid") != pid:
        return
    with contextlib.suppress(OSError, QuotafsError):
        dir_fd = _open_state_dir()
        try:
            os.unlink(_record_name(mountpoint) + ".json", dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
