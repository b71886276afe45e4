"""Mount lifecycle, issue 10 item 5: overlapping paths, symlinks, '' arguments, records,
the state directory, sick mounts (a stopped daemon), unreadable backing entries, and who
may unmount. Every case through the real command on a real mount."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotafs import statedir
from quotafs.client import lifecycle
from quotafs.client.api import QuotaMount
from quotafs.errors import ExitCode, QuotafsError
from quotafs.mountinfo import find_mount
from tests.conftest import MountFactory, fuse_unusable_reason

pytestmark = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")

NOBODY = 65534
# setpriv, as tests/mounts/test_lifecycle.py does (Popen(user=...) cannot exec this venv's python).
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def quotafs(*args: str, timeout: float = 60, cwd: str | None = None,
            env: dict[str, str] | None = None,
            nobody: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(AS_NOBODY if nobody else []), sys.executable, "-m", "quotafs",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert words in lines[0], lines[0]


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Paths that may end up mounted: whatever is mounted there at the end is detached."""
    paths: list[str] = []
    yield paths
    for path in reversed(paths):
        real = os.path.realpath(path)
        if find_mount(real) is not None:
            subprocess.run(["umount", "-l", real], capture_output=True, timeout=30)


def _pid(mnt: str) -> int:
    result = quotafs("status", "--json", mnt)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["pid"])


def _wait_gone(pid: int) -> None:
    assert lifecycle.wait_for_exit(pid, 20), f"daemon {pid} still running"


# -- overlapping paths ----------------------------------------------------------------------

def test_mount_point_inside_backing_is_refused(tmp_path: Path, cleanup: list[str]) -> None:
    backing = tmp_path / "b"
    inner = backing / "sub" / "mnt"
    inner.mkdir(parents=True)
    (tmp_path / "link").symlink_to(inner)
    cleanup += [str(inner)]
    for mountpoint in (str(inner), str(tmp_path / "link")):
        result = quotafs("mount", "--backing", str(backing), mountpoint)
        assert_one_line(result, ExitCode.MOUNTPOINT, "inside the backing directory")
        assert find_mount(str(inner)) is None
    fg = quotafs("mount", "--fg", "--backing", str(backing), str(inner))
    assert_one_line(fg, ExitCode.MOUNTPOINT, "inside the backing directory")
    assert find_mount(str(inner)) is None


def test_backing_at_or_below_the_mount_point_still_serves(tmp_path: Path,
                                                           cleanup: list[str]) -> None:
    """The overlaps that do not deadlock (measured) stay allowed."""
    outer = tmp_path / "m"
    (outer / "data").mkdir(parents=True)
    cleanup += [str(outer)]
    for backing in (outer, outer / "data"):
        assert quotafs("mount", "--backing", str(backing), str(outer)).returncode == 0
        (outer / "f").write_bytes(b"x" * 5000)
        assert sorted(os.listdir(outer)) == (["data", "f"] if backing == outer else ["f"])
        assert quotafs("umount", str(outer)).returncode == 0
        assert (backing / "f").read_bytes() == b"x" * 5000
        (backing / "f").unlink()


# -- symlinks and empty paths ---------------------------------------------------------------

def test_symlink_mount_point_names_its_target_everywhere(tmp_path: Path,
                                                         cleanup: list[str]) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to("real")
    cleanup += [str(target)]
    started = time.monotonic()
    result = quotafs("mount", "--limit", "1M", str(link), timeout=30)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    assert find_mount(str(target)) is not None
    assert json.loads(quotafs("status", "--json", str(link)).stdout)["mountpoint"] == str(target)
    assert quotafs("set", str(link), "--limit", "2M").returncode == 0
    assert quotafs("fault", "add", str(link), "--op", "fsync", "--errno", "EIO").returncode == 0
    assert quotafs("events", str(link)).returncode == 0
    pid = _pid(str(link))
    result = quotafs("umount", str(link))
    assert result.returncode == 0, result.stderr
    assert find_mount(str(target)) is None
    _wait_gone(pid)


def test_empty_paths_are_refused(tmp_path: Path, cleanup: list[str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cleanup += [str(cwd), str(mnt)]
    assert_one_line(quotafs("mount", "", cwd=str(cwd)), ExitCode.USAGE, "empty path")
    assert_one_line(quotafs("mount", "--backing", "", str(mnt), cwd=str(cwd)),
                    ExitCode.USAGE, "empty path")
    for command in ("umount", "status"):
        assert_one_line(quotafs(command, "", cwd=str(cwd)), ExitCode.USAGE, "empty path")
    assert find_mount(str(cwd)) is None and find_mount(str(mnt)) is None


# -- records --------------------------------------------------------------------------------

def test_records_of_similar_paths_do_not_collide(tmp_path: Path, cleanup: list[str]) -> None:
    first, second = tmp_path / "a_b", tmp_path / "a" / "b"
    backings = {first: tmp_path / "back1", second: tmp_path / "back2"}
    for mnt, backing in backings.items():
        mnt.mkdir(parents=True)
        backing.mkdir()
        cleanup.append(str(mnt))
        assert quotafs("mount", "--backing", str(backing), str(mnt)).returncode == 0
    pid = _pid(str(first))
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    result = quotafs("umount", str(first))
    assert result.returncode == 0, result.stderr
    assert f"backing directory is kept at {backings[first]}" in result.stderr
    assert quotafs("umount", str(second)).returncode == 0


def test_sigterm_leaves_no_record(tmp_path: Path, cleanup: list[str]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cleanup.append(str(mnt))
    assert quotafs("mount", "--limit", "1M", str(mnt)).returncode == 0
    assert os.path.exists(statedir.record_path(str(mnt)))
    pid = _pid(str(mnt))
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    assert find_mount(str(mnt)) is None
    assert not os.path.exists(statedir.record_path(str(mnt)))


# -- the state directory of a user other than root ------------------------------------------

def _as_nobody(tmpdir: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` as uid 65534 with no HOME/XDG_RUNTIME_DIR and TMPDIR=tmpdir, so that the
    state directory is tmpdir/quotafs-65534 (tempfile.gettempdir() follows TMPDIR)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_RUNTIME_DIR")}
    env["TMPDIR"] = tmpdir
    script = ("import sys\nfrom quotafs import statedir\nfrom quotafs.errors import "
              "QuotafsError\ntry:\n" + "".join(f"    {line}\n" for line in code.splitlines())
              + "except QuotafsError as exc:\n    print(exc, file=sys.stderr)\n"
              "    sys.exit(int(exc.code))\n")
    return subprocess.run([*AS_NOBODY, sys.executable, "-c", script], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.fixture
def shared_tmp() -> Iterator[str]:
    """A directory like /tmp (1777) that uid 65534 can reach."""
    top = tempfile.mkdtemp(prefix="quotafs-shared-")
    os.chmod(top, 0o1777)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")
def test_state_dir_of_another_user_is_made_private(shared_tmp: str) -> None:
    result = _as_nobody(shared_tmp, "print(statedir.state_dir())\n"
                                    "statedir.write_record('/m', {'pid': 1})\n"
                                    "print(statedir.read_record('/m'))")
    assert result.returncode == 0, result.stderr
    base = os.path.join(shared_tmp, f"quotafs-{NOBODY}")
    assert result.stdout.splitlines() == [base, "{'pid': 1}"]
    st = os.lstat(base)
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")
@pytest.mark.parametrize("planted", ["symlink", "foreign", "open", "file"])
def test_state_dir_planted_by_someone_else_is_refused(shared_tmp: str, planted: str) -> None:
    base = os.path.join(shared_tmp, f"quotafs-{NOBODY}")
    victim = os.path.join(shared_tmp, "victim")
    os.mkdir(victim, 0o777)
    os.chmod(victim, 0o777)
    if planted == "symlink":
        os.symlink(victim, base)
    elif planted == "foreign":
        os.mkdir(base, 0o777)
        os.chmod(base, 0o777)  # root's, yet writable: the records would be root's to swap
    elif planted == "open":
        os.mkdir(base)
        os.chmod(base, 0o755)
        os.chown(base, NOBODY, NOBODY)
    else:
        Path(base).write_text("")
    result = _as_nobody(shared_tmp, "statedir.state_dir()")
    assert_one_line(result, ExitCode.PERMISSION, "refusing the state directory")
    assert os.listdir(victim) == []
    if planted != "file":
        assert os.listdir(base) == []


# -- a sick mount: its daemon stopped --------------------------------------------------------

def _d_state_children(pid: int) -> list[int]:
    """Our own probe processes stuck in D state (there must be none)."""
    stuck = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "D" and int(fields[1]) == pid:
                stuck.append(int(entry))
    return stuck


def test_commands_on_a_stopped_daemon_return_with_an_error(tmp_path: Path,
                                                           cleanup: list[str]) -> None:
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    # --no-cache: the kernel asks the daemon for every attribute, nothing is answered from
    # its caches while the daemon is stopped.
    assert quotafs("mount", "--no-cache", "--limit", "1M", mnt).returncode == 0
    pid = _pid(mnt)
    env = {**os.environ, "QUOTAFS_PROBE_TIMEOUT": "2"}
    os.kill(pid, signal.SIGSTOP)
    try:
        for args in (["status", mnt], ["set", mnt, "--limit", "2M"], ["umount", mnt],
                     ["fault", "add", mnt, "--op", "write", "--errno", "EIO"],
                     ["fault", "list", mnt], ["events", mnt], ["mount", mnt]):
            started = time.monotonic()
            try:
                result = quotafs(*args, env=env, timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"quotafs {' '.join(args)} hung on a stopped daemon")
            assert time.monotonic() - started < 10
            assert_one_line(result, ExitCode.DAEMON, "does not answer")
            assert find_mount(mnt) is not None
        assert _d_state_children(os.getpid()) == []
    finally:
        os.kill(pid, signal.SIGCONT)
    assert json.loads(quotafs("status", "--json", mnt).stdout)["limit"] == 2**20
    assert quotafs("umount", mnt).returncode == 0
    _wait_gone(pid)


# -- an unreadable entry in the backing directory --------------------------------------------

def test_dead_mount_inside_the_backing_is_one_line(tmp_path: Path, cleanup: list[str]) -> None:
    backing = tmp_path / "b"
    dead = backing / "dead"
    dead.mkdir(parents=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cleanup += [str(dead), str(mnt)]
    assert quotafs("mount", str(dead)).returncode == 0
    pid = _pid(str(dead))
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    try:
        result = quotafs("mount", "--backing", str(backing), str(mnt))
        assert_one_line(result, ExitCode.BACKING, "dead")
        assert "Transport endpoint is not connected" in result.stderr
        assert find_mount(str(mnt)) is None
        log = Path(statedir.log_path(str(mnt)))
        assert not log.exists() or "Traceback" not in log.read_text()
    finally:
        record = statedir.read_record(str(dead))
        assert quotafs("umount", str(dead)).returncode == 0
        if record is not None and record.get("private_backing"):
            # umount keeps a dead daemon's backing directory for its owner: the test's own.
            shutil.rmtree(record["backing"], ignore_errors=True)


# -- who may unmount --------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")
def test_non_owner_umount_exits_permission(shared_tmp: str, cleanup: list[str]) -> None:
    mnt = os.path.join(shared_tmp, "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    assert quotafs("mount", "--limit", "1M", mnt).returncode == 0
    env = {**os.environ, "TMPDIR": shared_tmp}
    env.pop("XDG_RUNTIME_DIR", None)
    result = quotafs("umount", mnt, env=env, nobody=True)
    assert_one_line(result, ExitCode.PERMISSION, "not allowed to unmount")
    assert find_mount(mnt) is not None
    assert quotafs("umount", mnt).returncode == 0


def test_api_controls_of_a_stopped_daemon_give_up_in_time(
        mount_factory: MountFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API probes from a worker thread: the caller gets NoAnswer in time."""
    m = mount_factory("1M", no_cache=True)
    monkeypatch.setenv("QUOTAFS_PROBE_TIMEOUT", "1")
    os.kill(m.pid, signal.SIGSTOP)
    # Should a call hang anyway, the daemon is resumed, so the test ends (failing).
    resume = threading.Timer(20, os.kill, (m.pid, signal.SIGCONT))
    resume.start()
    try:
        for call in (m.status, lambda: m.set_limit("2M"), m.events, m.faults):
            started = time.monotonic()
            with pytest.raises(QuotafsError, match="does not answer"):
                call()
            assert time.monotonic() - started < 5
    finally:
        resume.cancel()
        os.kill(m.pid, signal.SIGCONT)
    assert m.usage()["used"] == 0  # serving again (the set that gave up may land late)


def test_sigterm_as_soon_as_the_mount_is_ready_still_unmounts() -> None:
    # The daemon says "ready" once mounted, before its loop listens for signals; a SIGTERM
    # in between (a starter interrupted, the parent's death) used to kill it by the default
    # action and leave a dead mount (ENOTCONN, EBUSY to rmdir): 10 of 15 tries here.
    for _ in range(5):
        m = QuotaMount.start("1M")
        try:
            os.kill(m.pid, signal.SIGTERM)
            assert m.wait(10) == 0
            assert find_mount(m.path) is None, f"{m.path} left mounted after SIGTERM"
        finally:
            if find_mount(m.path) is not None:
                lifecycle.unmount(m.path, lazy=True)
            m.close()
        assert not os.path.exists(m.path)
