"""Mount lifecycle seen from outside the daemon: checks, start, wait, unmount, find.

Everything here runs in the process that asks for a mount (the CLI, the Python API, the
tests); the daemon itself is always another process, so blocking syscalls on the mount
never wait on the loop that must answer them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from quotafs.control import SET, STATUS
from quotafs.errors import ExitCode, QuotafsError
from quotafs.mountconfig import MountConfig
from quotafs.mountinfo import find_mount as find_mount  # re-exported for callers

READY_TIMEOUT = 60.0


# -- where things are ---------------------------------------------------------------------

def state_dir() -> str:
    """Per-user directory for daemon logs and mount records."""
    if os.geteuid() == 0:
        base = "/run/quotafs"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = os.path.join(os.environ["XDG_RUNTIME_DIR"], "quotafs")
    else:
        base = os.path.join(tempfile.gettempdir(), f"quotafs-{os.geteuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def _record_name(mountpoint: str) -> str:
    return mountpoint.strip("/").replace("/", "_") or "root"


def record_path(mountpoint: str) -> str:
    return os.path.join(state_dir(), _record_name(mountpoint) + ".json")


def log_path(mountpoint: str) -> str:
    return os.path.join(state_dir(), _record_name(mountpoint) + ".log")


# -- checks -------------------------------------------------------------------------------

def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise QuotafsError("/dev/fuse does not exist: load the fuse module or give the "
                           "container the device", ExitCode.NO_FUSE)
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise QuotafsError(f"cannot open /dev/fuse: {exc.strerror}", ExitCode.NO_FUSE) from None
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise QuotafsError("mounting as a regular user needs fusermount3 (apt-get install "
                           "fuse3), or run as root", ExitCode.NO_FUSE)


def check_mountpoint(path: str) -> str:
    mountpoint = os.path.abspath(path)
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise QuotafsError(f"mount point {path} does not exist", ExitCode.MOUNTPOINT) from None
    except PermissionError:
        raise QuotafsError(f"no permission to mount on {path}: cannot reach it",
                           ExitCode.PERMISSION) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise QuotafsError(f"{path} is a stale mount whose daemon died: run "
                               f"'quotafs umount {path}' first", ExitCode.MOUNTPOINT) from None
        raise QuotafsError(f"mount point {path}: {exc.strerror}", ExitCode.MOUNTPOINT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise QuotafsError(f"mount point {path} is not a directory", ExitCode.MOUNTPOINT)
    if find_mount(mountpoint) is not None:
        raise QuotafsError(f"{path} is already a mount point", ExitCode.MOUNTPOINT)
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        raise QuotafsError(f"no permission to mount on {path} (it must be yours and "
                           "writable)", ExitCode.PERMISSION)
    return mountpoint


def prepare_backing(backing: str | None) -> tuple[str, bool]:
    """(backing directory, whether quotafs made it and owns it)."""
    if backing is None:
        return tempfile.mkdtemp(prefix="quotafs-backing-"), True
    path = os.path.abspath(backing)
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a directory"
        raise QuotafsError(f"backing directory {backing} {what}", ExitCode.BACKING)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise QuotafsError(f"backing directory {backing} is not readable and writable",
                           ExitCode.BACKING)
    return path, False


# -- starting and stopping the daemon -----------------------------------------------------

@dataclass
class Daemon:
    pid: int
    process: subprocess.Popen[bytes] | None  # None once detached from us
    config: MountConfig


def start_daemon(config: MountConfig, detach: bool) -> Daemon:
    """Start the daemon and return once the mount answers; raise its error otherwise.

    Every daemon gets its own session, so a Ctrl-C meant for the program under test
    does not unmount its filesystem under it. Detached daemons log to the state
    directory; attached ones (the Python API, `run`, tests) share our stderr and die
    with us (PR_SET_PDEATHSIG).
    """
    read_fd, write_fd = os.pipe()
    log = open(log_path(config.mountpoint), "ab") if detach else None  # noqa: SIM115
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotafs.daemon", config.to_json(), str(write_fd)],
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=log if detach else None,
            stderr=log if detach else None,
            start_new_session=True,
        )
    except OSError as exc:
        os.close(read_fd)
        if config.private_backing:
            shutil.rmtree(config.backing, ignore_errors=True)
        raise QuotafsError(f"cannot start the daemon ({sys.executable}): {exc.strerror}",
                           ExitCode.DAEMON) from None
    finally:
        os.close(write_fd)
        if log is not None:
            log.close()
    try:
        line = _read_ready_line(read_fd, process)
    finally:
        os.close(read_fd)
    if line != "ready":
        process.wait()
        if config.private_backing:
            shutil.rmtree(config.backing, ignore_errors=True)
        if line.startswith("error "):
            _, code, message = line.split(" ", 2)
            raise QuotafsError(message, ExitCode(int(code)))
        hint = f" (log: {log_path(config.mountpoint)})" if detach else ""
        raise QuotafsError(f"the daemon exited before the mount was ready{hint}",
                           ExitCode.DAEMON)
    _wait_until_mounted(config.mountpoint, process)
    if detach:
        with open(record_path(config.mountpoint), "w") as f:
            json.dump({"pid": process.pid, **json.loads(config.to_json())}, f)
    return Daemon(process.pid, process, config)


def _read_ready_line(fd: int, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            process.kill()
            raise QuotafsError("the daemon did not become ready in time", ExitCode.DAEMON)
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def _wait_until_mounted(mountpoint: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while find_mount(mountpoint) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise QuotafsError("the daemon died while mounting", ExitCode.DAEMON)
        time.sleep(0.01)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    if os.geteuid() == 0:
        cmd = ["umount", *(["-l"] if lazy else []), mountpoint]
    else:
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
        code = ExitCode.MOUNTPOINT if "busy" in message else ExitCode.FAILURE
        raise QuotafsError(f"cannot unmount {mountpoint}: {message}", code)


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


# -- talking to a running daemon ----------------------------------------------------------

def control_error(mountpoint: str, exc: OSError) -> QuotafsError:
    if exc.errno == errno.ENOTCONN:
        return QuotafsError(f"the quotafs daemon of {mountpoint} is gone: run "
                            f"'quotafs umount {mountpoint}'", ExitCode.NOT_QUOTAFS)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return QuotafsError(f"not allowed to change {mountpoint}: only the user who mounted "
                            "it and root may", ExitCode.PERMISSION)
    return QuotafsError(f"{mountpoint}: {exc.strerror}", ExitCode.FAILURE)


def require_quotafs(path: str) -> str:
    mountpoint = os.path.abspath(path)
    info = find_mount(mountpoint)
    if info is None or not info.is_quotafs:
        raise QuotafsError(f"{path} is not a quotafs mount", ExitCode.NOT_QUOTAFS)
    return mountpoint


def read_status(path: str) -> dict[str, Any]:
    mountpoint = require_quotafs(path)
    try:
        raw = os.getxattr(mountpoint, STATUS)
    except OSError as exc:
        raise control_error(mountpoint, exc) from None
    status: dict[str, Any] = json.loads(raw)
    return status


def set_limits(path: str, **changes: int | str | None) -> None:
    # The daemon validates ("5%" of its limit); its one-line refusal is read back.
    from quotafs.faultcmd import _request

    _request(path, SET, changes)


def read_record(mountpoint: str) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError), open(record_path(mountpoint)) as f:
        record: dict[str, Any] = json.load(f)
        return record
    return None


def forget_record(mountpoint: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(record_path(mountpoint))
