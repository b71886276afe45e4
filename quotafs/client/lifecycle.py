"""Mount lifecycle seen from outside the daemon: checks, start, wait, unmount, find.

Everything here runs in the process that asks for a mount (the CLI, the Python API, the
tests); the daemon itself is always another process, so blocking syscalls on the mount
never wait on the loop that must answer them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from quotafs.client import probe as _probe
from quotafs.client.mountinfo import MountInfo
from quotafs.client.mountinfo import find_mount as find_mount  # re-exported for callers
from quotafs.client.probe import Op, Result
from quotafs.daemon.control import RESULT, SET, STATUS
from quotafs.errors import ExitCode, QuotafsError
from quotafs.options import MountOptions

READY_TIMEOUT = 60.0
# How long a probe of a mount (status, set, fault, events, umount) waits for its daemon,
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


# -- where things are ---------------------------------------------------------------------

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


def resolve(path: str, what: str = "mount point") -> str:
    """The real path of `path`, for every command alike (a link to a mount point names it).

    The last component is never stat()ed: a mount point's root is answered by its daemon,
    and a stopped or stuck daemon would hang realpath; readlink is answered by the kernel.
    """
    if not path:
        raise QuotafsError(f"the {what} is an empty path", ExitCode.USAGE)
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
        line = _read_ready_line(read_fd, process)
    finally:
        os.close(read_fd)
    if line != "ready":
        process.wait()
        if line.startswith("error "):
            _, code, message = line.split(" ", 2)
            raise QuotafsError(message, ExitCode(int(code)))
        hint = f" (log: {log_path(config.mountpoint)})" if detach else ""
        raise QuotafsError(f"the daemon exited before the mount was ready{hint}",
                           ExitCode.DAEMON)
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


def unmount_failure(mountpoint: str, stderr: str) -> QuotafsError:
    """The error of a failed umount / fusermount3 -u, from its stderr: ExitCode.MOUNTPOINT
    when the mount is busy (the one failure worth a retry)."""
    message = (stderr.strip().splitlines() or ["unmount failed"])[-1]
    return QuotafsError(f"cannot unmount {mountpoint}: {message}", _unmount_code(message))


def _unmount_code(message: str) -> ExitCode:
    if "busy" in message:
        return ExitCode.MOUNTPOINT
    # fusermount3 finds no mount of the caller's own in mtab; umount wants root.
    if any(m in message for m in ("not found in /etc/mtab", "superuser", "not permitted")):
        return ExitCode.PERMISSION
    return ExitCode.FAILURE


BUSY_TRIES = 5  # polite unmounts of a busy mount (busy right after a child exits), ~1 s


def unmount_retrying(mountpoint: str, tries: int = BUSY_TRIES, lazy: bool = True,
                     umount: Callable[[str, bool], None] | None = None) -> str | None:
    """Unmount `mountpoint` if mounted, retrying while it is busy (0.1 s, 0.2 s, then 0.25 s
    apart); then, with `lazy`, detach it lazily. Returns None once nothing is mounted there,
    else why it still is (without `lazy`: "target is busy"). A failure other than busy is
    not retried: with `lazy` the lazy unmount follows, and its failure is raised; without,
    it is raised. `umount(path, lazy)` replaces this module's unmount (the ext4 reference
    runs its own tool); it raises QuotafsError, ExitCode.MOUNTPOINT when busy."""
    do = umount or unmount
    error: QuotafsError | None = None
    for attempt in range(tries):
        if find_mount(mountpoint) is None:
            return None
        try:
            do(mountpoint, False)
            return None
        except QuotafsError as exc:
            error = exc
            if find_mount(mountpoint) is None:
                return None
            if exc.code != ExitCode.MOUNTPOINT:
                break
        if attempt < tries - 1:
            time.sleep(min(0.1 * (attempt + 1), 0.25))
    if find_mount(mountpoint) is None:
        return None
    if lazy:
        do(mountpoint, True)
        return None
    if error is not None and error.code != ExitCode.MOUNTPOINT:
        raise error
    return "still mounted" if error is None else str(error).rsplit(": ", 1)[-1].rstrip(".")


def check_may_unmount(info: MountInfo) -> None:
    """Only the user who mounted (the kernel's user_id of the FUSE mount) and root may."""
    owner = info.owner_uid
    if os.geteuid() != 0 and owner is not None and owner != os.geteuid():
        raise QuotafsError(f"not allowed to unmount {info.mountpoint}: only the user who "
                           f"mounted it (uid {owner}) and root may", ExitCode.PERMISSION)


def reap(process: subprocess.Popen[Any], timeout: float) -> int:
    """Wait for `process` to exit, SIGKILL it after `timeout` seconds; its exit status."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


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
    """Run ("get", name) / ("set", name, value) / ("stat",) / ("statvfs",) on the mount
    within PROBE_TIMEOUT (NoAnswer otherwise), in order, from one thread; results are bytes
    or the OSError. A single op's OSError is raised rather than returned."""
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


def get_control(mountpoint: str, name: bytes) -> bytes:
    """getxattr a control name, within PROBE_TIMEOUT; OSError as control_error says."""
    try:
        [value] = probe(mountpoint, [("get", name)])
    except OSError as exc:
        raise control_error(mountpoint, exc) from None
    assert isinstance(value, bytes)
    return value


def control_error(mountpoint: str, exc: OSError) -> QuotafsError:
    if exc.errno == errno.ENOTCONN:
        return QuotafsError(f"the quotafs daemon of {mountpoint} is gone: run "
                            f"'quotafs umount {mountpoint}'", ExitCode.NOT_QUOTAFS)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return QuotafsError(f"not allowed to change {mountpoint} or read its events and "
                            "rules: only the user who mounted it and root may",
                            ExitCode.PERMISSION)
    return QuotafsError(f"{mountpoint}: {exc.strerror}", ExitCode.FAILURE)


def require_quotafs(path: str) -> str:
    mountpoint = resolve(path)
    info = find_mount(mountpoint)
    if info is None or not info.is_quotafs:
        raise QuotafsError(f"{path} is not a quotafs mount", ExitCode.NOT_QUOTAFS)
    return mountpoint


def read_status(path: str) -> dict[str, Any]:
    mountpoint = require_quotafs(path)
    status: dict[str, Any] = json.loads(get_control(mountpoint, STATUS))
    return status


def request(mountpoint: str, name: bytes, payload: dict[str, Any]) -> dict[str, Any]:
    """setxattr a control request, then read this process's result (id or error): the
    daemon validates, and its one-line refusal is raised as a usage error."""
    path = require_quotafs(mountpoint)
    # One probe for both: the daemon keeps the result for the caller's pid.
    done, answer = probe(path, [("set", name, json.dumps(payload).encode()), ("get", RESULT)])
    result: dict[str, Any] = {} if isinstance(answer, OSError) else json.loads(answer or b"{}")
    if isinstance(done, OSError):
        if result.get("error"):
            raise QuotafsError(str(result["error"]), ExitCode.USAGE)
        raise control_error(path, done)
    return result


def set_limits(path: str, **changes: int | str | None) -> None:
    request(path, SET, changes)  # "5%" is of the daemon's limit: it resolves it


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
