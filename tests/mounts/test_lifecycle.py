"""Mount lifecycle through the real command: detach, status, umount, signals, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotafs.client import lifecycle
from quotafs.mountinfo import find_mount
from tests.conftest import fuse_unusable_reason

pytestmark = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")


def quotafs(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotafs", *args], capture_output=True,
                          text=True, check=check, timeout=120)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[str]:
    """An empty mount point; anything left mounted on it is removed afterwards."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield str(path)
    if find_mount(str(path)) is not None:
        lifecycle.unmount(str(path), lazy=True)


def wait_unmounted(path: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while find_mount(path) is not None:
        assert time.monotonic() < deadline, f"{path} still mounted"
        time.sleep(0.05)


def test_mount_status_umount_roundtrip(mnt: str) -> None:
    result = quotafs("mount", "--limit", "5M", mnt)
    assert result.returncode == 0, result.stderr
    status = json.loads(quotafs("status", "--json", mnt, check=True).stdout)
    assert status["limit"] == 5 * 2**20
    assert status["used"] == 0
    assert status["private_backing"] is True
    backing = status["backing"]
    assert os.stat(backing).st_mode & 0o777 == 0o700
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 5 * 2**20
    text = quotafs("status", mnt, check=True).stdout
    assert "limit:" in text and "5.0 MiB" in text
    result = quotafs("umount", mnt)
    assert result.returncode == 0, result.stderr
    assert find_mount(mnt) is None
    assert not os.path.exists(backing)  # the private backing directory is removed
    assert lifecycle.wait_for_exit(status["pid"], 10)  # umount waited for the daemon


def test_set_changes_the_limit_live(mnt: str) -> None:
    quotafs("mount", "--limit", "1M", mnt, check=True)
    result = quotafs("set", mnt, "--limit", "3M", "--inodes", "10", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["limit"], status["inode_limit"]) == (3 * 2**20, 10)
    assert os.statvfs(mnt).f_files == 10
    quotafs("umount", mnt, check=True)


def test_keep_backing_and_existing_backing(mnt: str, tmp_path: Path) -> None:
    backing = tmp_path / "data"
    backing.mkdir()
    (backing / "old").write_bytes(b"o" * 10_000)
    quotafs("mount", "--limit", "1M", "--backing", str(backing), mnt, check=True)
    status = json.loads(quotafs("status", "--json", mnt, check=True).stdout)
    assert status["used"] == 3 * 4096
    assert status["private_backing"] is False
    Path(mnt, "new").write_bytes(b"n")
    quotafs("umount", mnt, check=True)
    assert sorted(os.listdir(backing)) == ["new", "old"]


def _daemon_pid(mnt: str) -> int:
    return int(json.loads(quotafs("status", "--json", mnt, check=True).stdout)["pid"])


def _write_fsynced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly_and_keeps_fsynced_data(mnt: str, tmp_path: Path,
                                                         sig: signal.Signals) -> None:
    backing = tmp_path / "data"
    backing.mkdir()
    quotafs("mount", "--limit", "2M", "--backing", str(backing), mnt, check=True)
    pid = _daemon_pid(mnt)
    _write_fsynced(os.path.join(mnt, "precious"), b"p" * 100_000)
    os.kill(pid, sig)
    wait_unmounted(mnt)
    assert lifecycle.wait_for_exit(pid, 20)
    assert (backing / "precious").read_bytes() == b"p" * 100_000


def test_kill_9_then_umount_recovers(mnt: str, tmp_path: Path) -> None:
    backing = tmp_path / "data"
    backing.mkdir()
    quotafs("mount", "--limit", "2M", "--backing", str(backing), mnt, check=True)
    pid = _daemon_pid(mnt)
    _write_fsynced(os.path.join(mnt, "precious"), b"k" * 300_000)
    os.kill(pid, signal.SIGKILL)
    assert lifecycle.wait_for_exit(pid, 10)
    with pytest.raises(OSError) as exc:
        os.stat(os.path.join(mnt, "precious"))
    assert exc.value.errno == 107  # ENOTCONN: Transport endpoint is not connected
    again = quotafs("mount", "--limit", "1M", mnt)
    assert again.returncode == 3 and "stale" in again.stderr
    result = quotafs("umount", mnt)
    assert result.returncode == 0, result.stderr
    assert "daemon had died" in result.stderr
    assert find_mount(mnt) is None
    assert (backing / "precious").read_bytes() == b"k" * 300_000


def test_foreground_mount_serves_until_signalled(mnt: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "quotafs", "mount", "--fg", "--limit",
                             "1M", mnt])
    try:
        deadline = time.monotonic() + 30
        while find_mount(mnt) is None:
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        Path(mnt, "f").write_bytes(b"x")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert find_mount(mnt) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
