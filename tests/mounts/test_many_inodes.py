"""More live inodes than the daemon may hold descriptors for: O_PATH descriptors of
unpinned inodes are closed least-recently-used first and opened again by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.mounts.test_lifecycle2 import cleanup, quotafs

__all__ = ["cleanup"]  # a fixture, used by name

BUDGET = 16
# Descriptors outside the budget: the daemon's own dozen (std streams, epoll, /dev/fuse,
# trio's wakeup sockets and pipe, the backing root; 12 measured), the pinned hard-linked
# file, the handles of the open unlinked file and of files still being released.
OWN_FDS = 20


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("QUOTAFS_PATH_FD_BUDGET", str(BUDGET))  # the daemon inherits it
    yield


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_tree_far_larger_than_the_descriptor_budget(small_budget: None,
                                                    mount_factory: MountFactory) -> None:
    m = mount_factory("8M")
    most, peak_known = 0, 0
    for d in range(10):
        os.makedirs(os.path.join(m.path, f"d{d}", "sub"))
        for f in range(20):
            with open(os.path.join(m.path, f"d{d}", "sub", f"f{f}"), "wb") as out:
                out.write(f"{d}/{f}".encode() * 100)
            most = max(most, open_fds(m.pid))
    # renames move names while descriptors are closed and reopened underneath
    os.rename(os.path.join(m.path, "d3"), os.path.join(m.path, "moved"))
    os.rename(os.path.join(m.path, "d4", "sub", "f0"), os.path.join(m.path, "d5", "f0-moved"))
    os.link(os.path.join(m.path, "d6", "sub", "f1"), os.path.join(m.path, "hard"))
    fd = os.open(os.path.join(m.path, "d7", "sub", "f2"), os.O_RDWR)
    os.unlink(os.path.join(m.path, "d7", "sub", "f2"))
    for _ in range(2):  # every inode, twice over, through a budget of 16 descriptors
        for d in range(10):
            top = "moved" if d == 3 else f"d{d}"
            for f in range(20):
                path = os.path.join(m.path, top, "sub", f"f{f}")
                if (d, f) in ((4, 0), (7, 2)):
                    assert not os.path.exists(path)
                    continue
                with open(path, "rb") as inp:
                    assert inp.read() == f"{d}/{f}".encode() * 100
                os.chmod(path, 0o640)
                assert os.stat(path).st_mode & 0o777 == 0o640
                most = max(most, open_fds(m.pid))
            peak_known = max(peak_known, m.status()["known_inodes"])
    with open(os.path.join(m.path, "d5", "f0-moved"), "rb") as inp:
        assert inp.read() == b"4/0" * 100
    assert os.stat(os.path.join(m.path, "hard")).st_nlink == 2
    assert os.fstat(fd).st_nlink == 0
    os.write(fd, b"still writable")
    os.close(fd)
    status = m.status()
    assert status["known_inodes"] > 16  # the kernel keeps them all looked up
    # Many times the budget were live at once, while the daemon held descriptors for no
    # more than the budget of them.
    assert peak_known > 10 * BUDGET, peak_known
    assert most <= BUDGET + OWN_FDS, most
    assert status["used"] == 10 * 2 * 4096 + 199 * 4096  # dirs, files (one unlinked)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit is not installed")
@pytest.mark.parametrize("crash_sim", [False, True])
def test_a_low_hard_descriptor_limit_serves_every_file_and_the_control_socket(
        tmp_path: Path, cleanup: list[str], crash_sim: bool) -> None:
    """A daemon started under a hard RLIMIT_NOFILE of 600 (the budget was at least 1024,
    above the limit itself) keeps its descriptors within it: 2,000 files made, written
    and looked up again all work, and the control socket answers."""
    mnt, backing = tmp_path / "mnt", tmp_path / "backing"
    mnt.mkdir()
    backing.mkdir()
    cleanup.append(str(mnt))
    flags = ["--crash-sim"] if crash_sim else []
    started = subprocess.run(["prlimit", "--nofile=600:600", sys.executable, "-m", "quotafs",
                              "mount", "--backing", str(backing), *flags, str(mnt)],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        for i in range(2000):
            with open(mnt / f"f{i}", "wb") as out:
                out.write(b"x")
        assert len([os.stat(mnt / name) for name in os.listdir(mnt)]) == 2000
        assert quotafs("status", "--json", str(mnt)).returncode == 0
    finally:
        assert quotafs("umount", str(mnt)).returncode == 0
