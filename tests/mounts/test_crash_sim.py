"""--crash-sim and power cuts on real mounts, with the kernel's caches on (the default
mount: 60 s attribute and entry timeouts, keep_cache): what a model does not keep is gone
from the backing directory and from everything the kernel shows (read, stat, readdir,
mmap), handles from before the cut answer EIO, new opens work, and the ledger equals a
fresh scan (docs/crash.md)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time

import pytest

from quotafs import QuotaMount
from quotafs.daemon.crashsim import STASH
from quotafs.errors import ExitCode, QuotafsError
from quotafs.model.costs import Costs, Mode, scan_backing
from tests.conftest import MountFactory, backing_names


def write(path: str, data: bytes, sync: bool = False, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_books_are_a_fresh_scan(m: QuotaMount) -> None:
    status = m.status()
    costs = Costs(Mode(status.accounting), status.block_size)
    used, inodes = scan_backing(m.backing, costs)
    stash = os.path.join(m.backing, STASH.decode())
    if os.path.isdir(stash):  # the daemon's, from mount to unmount: no part of the quota
        stashed, stashed_inodes = scan_backing(stash, costs)
        used, inodes = used - stashed - costs.directory(), inodes - stashed_inodes - 1
    assert (status.used, status.inodes_used, status.reserved) == (used, inodes, 0)


@pytest.fixture
def crash_mount(mount_factory: MountFactory) -> QuotaMount:
    return mount_factory("16M", crash_sim=True)


def test_the_ext4_model_matches_the_measured_shutdown(crash_mount: QuotaMount) -> None:
    # DESIGN.md fact 11: a fsynced then appended, b never synced, c fsynced after b.
    p = crash_mount.path
    write(f"{p}/a", b"a" * 10_000, sync=True)
    write(f"{p}/a", b"A" * 5_000, mode="ab")
    write(f"{p}/b", b"b" * 300)
    write(f"{p}/c", b"c" * 100, sync=True)
    before = crash_mount.status()
    assert before.crash_sim and before.crash_journal_entries > 0
    assert before.durability_ops == 2
    report = crash_mount.crash(model="ext4")
    assert (read(f"{p}/a"), read(f"{p}/b"), read(f"{p}/c")) == (
        b"a" * 10_000, b"", b"c" * 100)
    assert {(i.path, i.kind, i.bytes) for i in report.lost} == {
        ("/a", "data", 5_000), ("/a", "size", 5_000), ("/b", "data", 300),
        ("/b", "size", 300)}
    assert (report.lost_bytes, report.lost_names, report.crashes) == (5_300, 0, 1)
    after = crash_mount.status()
    assert (after.crashes, after.crash_journal_entries, after.crash_journal_bytes) == (1, 0, 0)
    assert crash_mount.events()[-1].op == "crash"
    assert_books_are_a_fresh_scan(crash_mount)


def test_posix_keeps_only_what_was_made_durable(crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    os.mkdir(f"{p}/d")
    write(f"{p}/d/kept", b"k" * 100, sync=True)
    fsync_dir(p)
    fsync_dir(f"{p}/d")
    write(f"{p}/synced-but-unnamed", b"s" * 100, sync=True)  # its directory never synced
    write(f"{p}/d/kept", b"more", mode="ab")
    os.mkdir(f"{p}/e")
    write(f"{p}/e/x", b"x")
    report = crash_mount.crash(model="posix")
    assert sorted(os.listdir(p)) == ["d"]
    assert os.listdir(f"{p}/d") == ["kept"]
    assert read(f"{p}/d/kept") == b"k" * 100
    assert {(i.path, i.kind) for i in report.lost} >= {
        ("/synced-but-unnamed", "created"), ("/e", "created"), ("/e/x", "created"),
        ("/d/kept", "data")}
    assert backing_names(crash_mount.backing) == ["d"]  # nothing else in the backing
    assert_books_are_a_fresh_scan(crash_mount)


def test_nothing_the_kernel_cached_before_the_cut_reappears(crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    write(f"{p}/f", b"old" * 1000, sync=True)
    write(f"{p}/gone", b"g", sync=True)
    fsync_dir(p)
    write(f"{p}/f", b"NEW" * 2000)  # unsynced: data and size
    os.unlink(f"{p}/gone")  # unsynced unlink: a negative entry in the kernel
    write(f"{p}/made", b"m")  # unsynced create: a positive one
    # Everything in the kernel's caches now: pages, attributes, names.
    assert read(f"{p}/f") == b"NEW" * 2000 and os.stat(f"{p}/f").st_size == 6000
    assert not os.path.exists(f"{p}/gone") and os.path.exists(f"{p}/made")
    assert sorted(os.listdir(p)) == ["f", "made"]
    crash_mount.crash(model="posix")
    assert os.stat(f"{p}/f").st_size == 3000
    assert read(f"{p}/f") == b"old" * 1000
    assert read(f"{p}/gone") == b"g"
    assert not os.path.exists(f"{p}/made")
    assert sorted(os.listdir(p)) == ["f", "gone"]


def test_old_handles_answer_eio_until_released_and_new_opens_work(
        crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    write(f"{p}/f", b"durable", sync=True)
    fsync_dir(p)
    old = os.open(f"{p}/f", os.O_RDWR)
    old_dir = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        crash_mount.crash()
        for attempt in (lambda: os.pread(old, 10, 0), lambda: os.pwrite(old, b"x", 0),
                        lambda: os.fsync(old), lambda: os.fsync(old_dir)):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EIO
    finally:
        with pytest.raises(OSError):  # close(2) flushes first: a dead device's EIO
            os.close(old)
        os.close(old_dir)  # releasedir: fine
    new = os.open(f"{p}/f", os.O_RDWR)
    try:
        assert os.pread(new, 100, 0) == b"durable"
        os.pwrite(new, b"D", 0)
        os.fsync(new)
    finally:
        os.close(new)
    assert read(f"{crash_mount.backing}/f") == b"Durable"
    assert crash_mount.status().open_handles == 0


def test_dirty_mmap_pages_from_before_the_cut_never_reach_the_file(
        crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    write(f"{p}/m", b"." * 8192, sync=True)
    fsync_dir(p)
    fd = os.open(f"{p}/m", os.O_RDWR)
    mapping = mmap.mmap(fd, 8192)
    mapping[0:5] = b"DIRTY"  # a dirty shared page the daemon has not seen
    crash_mount.crash()
    mapping.close()  # no access after the cut: its pages are gone (SIGBUS)
    with pytest.raises(OSError):
        os.close(fd)
    os.sync()  # writeback of anything still dirty: through the dead handle, refused
    assert read(f"{p}/m") == b"." * 8192
    assert read(f"{crash_mount.backing}/m") == b"." * 8192


def test_the_books_equal_a_fresh_scan_after_a_cut(mount_factory: MountFactory) -> None:
    m = mount_factory("16M", inodes=100, crash_sim=True)
    p = m.path
    write(f"{p}/durable", b"d" * 20_000, sync=True)
    os.link(f"{p}/durable", f"{p}/durable-link")
    fsync_dir(p)
    write(f"{p}/big", b"b" * 1_000_000)  # unsynced: goes
    os.link(f"{p}/durable", f"{p}/link2")  # unsynced link: goes
    os.unlink(f"{p}/durable-link")  # unsynced unlink: comes back
    held = os.open(f"{p}/durable", os.O_RDONLY)
    os.unlink(f"{p}/durable")  # unlinked while open: comes back too
    assert m.usage().inodes_used == 2  # big, and durable (open, unlinked)
    try:
        m.crash()
    finally:
        with pytest.raises(OSError):
            os.close(held)
    assert sorted(os.listdir(p)) == ["durable", "durable-link"]
    assert os.stat(f"{p}/durable").st_nlink == 2
    assert_books_are_a_fresh_scan(m)
    usage = m.usage()
    assert (usage.used, usage.inodes_used) == (20_480, 1)
    write(f"{p}/after", b"a" * 4096)  # the quota goes on from there
    assert m.usage().used == 20_480 + 4096


def test_mmap_sigbus_reservations_go_with_the_dead_handles(
        mount_factory: MountFactory) -> None:
    m = mount_factory("16M", mmap_sigbus=True, crash_sim=True)
    p = m.path
    with open(f"{p}/sparse", "wb") as f:
        f.truncate(1 << 20)
        os.fsync(f.fileno())
    fsync_dir(p)
    fd = os.open(f"{p}/sparse", os.O_RDWR)
    try:
        os.pread(fd, 65536, 0)  # a read through a writable handle reserves its holes
        assert m.status().reserved > 0
        m.crash()
        assert m.status().reserved == 0
    finally:
        with pytest.raises(OSError):  # close(2) flushes first: EIO from the dead handle
            os.close(fd)
    assert_books_are_a_fresh_scan(m)


@pytest.mark.parametrize("model", ["posix", "ext4"])
def test_a_config_writer_that_renames_without_fsync_is_caught(
        crash_mount: QuotaMount, model: str) -> None:
    p = crash_mount.path
    write(f"{p}/config", b"version 1", sync=True)
    fsync_dir(p)
    write(f"{p}/config.tmp", b"version 2")  # no fsync before the rename
    os.rename(f"{p}/config.tmp", f"{p}/config")
    write(f"{p}/other", b"o", sync=True)  # some later fsync: ext4 commits the rename
    crash_mount.crash(model=model)
    if model == "ext4":
        assert read(f"{p}/config") == b""  # the classic zero-length file
    else:
        assert read(f"{p}/config") == b"version 1"  # the rename itself is lost
    assert not os.path.exists(f"{p}/config.tmp") or model == "posix"
    assert_books_are_a_fresh_scan(crash_mount)


@pytest.mark.parametrize("model", ["posix", "ext4"])
def test_the_fixed_config_writer_survives(crash_mount: QuotaMount, model: str) -> None:
    p = crash_mount.path
    write(f"{p}/config", b"version 1", sync=True)
    fsync_dir(p)
    write(f"{p}/config.tmp", b"version 2", sync=True)
    os.rename(f"{p}/config.tmp", f"{p}/config")
    fsync_dir(p)
    crash_mount.crash(model=model)
    assert read(f"{p}/config") == b"version 2"
    assert sorted(os.listdir(p)) == ["config"]


def test_keep_fraction_and_seed(crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    write(f"{p}/f", b"", sync=True)
    fsync_dir(p)

    def writes() -> None:
        fd = os.open(f"{p}/f", os.O_WRONLY)
        try:
            for i in range(20):  # whole pages: one request each, however the kernel splits
                os.pwrite(fd, bytes([65 + i]) * 4096, i * 4096)
        finally:
            os.close(fd)

    writes()
    first = crash_mount.crash(keep_fraction=0.5, seed=11)
    kept = read(f"{p}/f")
    writes()
    again = crash_mount.crash(keep_fraction=0.5, seed=11)
    assert read(f"{p}/f") == kept  # the same seed, the same writes: the same outcome
    assert [(i.kind, i.bytes) for i in first.lost] == [(i.kind, i.bytes) for i in again.lost]
    # What survives is a prefix of the writes in issue order.
    assert kept == b"".join(bytes([65 + i]) * 4096 for i in range(len(kept) // 4096))
    writes()
    crash_mount.crash(keep_fraction=1.0)
    assert len(read(f"{p}/f")) == 20 * 4096


def test_torn_keeps_a_sector_prefix_of_the_last_write(crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    write(f"{p}/t", b"", sync=True)
    fsync_dir(p)
    write(f"{p}/t", b"T" * 10_000)
    report = crash_mount.crash(torn=True, seed=3)
    data = read(f"{p}/t")
    assert data == b"T" * len(data) and len(data) % 512 == 0 and len(data) < 10_000
    assert [(i.kind, i.bytes) for i in report.lost if i.kind == "torn"] == [
        ("torn", len(data))]


def test_concurrent_writers_leave_what_they_last_synced(crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    names = [f"{p}/w{i}" for i in range(4)]
    for name in names:
        write(name, b"0" * 4096, sync=True)
    fsync_dir(p)
    synced: dict[str, list[int]] = {name: [0] for name in names}
    stop = threading.Event()

    def writer(name: str) -> None:
        fd = os.open(name, os.O_RDWR)
        try:
            for n in range(1, 10_000):
                os.pwrite(fd, str(n % 10).encode() * 4096, 0)
                if n % 3 == 0:
                    os.fsync(fd)
                    synced[name].append(n)
                if stop.is_set():
                    return
        except OSError as exc:
            assert exc.errno == errno.EIO  # the cut
        finally:
            with contextlib.suppress(OSError):  # EIO once the cut came
                os.close(fd)

    threads = [threading.Thread(target=writer, args=(name,)) for name in names]
    for t in threads:
        t.start()
    time.sleep(0.3)
    crash_mount.crash()
    stop.set()
    for t in threads:
        t.join(30)
    for name in names:
        content = read(name)
        last = synced[name][-1]
        # The last fsync it saw return, or one that returned as the cut came.
        allowed = {str(n % 10).encode() * 4096 for n in (last, last + 3)}
        assert content in allowed
    assert_books_are_a_fresh_scan(crash_mount)


def test_the_stash_is_never_seen(crash_mount: QuotaMount) -> None:
    p = crash_mount.path
    write(f"{p}/f", b"f" * 8192, sync=True)
    fsync_dir(p)
    used = crash_mount.usage().used
    os.unlink(f"{p}/f")
    assert os.listdir(p) == []
    assert not os.path.exists(f"{p}/.quotafs-crash-stash")
    assert crash_mount.usage().used == used - 8192
    fsync_dir(p)  # the unlink is durable: the inode is gone for real
    assert backing_names(crash_mount.backing) == []
    crash_mount.crash()
    assert os.listdir(p) == []


def test_a_removed_open_file_cannot_be_linked_back(crash_mount: QuotaMount) -> None:
    """The stash keeps the removed inode's one name for a cut; the kernel must still see
    no link, or linkat of the open descriptor would give it a name again (ext4: ENOENT)."""
    p = crash_mount.path
    write(f"{p}/f", b"f" * 8192, sync=True)
    fsync_dir(p)
    fd = os.open(f"{p}/f", os.O_RDWR)
    root = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # linkat(AT_FDCWD, "/proc/self/fd/N", root, "again", AT_SYMLINK_FOLLOW): works
        # while the file has a name...
        os.link(f"/proc/self/fd/{fd}", "again", dst_dir_fd=root, follow_symlinks=True)
        os.unlink(f"{p}/again")
        os.unlink(f"{p}/f")
        assert os.fstat(fd).st_nlink == 0
        with pytest.raises(FileNotFoundError):  # ...and not once it has none
            os.link(f"/proc/self/fd/{fd}", "back", dst_dir_fd=root, follow_symlinks=True)
        assert os.listdir(p) == []
        os.pwrite(fd, b"g" * 4096, 8192)  # still a file to its opener
    finally:
        os.close(root)
        os.close(fd)
    fsync_dir(p)
    assert backing_names(crash_mount.backing) == []
    assert_books_are_a_fresh_scan(crash_mount)


def test_a_mount_without_crash_sim_refuses_a_cut(qmount: QuotaMount) -> None:
    with pytest.raises(QuotafsError) as info:
        qmount.crash()
    assert info.value.code == ExitCode.USAGE
    assert "not mounted with --crash-sim" in str(info.value)
    assert qmount.status().crash_sim is False
