"""Mount lifecycle seen from outside the daemon: checks, start, wait, unmount, find
(the records of detached mounts are quotafs.statedir's, the control requests
quotafs.client.control's).

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

from quotafs import reap
from quotafs.client import probe as _probe
from quotafs.client.probe import Op, Result
from quotafs.errors import ExitCode, QuotafsError, printable, with_doctor_hint
from quotafs.mountinfo import MountInfo, find_mount
from quotafs.options import MountOptions
from quotafs.statedir import drop_log_if_empty, log_path, open_log, write_record
from quotafs.unmounting import unmount_failure, unmount_retrying

READY_TIMEOUT = 60.0
# How long a probe of a mount (a stat, umount) or a control request (status, set, fault,
# events) waits for its daemon,
# in seconds; QUOTAFS_PROBE_TIMEOUT overrides it.
PROBE_TIMEOUT = 10.0


def probe_timeout() -> float:
    text = os.environ.get("QUOTAFS_PROBE_TIMEOUT")
    if text is None:
        return PROBE_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 86400:
        raise QuotafsError(f"QUOTAFS_PROBE_TIMEOUT={text!r}: not a number of seconds "
                           "between 0 and 86400", ExitCode.USAGE)
    return value


# -- checks -------------------------------------------------------------------------------

def check_fuse() -> None:
    """Raise QuotafsError (ExitCode.NO_FUSE) if quotafs cannot mount here; the message
    ends by pointing at `quotafs doctor`, which says what to change."""
    problem = _fuse_problem()
    if problem is not None:
        raise QuotafsError(with_doctor_hint(problem), ExitCode.NO_FUSE)


def _fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist: load the fuse module or give the container the device"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return ("mounting as a regular user needs fusermount3 (apt-get install fuse3), or run "
                "as root")
    return None


def resolve(path: str, what: str = "mount point") -> str:
    """The real path of `path`, for every command alike (a link to a mount point names it).

    The last component is never stat()ed: a mount point's root is answered by its daemon,
    and a stopped or stuck daemon would hang realpath; readlink is answered by the kernel.
    """
    if not path:
        raise QuotafsError(f"the {what} is an empty path", ExitCode.USAGE)
    if "\0" in path:  # no path has one; os would raise ValueError, not an OSError
        raise QuotafsError(f"the {what} {printable(path)} contains a NUL byte", ExitCode.USAGE)
    current = os.path.join(os.getcwd(), path)
    for _ in range(40):  # the kernel's limit of links in one lookup
        parent, name = os.path.split(current.rstrip("/") or "/")
        if name in ("", ".", ".."):
            return os.path.realpath(current)
        current = os.path.join(os.path.realpath(parent), name)
        try:
            target = os.readlink(current)
        except OSError:
            return current  # not a link, or missing: the caller says which
        current = os.path.join(os.path.dirname(current), target)
    raise QuotafsError(f"{what} {path}: too many levels of symbolic links",
                       ExitCode.MOUNTPOINT)


def check_mountpoint(path: str) -> str:
    mountpoint = resolve(path)
    if find_mount(mountpoint) is not None:
        try:
            probe(mountpoint, [("stat",)])
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise QuotafsError(f"{path} is a stale mount whose daemon died: run "
                                   f"'quotafs umount {path}' first",
                                   ExitCode.MOUNTPOINT) from None
        raise QuotafsError(f"{path} is already a mount point", ExitCode.MOUNTPOINT)
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise QuotafsError(f"mount point {path} does not exist", ExitCode.MOUNTPOINT) from None
    except PermissionError:
        raise QuotafsError(f"no permission to mount on {path}: cannot reach it",
                           ExitCode.PERMISSION) from None
    except OSError as exc:
        raise QuotafsError(f"mount point {path}: {exc.strerror}", ExitCode.MOUNTPOINT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise QuotafsError(f"mount point {path} is not a directory", ExitCode.MOUNTPOINT)
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        raise QuotafsError(f"no permission to mount on {path} (it must be yours and "
                           "writable)", ExitCode.PERMISSION)
    return mountpoint


def prepare_backing(backing: str | None) -> tuple[str, bool]:
    """(backing directory, whether quotafs made it and owns it)."""
    if backing is None:
        return tempfile.mkdtemp(prefix="quotafs-backing-"), True
    path = resolve(backing, "backing directory")
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a directory"
        raise QuotafsError(f"backing directory {backing} {what}", ExitCode.BACKING)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise QuotafsError(f"backing directory {backing} is not readable and writable",
                           ExitCode.BACKING)
    return path, False


def check_overlap(mountpoint: str, backing: str) -> None:
    """Refuse a mount point below the backing directory: a lookup there makes the daemon
    stat its own mount and wait for itself, with the caller stuck in D state. Directories
    are compared by identity, so a bind mount of the backing directory counts too. The
    backing directory at or below the mount point works (the daemon opened it before
    mounting over it) and is allowed."""
    try:
        st = os.stat(backing)
    except OSError:
        return  # prepare_backing has said what is wrong with it
    key = (st.st_dev, st.st_ino)
    path = os.path.dirname(mountpoint)
    while True:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == key:
                raise QuotafsError(f"the mount point {mountpoint} is inside the backing "
                                   f"directory {backing}: the daemon would wait on itself; "
                                   "choose a mount point outside it", ExitCode.MOUNTPOINT)
        if path == os.path.dirname(path):
            return
        path = os.path.dirname(path)


# -- starting and stopping the daemon -----------------------------------------------------

@dataclass
class Daemon:
    pid: int
    process: subprocess.Popen[bytes] | None  # None once detached from us
    config: MountOptions


def start_daemon(config: MountOptions, detach: bool) -> Daemon:
    """Start the daemon and return once the mount answers; raise its error otherwise.

    Every daemon gets its own session, so a Ctrl-C meant for the program under test
    does not unmount its filesystem under it. Detached daemons log to the state
    directory; attached ones (the Python API, `run`, tests) share our stderr and die
    with us (PR_SET_PDEATHSIG).
    """
    try:
        return _spawn(config, detach)
    except BaseException:
        # Whatever failed (the overlap check, the state directory, the daemon, Ctrl-C),
        # a private backing directory made for this mount must not stay behind.
        if config.private_backing and find_mount(config.mountpoint) is None:
            shutil.rmtree(config.backing_dir, ignore_errors=True)
        if detach:
            drop_log_if_empty(config.mountpoint)  # the error was told; nothing to keep
        raise


def _spawn(config: MountOptions, detach: bool) -> Daemon:
    check_overlap(config.mountpoint, config.backing_dir)
    read_fd, write_fd = os.pipe()
    config_fd = _config_descriptor(config)
    log = open_log(config.mountpoint) if detach else None
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotafs.daemon", str(config_fd), str(write_fd)],
            pass_fds=(write_fd, config_fd),
            stdin=subprocess.DEVNULL,
            stdout=log if detach else None,
            stderr=log if detach else None,
            start_new_session=True,
        )
    except OSError as exc:
        os.close(read_fd)
        raise QuotafsError(f"cannot start the daemon ({sys.executable}): {exc.strerror}",
                           ExitCode.DAEMON) from None
    finally:
        os.close(write_fd)
        os.close(config_fd)
        if log is not None:
            log.close()
    try:
        return _await_mount(config, process, read_fd, detach)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or failed while the daemon may have mounted: stop
        # it, and it detaches its mount as it exits, so no mount outlives the error.
        if process.poll() is None:
            process.terminate()
            reap(process, 10)
        raise


def _await_mount(config: MountOptions, process: subprocess.Popen[bytes], read_fd: int,
                 detach: bool) -> Daemon:
    try:
        line = _read_ready_line(read_fd, process)
    finally:
        os.close(read_fd)
    if line != "ready":
        process.wait()
        if line.startswith("error "):
            _, code, message = line.split(" ", 2)
            raise QuotafsError(message, ExitCode(int(code)))
        hint = f" (log: {log_path(config.mountpoint)})" if detach else ""
        raise QuotafsError(with_doctor_hint(f"the daemon exited before the mount was "
                                            f"ready{hint}"), ExitCode.DAEMON)
    _wait_until_mounted(config.mountpoint, process)
    if detach:
        write_record(config.mountpoint, {"pid": process.pid, **json.loads(config.to_json())})
    return Daemon(process.pid, process, config)


def _config_descriptor(config: MountOptions) -> int:
    """The configuration in an anonymous memory file for the daemon to inherit: not on its
    argv, which every user may read (ps) and ARG_MAX bounds."""
    fd = os.memfd_create("quotafs-config", os.MFD_CLOEXEC)
    try:
        data = config.to_json().encode()
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
            process.terminate()  # it may have mounted elsewhere: let it unmount
            raise QuotafsError("the daemon died while mounting", ExitCode.DAEMON)
        time.sleep(0.01)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    mountpoint = resolve(mountpoint)
    if os.geteuid() == 0:
        # -c: the path is canonical already; canonicalizing would stat the mount root,
        # which a stopped daemon never answers.
        cmd = ["umount", "-c", *(["-l"] if lazy else []), mountpoint]
    else:
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    timeout = probe_timeout()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)  # else it waits in the kernel; init reaps it later
        raise NoAnswer(mountpoint, timeout) from None
    if proc.returncode != 0:
        raise unmount_failure(mountpoint, stderr)


def unmount_patiently(mountpoint: str) -> None:
    """unmount(), retried for about a second while the mount is busy, as it may be for a
    moment right after a program in it exits. Still busy then: unmount's busy error."""
    busy = unmount_retrying(resolve(mountpoint), unmount, lazy=False)
    if busy is not None:
        raise unmount_failure(mountpoint, busy)


def check_may_unmount(info: MountInfo) -> None:
    """Only the user who mounted (the kernel's user_id of the FUSE mount) and root may."""
    owner = info.owner_uid
    if os.geteuid() != 0 and owner is not None and owner != os.geteuid():
        raise QuotafsError(f"not allowed to unmount {info.mountpoint}: only the user who "
                           f"mounted it (uid {owner}) and root may", ExitCode.PERMISSION)


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

class NoAnswer(QuotafsError):
    """The daemon did not answer a probe within PROBE_TIMEOUT (stopped, or stuck)."""

    def __init__(self, mountpoint: str, waited: float) -> None:
        super().__init__(f"the quotafs daemon of {mountpoint} does not answer (waited "
                         f"{waited:g} s): it is stopped or stuck; resume it, or "
                         f"detach the mount with 'quotafs umount --lazy {mountpoint}'",
                         ExitCode.DAEMON)


# The command line sets this: a command must exit even when a request it made is never
# answered, so its probes run in a child process (see quotafs/client/probe.py).
ISOLATE_PROBES = False


def probe(mountpoint: str, ops: list[Op]) -> list[Result]:
    """Run ("stat",) / ("statvfs",) on the mount within PROBE_TIMEOUT (NoAnswer
    otherwise), in order, from one thread; results are bytes or the OSError.
    A single op's OSError is raised rather than returned."""
    run = _probe.in_child if ISOLATE_PROBES else _probe.in_thread
    timeout = probe_timeout()
    try:
        results = run(mountpoint, ops, timeout)
    except (OSError, ValueError) as exc:  # the child itself failed
        raise QuotafsError(f"cannot probe {mountpoint}: {exc}", ExitCode.FAILURE) from None
    if results is None:
        raise NoAnswer(mountpoint, timeout)
    if len(ops) == 1 and isinstance(results[0], OSError):
        raise results[0]
    return results
