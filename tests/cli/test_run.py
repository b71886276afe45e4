"""`quotafs run`: an ephemeral mount around one command, its exit status and cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quotafs.client import lifecycle
from quotafs.mountinfo import find_mount
from tests.conftest import fuse_unusable_reason

pytestmark = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")


def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotafs", "run", *args],
                          capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def quotafs_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if " fuse.quotafs " in line]


def test_exit_status_mount_env_and_cleanup(tmp_path: Path) -> None:
    script = ("import os,errno,json\n"
              "m=os.environ['QUOTAFS_MOUNT']\n"
              "assert os.getcwd()==m, (os.getcwd(), m)\n"
              "from quotafs.client import control\n"
              "pid=control.read_status(m).pid\n"
              "fd=os.open('f', os.O_WRONLY|os.O_CREAT)\n"
              "n=0\n"
              "try:\n"
              "    while True: n+=os.write(fd, b'x'*65536)\n"
              "except OSError as e: print(m, pid, n, errno.errorcode[e.errno])\n"
              "raise SystemExit(7)\n")
    result = run("--limit", "256K", "--cd", "--", sys.executable, "-c", script)
    assert result.returncode == 7, result.stderr
    mountpoint, pid, written, err = result.stdout.split()
    assert (written, err) == (str(256 * 1024), "ENOSPC")
    assert "1 ENOSPC from the quota" in result.stderr
    assert not os.path.exists(mountpoint)  # the temporary mount point is gone
    assert find_mount(mountpoint) is None
    assert lifecycle.wait_for_exit(int(pid), timeout=10), f"daemon {pid} still runs"


def test_command_killed_by_signal_gives_128_plus_n() -> None:
    result = run("--limit", "1M", "--", "sh", "-c", "kill -KILL $$")
    assert result.returncode == 128 + signal.SIGKILL


def test_missing_command_and_unrunnable_command() -> None:
    assert run("--limit", "1M").returncode == 2
    result = run("--limit", "1M", "--", "/nonexistent/program")
    assert result.returncode == 2 and "cannot run" in result.stderr


def test_ctrl_c_reaches_the_command_first(tmp_path: Path) -> None:
    backing = tmp_path / "data"
    backing.mkdir()
    ready = tmp_path / "ready"
    script = ("import os,signal,sys,time\n"
              "def bye(*_):\n"
              "    open(os.path.join(os.environ['QUOTAFS_MOUNT'],'after-sigint'),'w')"
              ".write('saved')\n"
              "    sys.exit(5)\n"
              "signal.signal(signal.SIGINT, bye)\n"
              f"open({str(ready)!r},'w').close()\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "quotafs", "run", "--limit", "1M",
                             "--backing", str(backing), "--", sys.executable, "-c", script],
                            start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert proc.wait(timeout=60) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (backing / "after-sigint").read_text() == "saved"
    assert all(str(backing) not in line for line in quotafs_mounts())
    assert find_mount(str(backing)) is None
