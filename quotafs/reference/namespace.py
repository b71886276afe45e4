"""A holder process: a private mount namespace (and, for a user without root, a private user
namespace) kept alive by one process of ours, with a tmpfs mounted in it.

    unshare -m  sh -c 'mount -t tmpfs -o size=N tmpfs DIR && echo ready && exec sleep infinity'
    unshare -Urm ...   (the same, for a user without root: root only inside the namespace)

The namespace lives as long as a process is in it: the holder, and whatever was started in it
through nsenter. The holder dies with us even when we are SIGKILLed (PR_SET_PDEATHSIG,
set in the child between fork and exec), and teardown kills it by its pid and reaps it.
It runs in a session of its own, so that a terminal's Ctrl-C reaches us, not it: we end it
in order, after the programs that run in its namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import signals_deferred
from quotafs.reference.tools import find_tool

READY_TIMEOUT = 30.0  # seconds for unshare + mount to say "ready"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the forked child


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when the thread that forked it ends; if the parent
    died before prctl took effect, end now (it would never get the signal)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


@dataclass
class Holder:
    """The process that keeps a private mount namespace (with its tmpfs) alive."""

    proc: subprocess.Popen[bytes]
    user_namespace: bool  # True: a user namespace too (we are not root), unshare -Urm

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def enter(self) -> tuple[str, ...]:
        """argv prefix that runs a program in the holder's namespaces (as root there);
        `--wd=.` takes the caller's working directory in, opened before entering: start
        the program with its cwd on the outside path (/proc/PID/root/DIR/...)."""
        nsenter = find_tool("nsenter", "the tmpfs reference needs ")
        spaces = ("--user", "--mount", "--preserve-credentials") if self.user_namespace \
            else ("--mount",)
        return (nsenter, f"--target={self.pid}", *spaces, "--wd=.", "--")

    def stop(self) -> None:
        """Kill the holder by its pid and reap it; the namespace ends with its last
        process. Safe to call twice."""
        with signals_deferred(), contextlib.suppress(ProcessLookupError):
            if self.proc.returncode is None:
                self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def start_holder(mountpoint: str, options: str) -> Holder:
    """Start a holder with `mount -t tmpfs -o OPTIONS tmpfs MOUNTPOINT` done in its own
    mount namespace; return once the mount is there. QuotafsError if it cannot be made."""
    if threading.current_thread() is not threading.main_thread():
        # PR_SET_PDEATHSIG fires when the forking *thread* ends, not the process.
        raise QuotafsError("the tmpfs reference must be made from the main thread",
                           ExitCode.FAILURE)
    unshare = find_tool("unshare", "the tmpfs reference needs ")
    mount = find_tool("mount", "the tmpfs reference needs ")
    userns = os.geteuid() != 0
    script = (f"{shlex.quote(mount)} -t tmpfs -o {shlex.quote(options)} tmpfs "
              f"{shlex.quote(mountpoint)} && echo ready && exec sleep infinity")
    argv = [unshare, "-Urm" if userns else "-m", "/bin/sh", "-c", script]
    parent = os.getpid()
    with signals_deferred():  # no interrupt between fork and our holding its pid
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=lambda: _die_with_parent(parent))
    holder = Holder(proc, userns)
    try:
        _wait_ready(holder, argv)
    except BaseException:
        holder.stop()
        raise
    return holder


def _wait_ready(holder: Holder, argv: Sequence[str]) -> None:
    proc = holder.proc
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + READY_TIMEOUT
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
        if not ready:
            raise QuotafsError(f"{shlex.join(argv)} did not mount its tmpfs within "
                               f"{READY_TIMEOUT:g}s", ExitCode.LOOP)
        chunk = os.read(proc.stdout.fileno(), 64)
        if not chunk:
            break
        line += chunk
    proc.stdout.close()
    if line.strip() != b"ready":
        proc.wait(timeout=READY_TIMEOUT)
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        # The first line says what failed ("mount: DIR: wrong fs type, bad option...",
        # "unshare: unshare failed: Operation not permitted"); mount adds a dmesg hint.
        why = err[0].strip() if err else f"exit status {proc.returncode}"
        refused = holder.user_namespace and "not permitted" in why.lower()
        raise QuotafsError(f"cannot make a tmpfs in a private namespace: {why}"
                           + ("" if not holder.user_namespace else
                              " (are unprivileged user namespaces allowed here? "
                              "see `quotafs doctor`)"),
                           ExitCode.PERMISSION if refused else ExitCode.LOOP)
    proc.stderr.close()
