"""quotafs.compare.program: real programs run in a directory, under a timeout, in a session
of their own; how they ended; nothing they started survives a timeout or an interrupt."""

from __future__ import annotations

import os
import pwd
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotafs.compare.program import check_reachable, run_argv, run_shell
from quotafs.errors import ExitCode, QuotafsError
from quotafs.reference.base import Launch
from tests.conftest import MountFactory, needs_root

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def gone(pid: int, within: float = 5.0) -> bool:
    """The process has ended (reaped, or a zombie waiting for its new parent to reap it)."""
    deadline = time.monotonic() + within
    while True:  # looked at once at least, however short `within` is
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.fixture
def survivors() -> Iterator[list[int]]:
    """pids a test expects dead; any still alive at the end is killed (and fails it)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid, within=0):
            os.kill(pid, signal.SIGKILL)


def test_exit_code_cwd_env_and_tails(tmp_path: Path) -> None:
    out = run_shell('pwd; echo "$X"; echo oops >&2; exit 3', str(tmp_path),
                    {**ENV, "X": "seen"}, timeout=30)
    assert (out.exit_code, out.signal, out.timed_out) == (3, None, False)
    assert out.stdout_tail.splitlines() == [str(tmp_path), "seen"]
    assert out.stderr_tail == "oops"
    assert out.ended() == "exit 3" and not out.ok


def test_a_signal_is_reported_by_name(tmp_path: Path) -> None:
    out = run_argv([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), "
                    "signal.SIGBUS)"], str(tmp_path), ENV, timeout=30)
    assert (out.exit_code, out.signal, out.timed_out) == (None, "SIGBUS", False)
    assert out.ended() == "killed by SIGBUS"


def test_only_the_tail_is_kept(tmp_path: Path) -> None:
    out = run_argv([sys.executable, "-c", "print('x' * 100000 + 'END')"], str(tmp_path),
                   ENV, timeout=30)
    assert out.stdout_tail.endswith("END") and len(out.stdout_tail) <= 2048


def test_a_hung_program_is_killed_with_its_children(tmp_path: Path,
                                                     survivors: list[int]) -> None:
    start = time.monotonic()
    out = run_shell("sleep 600 & echo $! > child; wait", str(tmp_path), ENV, timeout=1)
    assert time.monotonic() - start < 30
    assert (out.exit_code, out.signal, out.timed_out) == (None, None, True)
    assert out.ended().startswith("hung")
    child = int((tmp_path / "child").read_text())
    survivors.append(child)
    assert gone(child), "the program's background child survived the timeout"


def test_leftovers_in_its_group_are_killed_after_it_exits(tmp_path: Path,
                                                          survivors: list[int]) -> None:
    """A daemonised child left behind would hold the target's mount busy."""
    out = run_shell("sleep 600 >/dev/null 2>&1 & echo $! > child; exit 0", str(tmp_path),
                    ENV, timeout=30)
    assert out.exit_code == 0
    child = int((tmp_path / "child").read_text())
    survivors.append(child)
    assert gone(child)


def test_ctrl_c_kills_the_program_and_propagates(tmp_path: Path,
                                                 survivors: list[int]) -> None:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_shell("sleep 600 & echo $! > child; wait", str(tmp_path), ENV, timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    child = int((tmp_path / "child").read_text())
    survivors.append(child)
    assert gone(child)


def test_a_program_that_cannot_start_is_one_usage_error(tmp_path: Path) -> None:
    with pytest.raises(QuotafsError) as caught:
        run_argv([str(tmp_path / "missing")], str(tmp_path), ENV, timeout=30)
    assert caught.value.code == ExitCode.USAGE
    assert str(caught.value) == f"cannot run {tmp_path / 'missing'}: No such file or directory"


@needs_root
def test_as_another_user(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    out = run_shell("id -u; id -g; echo $HOME; touch mine; stat -c %u mine", str(tmp_path),
                    ENV, timeout=30, launch=Launch(user="nobody"))
    assert out.exit_code == 0, out.stderr_tail
    uid, gid, home, owner = out.stdout_tail.splitlines()
    nobody = pwd.getpwnam("nobody")
    assert (uid, gid, owner) == (str(nobody.pw_uid), str(nobody.pw_gid), str(nobody.pw_uid))
    assert home != "/root"


@needs_root
def test_a_user_who_cannot_reach_the_workdir_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(QuotafsError) as caught:
        check_reachable("nobody", str(locked))
    assert caught.value.code == ExitCode.USAGE and "cannot enter" in str(caught.value)
    with pytest.raises(QuotafsError, match="no such user"):
        check_reachable("no-such-user-here", str(tmp_path))


def test_a_stopped_program_returns_only_once_its_group_is_gone(
        tmp_path: Path, mount_factory: MountFactory, survivors: list[int]) -> None:
    # A crash sweep revives the device right after run_argv: a member of the program's
    # group still waiting in a request (here a delayed open) must have been answered and
    # gone by then, or what it does next could land after the revive.
    m = mount_factory("1M")
    with open(f"{m.path}/slow", "w"):
        pass
    m.add_fault("open", path="/slow", delay="2s")
    child = tmp_path / "child"
    out = run_argv(["/bin/sh", "-c", f"cat slow >/dev/null & echo $! > {child}; wait"],
                   m.path, ENV, timeout=60,
                   stop=lambda: any(e.kind == "fault" for e in m.events()))
    assert out.stopped
    pid = int(child.read_text())
    survivors.append(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("Z", "gone"), "a member of the stopped group was still running"
