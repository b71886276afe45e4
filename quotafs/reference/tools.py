"""The admin tools the references run (losetup, mkfs.ext4, dumpe2fs, mount, umount):
found also where PATH lacks the sbin directories, run with a timeout and with signals held
while they start, and their failures told in one line."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import signals_deferred

TOOL_TIMEOUT = 60.0  # seconds for one losetup / mkfs / mount / umount
PACKAGES = {"losetup": "util-linux", "mkfs.ext4": "e2fsprogs", "dumpe2fs": "e2fsprogs",
            "mount": "mount", "umount": "mount", "unshare": "util-linux",
            "nsenter": "util-linux", "setpriv": "util-linux"}
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # not in every PATH, even for root


def find_tool(tool: str, needed_for: str = "", code: ExitCode = ExitCode.LOOP) -> str:
    """The path of an admin tool, also where PATH lacks the sbin directories; QuotafsError
    naming its package otherwise."""
    where = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if where is None:
        raise QuotafsError(f"{needed_for}{tool} not found: install {PACKAGES.get(tool, 'it')}",
                           code)
    return where


def run_tool(cmd: list[str],
             timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc: subprocess.Popen[str] | None = None
    try:
        # Signals held while starting the tool: one landing between fork and the assignment
        # would leave a tool running unseen, finishing its attach or mount after teardown.
        with signals_deferred():
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        if proc is not None:
            # Cut short (timeout, Ctrl-C, SIGTERM made an exception): it may still be in its
            # syscall. Reap it, so teardown sees whatever it did.
            proc.kill()
            with signals_deferred():
                proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise QuotafsError(f"{shlex.join(cmd)} hung for {timeout:g}s",
                               ExitCode.LOOP) from exc
        raise
    finally:
        if proc is not None:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"
