"""mmap past the quota on real mounts: plain FUSE semantics and the ext4-faithful mode."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from quotafs.compare.writers import bytes_on_disk, run_writer
from quotafs.model.costs import Costs, Mode, scan_backing
from tests.conftest import MountFactory

MiB = 1024 * 1024
PAGE = 4096


def test_default_mode_no_signal_msync_enospc(mount_factory: MountFactory) -> None:
    m = mount_factory("8M")
    path = os.path.join(m.path, "mapped")
    result = run_writer("mmap", path, 32 * MiB, MiB)
    assert result.signal_name is None
    assert (result.outcome, result.errno_name, result.failed_call) == ("errno", "ENOSPC",
                                                                       "msync")
    assert result.bytes_acknowledged == 32 * MiB  # every store "worked"
    assert bytes_on_disk(os.path.join(m.backing, "mapped"), MiB, 32 * MiB) <= 8 * MiB
    # The ledger holds exactly what the backing holds. Writeback sends the dirty pages in
    # requests of up to 1 MiB, and one that straddles the limit is refused whole (a short
    # count would lose its tail), so the file stops within one request of the limit: how
    # close depends on how the kernel grouped the pages (on a quiet machine, exactly at it).
    used = m.usage()["used"]
    assert scan_backing(m.backing, Costs(Mode.BLOCKS, PAGE)) == (used, 1)
    assert 7 * MiB <= used <= 8 * MiB


def test_faithful_mode_sigbus_at_the_limit(mount_factory: MountFactory) -> None:
    m = mount_factory("8M", mmap_sigbus=True)
    path = os.path.join(m.path, "mapped")
    result = run_writer("mmap", path, 32 * MiB, MiB)
    assert (result.outcome, result.signal_name) == ("signal", "SIGBUS")
    assert result.bytes_acknowledged == 8 * MiB  # 8 whole chunks fit, the 9th faults
    assert bytes_on_disk(os.path.join(m.backing, "mapped"), MiB, 8 * MiB) == 8 * MiB
    usage = m.usage()
    assert (usage["used"], usage["reserved"]) == (8 * MiB, 0)


def test_reservations_are_visible_converted_and_released(
        mount_factory: MountFactory) -> None:
    m = mount_factory("1M", mmap_sigbus=True)
    path = os.path.join(m.path, "f")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 4 * MiB)
        mm[0:10] = b"x" * 10  # a store faults page 0 in through the handle, and dirties it
        assert mm[5 * PAGE] == 0  # a load faults page 5 in: reserved, never written
        # Page 0's reservation may already be usage (writeback can come at any time, on a
        # busy machine at once); used + reserved is what both pages hold either way.
        usage = m.usage()
        held = usage["used"] + usage["reserved"]
        assert held == 2 * PAGE  # read-ahead is off in this mode: each fault its own page
        assert usage["reserved"] >= PAGE
        assert os.statvfs(m.path).f_bavail * PAGE == MiB - held
        mm.flush()  # writeback turns the written page into usage, exactly once
        usage = m.usage()
        assert usage["used"] == PAGE
        assert usage["reserved"] == PAGE
        mm.close()
    finally:
        os.close(fd)
    assert m.usage()["reserved"] == 0  # the rest is released with the handle
    assert m.usage()["used"] == PAGE


def test_truncate_releases_reservations(mount_factory: MountFactory) -> None:
    m = mount_factory("1M", mmap_sigbus=True)
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 512 * 1024)
        os.pread(fd, 512 * 1024, 0)  # a read through a writable handle reserves holes
        assert m.usage()["reserved"] == 512 * 1024
        os.ftruncate(fd, 64 * 1024)
        assert m.usage()["reserved"] == 64 * 1024
    finally:
        os.close(fd)
    assert m.usage()["reserved"] == 0


@pytest.mark.parametrize("sigbus", [False, True])
def test_reading_holes_when_full(mount_factory: MountFactory, sigbus: bool) -> None:
    """The price of the ext4-faithful mode: reading a hole through a read-write handle
    needs quota. Read-only handles, and the default mode, never do."""
    m = mount_factory("64K", mmap_sigbus=sigbus)
    path = os.path.join(m.path, "holes")
    with open(path, "wb") as f:
        f.truncate(MiB)
    with open(os.path.join(m.path, "filler"), "wb") as f:
        f.write(b"f" * 64 * 1024)
    with open(path, "rb") as f:
        assert f.read(8192) == bytes(8192)
    fd = os.open(path, os.O_RDWR)
    try:
        if sigbus:
            with pytest.raises(OSError) as exc:
                os.pread(fd, 8192, 0)
            assert exc.value.errno == errno.ENOSPC
        else:
            assert os.pread(fd, 8192, 0) == bytes(8192)
    finally:
        os.close(fd)


def test_apparent_accounting_reserves_nothing(mount_factory: MountFactory) -> None:
    """Apparent sizes charge a hole already: --mmap-sigbus has nothing to reserve there, so
    a read through a writable handle must not take the room a second time."""
    m = mount_factory("1M", mmap_sigbus=True, accounting="apparent")
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 512 * 1024)
        os.pread(fd, 512 * 1024, 0)
        assert (m.usage()["used"], m.usage()["reserved"]) == (512 * 1024, 0)
        os.pwrite(fd, b"x" * 100 * 1024, 512 * 1024)  # 512 KiB is still free
    finally:
        os.close(fd)
