"""Running a user's program (and its --setup and --check commands) on a target: in a
directory, with an environment, as a user, under a timeout; and how it ended.

Shared by `quotafs compare -- CMD` and `quotafs sweep`. The program runs in a session of
its own, so that a timeout, Ctrl-C or SIGTERM of quotafs kills it and everything it
started (the whole process group) before the target is unmounted under it. Its stdout and
stderr go to files, never to pipes we might not read; the report keeps their tails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from quotafs.errors import ExitCode, QuotafsError
from quotafs.reference.base import AS_CALLER, Launch
from quotafs.users import passwd_entry

TAIL_BYTES = 2048  # of stdout and stderr, kept for the report
DEFAULT_TIMEOUT = 300.0  # seconds a program (or its setup, or its check) may run
DEFAULT_TARGETS = ("reference", "quotafs", "quotafs-sigbus")  # where compare -- CMD runs it
# Mount options a quotafs target may not take: its room is the reference's, its mmap mode
# is the target's, its backing directory is fresh, allow_other follows --as-user.
NOT_FOR_TARGETS = {
    "limit": "the limit of the quotafs targets is the reference's room: use compare's "
             "--limit (the free space of all targets)",
    "like_ext4": "the quotafs targets get the reference's room: use --limit",
    "mmap_sigbus": "the target chooses the mmap mode: --targets quotafs,quotafs-sigbus",
    "backing": "every target starts from a fresh empty directory: use --setup",
    "keep_backing": "every target starts from a fresh empty directory",
    "allow_other": "the quotafs targets allow others exactly when --as-user is given",
}


@dataclass(frozen=True)
class Outcome:
    """How one program run ended."""

    exit_code: int | None  # None when killed by a signal (or hung)
    signal: str | None  # e.g. "SIGBUS"; None when it exited (or hung)
    timed_out: bool  # hung: killed by us after the timeout
    wall_s: float
    stdout_tail: str = ""
    stderr_tail: str = ""
    stopped: bool = False  # killed (SIGKILL) because run_argv's `stop` said so

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def ended(self) -> str:
        """One line: "exit 0", "exit 1", "killed by SIGBUS", "hung (killed after 30s)"."""
        if self.timed_out:
            return f"hung (killed after {self.wall_s:.0f}s)"
        if self.signal is not None:
            return f"killed by {self.signal}"
        return f"exit {self.exit_code}"

    def key(self) -> tuple[int | None, str | None, bool]:
        """What two runs must share to have ended the same way."""
        return (self.exit_code, self.signal, self.timed_out)


@dataclass(frozen=True)
class Program:
    """A command to run on each target: argv, plus the optional shell commands run before
    it (setup) and after it (check), in the same directory."""

    argv: tuple[str, ...]
    setup: str | None = None
    check: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    extra_env: Mapping[str, str] = field(default_factory=dict)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _user_env(env: dict[str, str], user: str | None) -> dict[str, str]:
    if user is None:
        return env
    entry = passwd_entry(user)
    return {**env, "HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}


def _tail(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - TAIL_BYTES))
    return f.read().decode(errors="replace").strip()


def _start(argv: list[str], cwd: str, env: dict[str, str], out: IO[bytes],
           err: IO[bytes], user: str | None) -> subprocess.Popen[bytes]:
    """Start argv in a session of its own; as root with `user`, Popen sets that user's
    uid, gid and groups in the child before exec."""
    entry = passwd_entry(user) if user is not None else None
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        start_new_session=True,
        user=entry.pw_uid if entry else None, group=entry.pw_gid if entry else None,
        extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid) if entry else None)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the program's whole session (it leads its process group), by its pid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


CANCEL_POLL_S = 0.1  # how soon a run in a worker thread sees its `cancel` event
STOP_POLL_S = 0.01  # how often `stop` is asked (a crash sweep's cut: power is gone)
GROUP_GONE_S = 5.0  # how long a killed group may take to go (its requests answered)


def _wait_group_gone(pgid: int, timeout: float = GROUP_GONE_S) -> None:
    """Wait (at most `timeout`) until no live process is left in the killed group: a
    member stuck in a request ends only once it is answered, so afterwards nothing of
    the program can still reach the mount (a crash sweep revives it next). Zombies do
    not count: they make no requests."""
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(STOP_POLL_S)


def _group_alive(pgid: int) -> bool:
    """Is some process of group `pgid` alive (not a zombie)? (/proc: pgrp is the 5th
    field of stat, after the parenthesised name.)"""
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


class _Stop(Exception):
    """`stop` said the program must be killed now."""


def _wait(proc: subprocess.Popen[bytes], timeout: float,
          cancel: threading.Event | None, stop: Callable[[], bool] | None = None) -> int:
    """proc.wait(timeout), and KeyboardInterrupt as soon as `cancel` is set: signals reach
    the main thread only, so a sweep's worker threads are told this way; _Stop as soon
    as `stop()` is true."""
    if cancel is None and stop is None:
        return proc.wait(timeout=timeout)
    poll = STOP_POLL_S if stop is not None else CANCEL_POLL_S
    deadline = time.monotonic() + timeout
    while True:
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt("cancelled")
        if stop is not None and stop():
            raise _Stop
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        try:
            return proc.wait(timeout=min(left, poll))
        except subprocess.TimeoutExpired:
            continue


def run_argv(argv: Sequence[str], cwd: str, env: Mapping[str, str], timeout: float,
             launch: Launch = AS_CALLER, cancel: threading.Event | None = None,
             stop: Callable[[], bool] | None = None) -> Outcome:
    """Run argv in `cwd` until it ends or `timeout` seconds pass (then it is killed, with
    everything in its process group, and reported as hung). Ctrl-C or SIGTERM raised here
    while it runs kill it the same way before they propagate; so does setting `cancel`
    (from another thread), which raises KeyboardInterrupt here. `stop`, asked every
    STOP_POLL_S while it runs, kills it the same way when true (Outcome.stopped); with
    `stop`, run_argv returns only once no process of the group is left (GROUP_GONE_S)."""
    full_env = _user_env(dict(env), launch.user)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        try:
            proc = _start([*launch.prefix, *argv], cwd, full_env, out, err, launch.user)
        except OSError as exc:
            raise QuotafsError(f"cannot run {argv[0]}: {exc.strerror}", ExitCode.USAGE) \
                from None
        timed_out = stopped = False
        try:
            try:
                returncode = _wait(proc, timeout, cancel, stop)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                returncode = proc.wait()
            except _Stop:
                stopped = True
                _kill_group(proc)
                returncode = proc.wait()
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        finally:
            _kill_group(proc)  # whatever it left running in its group would hold the mount
            if stop is not None:  # a crash sweep: all of it gone before the revive
                _wait_group_gone(proc.pid)
        wall = time.monotonic() - start
        return Outcome(
            exit_code=None if timed_out or returncode < 0 else returncode,
            signal=signal_name(-returncode) if returncode < 0 and not timed_out else None,
            timed_out=timed_out, wall_s=round(wall, 3),
            stdout_tail=_tail(out), stderr_tail=_tail(err), stopped=stopped)


def run_shell(command: str, cwd: str, env: Mapping[str, str], timeout: float,
              launch: Launch = AS_CALLER, cancel: threading.Event | None = None) -> Outcome:
    """A --setup or --check command: one shell command line (`sh -c`)."""
    return run_argv(["/bin/sh", "-c", command], cwd, env, timeout, launch, cancel)


def check_reachable(user: str, workdir: str) -> None:
    """`user` must be able to walk down to the mount points in `workdir`: an unknown user or
    one locked out is a usage error before anything is built."""
    entry = passwd_entry(user)
    groups = {entry.pw_gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}
    path = os.path.realpath(workdir)
    while True:
        try:
            mode = os.stat(path)
        except OSError:
            return  # a missing workdir is reported where it is used
        bit = (stat.S_IXUSR if mode.st_uid == entry.pw_uid else
               stat.S_IXGRP if mode.st_gid in groups else stat.S_IXOTH)
        if entry.pw_uid != 0 and not mode.st_mode & bit:
            raise QuotafsError(f"--as-user {user}: {user} cannot enter {path}, so it could "
                               "not reach the mounts: choose another --workdir",
                               ExitCode.USAGE)
        if path == "/":
            return
        path = os.path.dirname(path)
