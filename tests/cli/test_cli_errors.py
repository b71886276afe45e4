"""Bad input: one line on stderr, a documented exit code, no traceback, nothing mounted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quotafs.client import lifecycle
from quotafs.errors import ExitCode
from quotafs.mountinfo import find_mount
from tests.conftest import MountFactory, fuse_unusable_reason


def quotafs(*args: str, pre: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(pre or []), sys.executable, "-m", "quotafs", *args],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int,
                          words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("size", ["12X", "abc", "-5M", "1.2.3", "0.5K1", "0.1K"])
def test_bad_size(tmp_path: Path, size: str) -> None:
    result = quotafs("mount", f"--limit={size}", str(tmp_path))
    assert_one_line_error(result, ExitCode.USAGE, "invalid size")
    assert find_mount(str(tmp_path)) is None


def test_unknown_option(tmp_path: Path) -> None:
    assert_one_line_error(quotafs("mount", "--frobnicate", str(tmp_path)), ExitCode.USAGE,
                          "unrecognized arguments")


def test_missing_mount_point(tmp_path: Path) -> None:
    result = quotafs("mount", "--limit", "1M", str(tmp_path / "nope"))
    assert_one_line_error(result, ExitCode.MOUNTPOINT, "does not exist")


def test_mount_point_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = quotafs("mount", "--limit", "1M", str(tmp_path / "file"))
    assert_one_line_error(result, ExitCode.MOUNTPOINT, "not a directory")


def test_missing_backing_directory(tmp_path: Path) -> None:
    result = quotafs("mount", "--limit", "1M", "--backing", str(tmp_path / "nope"),
                     str(tmp_path))
    assert_one_line_error(result, ExitCode.BACKING, "backing directory")
    assert find_mount(str(tmp_path)) is None


@pytest.mark.skipif(fuse_unusable_reason() is not None, reason=fuse_unusable_reason() or "")
def test_already_mounted(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    result = quotafs("mount", "--limit", "1M", m.path)
    assert_one_line_error(result, ExitCode.MOUNTPOINT, "already a mount point")


def test_status_of_something_that_is_not_quotafs(tmp_path: Path) -> None:
    assert_one_line_error(quotafs("status", str(tmp_path)), ExitCode.NOT_QUOTAFS,
                          "not a quotafs mount")
    assert_one_line_error(quotafs("umount", str(tmp_path)), ExitCode.NOT_QUOTAFS,
                          "not mounted")
    assert_one_line_error(quotafs("umount", "/proc"), ExitCode.NOT_QUOTAFS,
                          "not a quotafs mount")


def test_set_needs_something_to_set(tmp_path: Path) -> None:
    assert_one_line_error(quotafs("set", str(tmp_path)), ExitCode.USAGE, "nothing to set")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to hide /dev/fuse in a mount namespace")
def test_no_dev_fuse(tmp_path: Path) -> None:
    # A private mount namespace with an empty /dev: the host's /dev/fuse is untouched.
    script = (f"mount -t tmpfs none /dev && exec {sys.executable} -m quotafs mount "
              f"--limit 1M {tmp_path}")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, ExitCode.NO_FUSE, "/dev/fuse")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_no_permission_to_mount_on_a_foreign_directory(tmp_path: Path) -> None:
    target = tmp_path / "rootonly"
    target.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    result = quotafs("mount", "--limit", "1M", str(target),
                     pre=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert_one_line_error(result, ExitCode.PERMISSION, "no permission")


@pytest.mark.skipif(fuse_unusable_reason() is not None, reason=fuse_unusable_reason() or "")
def test_busy_mount_point_at_umount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert quotafs("mount", "--limit", "1M", str(mnt)).returncode == 0
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt)  # a process inside keeps it busy
    try:
        result = quotafs("umount", str(mnt))
        assert_one_line_error(result, ExitCode.MOUNTPOINT, "busy")
        assert find_mount(str(mnt)) is not None
        lazy = quotafs("umount", "--lazy", str(mnt))
        assert lazy.returncode == 0, lazy.stderr
        assert find_mount(str(mnt)) is None
    finally:
        holder.kill()
        holder.wait()
        if find_mount(str(mnt)) is not None:
            lifecycle.unmount(str(mnt), lazy=True)
