"""What quotafs lets the kernel cache (see docs/performance.md), on real mounts: the
page cache survives a reopen unless something needs the reads to reach the daemon, and a
root mount reads ahead 1 MiB unless --mmap-sigbus or --no-cache is on."""

from __future__ import annotations

import errno
import os
import time

import pytest

from quotafs.mountinfo import find_mount
from tests.conftest import MountFactory, needs_root


def read_ahead_kb(mountpoint: str) -> int:
    info = find_mount(mountpoint)
    assert info is not None and info.device
    with open(f"/sys/class/bdi/{info.device}/read_ahead_kb") as f:
        return int(f.read())


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_read_rule_added_after_caching_still_fires_on_the_next_open(
        mount_factory: MountFactory) -> None:
    m = mount_factory("4M")
    path = os.path.join(m.path, "cached")
    with open(path, "wb") as f:
        f.write(b"x" * 65536)
    assert read_all(path) == b"x" * 65536  # every page is now in the kernel's cache
    m.add_fault("read", errno="EIO", path="/cached")
    with pytest.raises(OSError) as exc:
        read_all(path)
    assert exc.value.errno == errno.EIO
    assert read_all(os.path.join(m.backing, "cached")) == b"x" * 65536


def test_a_rule_on_another_file_leaves_this_file_readable(mount_factory: MountFactory) -> None:
    m = mount_factory("4M")
    path = os.path.join(m.path, "fine")
    with open(path, "wb") as f:
        f.write(b"y" * 8192)
    m.add_fault("read", errno="EIO", path="/other")
    assert read_all(path) == b"y" * 8192


@needs_root
@pytest.mark.parametrize(("options", "expected"), [
    ({}, 1024),
    ({"mmap_sigbus": True}, None),
    ({"no_cache": True}, None),
])
def test_read_ahead_of_a_root_mount(mount_factory: MountFactory, options: dict[str, bool],
                                    expected: int | None) -> None:
    m = mount_factory("4M", **options)
    # The daemon raises it once it has answered INIT; give it a moment.
    deadline = time.monotonic() + (5 if expected else 1)
    while read_ahead_kb(m.path) != 1024 and time.monotonic() < deadline:
        time.sleep(0.02)
    got = read_ahead_kb(m.path)
    if expected is None:
        assert got < 1024  # the kernel's default, which INIT negotiated (128 KiB)
    else:
        assert got == expected


# -- negative entries: "no such name" is cached like a name, and dropped like one ----------

MAKERS = {
    "create": lambda path, other: open(path, "x").close(),
    "mkdir": lambda path, other: os.mkdir(path),
    "symlink": lambda path, other: os.symlink("target", path),
    "mknod": lambda path, other: os.mkfifo(path),
    "link": lambda path, other: os.link(other, path),
    "rename": lambda path, other: os.rename(other, path),
}


@pytest.mark.parametrize("how", list(MAKERS))
def test_a_name_looked_up_in_vain_appears_when_made_through_the_mount(
        mount_factory: MountFactory, how: str) -> None:
    m = mount_factory("4M")
    os.mkdir(os.path.join(m.path, "d"))
    path, other = os.path.join(m.path, "d", "late"), os.path.join(m.path, "other")
    open(other, "w").close()
    for _ in range(3):  # the kernel now holds a negative entry for d/late
        assert not os.path.lexists(path)
    MAKERS[how](path, other)
    assert os.path.lexists(path)
    assert "late" in os.listdir(os.path.join(m.path, "d"))


@pytest.mark.parametrize(("options", "seen"), [({"no_cache": True}, True), ({}, False)])
def test_a_name_made_in_the_backing_shows_at_once_only_with_no_cache(
        mount_factory: MountFactory, options: dict[str, bool], seen: bool) -> None:
    """--no-cache is for backing directories that others write to: nothing is cached,
    "no such name" neither. By default the kernel keeps what quotafs told it."""
    m = mount_factory("4M", **options)
    path = os.path.join(m.path, "outside")
    assert not os.path.exists(path)
    open(os.path.join(m.backing, "outside"), "w").close()
    assert os.path.exists(path) is seen
