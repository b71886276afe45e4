"""The fault rules' durability effects on real mounts (docs/faults.md): --crash cuts the
power at exactly the matched request, which answers EIO and is not carried out;
--drop-unsynced fails an fsync, drops the file's unsynced writes, and the next fsync
returns 0. Both need --crash-sim, and are refused without it with one line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from quotafs import QuotaMount
from quotafs.errors import ExitCode, QuotafsError
from quotafs.options import MountOptions
from tests.conftest import MountFactory, backing_names
from tests.mounts.test_crash_sim import assert_books_are_a_fresh_scan, fsync_dir, write
from tests.mounts.test_fault_injection import errno_of


def close_dead(fd: int) -> None:
    """Close a handle from before a cut: its flush answers EIO (the device is gone), the
    descriptor is closed all the same."""
    assert errno_of(os.close, fd) == errno.EIO


@pytest.fixture
def crash_mount(mount_factory: MountFactory) -> QuotaMount:
    return mount_factory("16M", crash_sim=True)


def test_crash_cuts_at_the_nth_write_before_it_is_carried_out(crash_mount: QuotaMount) -> None:
    m = crash_mount
    write(f"{m.path}/a", b"a" * 8192, sync=True)
    fsync_dir(m.path)  # posix: a's name is durable from here on
    rule = m.add_fault("write", path="/a", nth=2, crash=True)
    fd = os.open(f"{m.path}/a", os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, b"1" * 4096) == 4096  # unsynced: lost at the cut
        assert errno_of(os.write, fd, b"2" * 4096) == errno.EIO  # the cut: the device is gone
        assert errno_of(os.write, fd, b"3" * 4096) == errno.EIO  # a handle from before it
    finally:
        close_dead(fd)
    assert os.path.getsize(f"{m.backing}/a") == 8192
    assert errno_of(os.open, f"{m.path}/a", os.O_RDONLY) == errno.EIO  # down until revived
    assert m.revive() is True
    with open(f"{m.path}/a", "rb") as f:
        assert f.read() == b"a" * 8192
    status = m.status()
    assert (status.crashes, status.faults_fired, status.crash_down) == (1, 1, False)
    fault, crash = [e for e in m.events() if e.kind in ("fault", "crash")]
    assert (fault.op, fault.path, fault.errno, fault.effect, fault.rule) == (
        "write", "/a", "EIO", "crash posix", rule)
    assert crash.op == "crash" and crash.effect.startswith("crash posix: 4096 bytes")
    assert_books_are_a_fresh_scan(m)


def test_a_crash_rule_cuts_with_its_model(crash_mount: QuotaMount) -> None:
    # ext4: the fsync of a commits the journal, so b's name survives, its data does not.
    m = crash_mount
    write(f"{m.path}/b", b"b" * 3000)
    write(f"{m.path}/a", b"a" * 100, sync=True)
    write(f"{m.path}/c", b"c" * 100)  # after the last commit: gone
    m.add_fault("fsync,fsyncdir,rename", crash=True, crash_model="ext4", nth=1)
    fd = os.open(f"{m.path}/a", os.O_RDONLY)
    try:
        assert errno_of(os.fsync, fd) == errno.EIO
    finally:
        close_dead(fd)
    m.revive()
    assert sorted(os.listdir(m.path)) == ["a", "b"]
    assert (os.path.getsize(f"{m.path}/a"), os.path.getsize(f"{m.path}/b")) == (100, 0)
    assert_books_are_a_fresh_scan(m)


def test_a_crash_at_a_rename_leaves_the_rename_undone(crash_mount: QuotaMount) -> None:
    m = crash_mount
    write(f"{m.path}/old", b"old", sync=True)
    fsync_dir(m.path)
    write(f"{m.path}/new.tmp", b"new version", sync=True)
    m.add_fault("rename", crash=True, crash_model="ext4")
    assert errno_of(os.rename, f"{m.path}/new.tmp", f"{m.path}/old") == errno.EIO
    m.revive()
    with open(f"{m.path}/old", "rb") as f:
        assert f.read() == b"old"
    # new.tmp's name was committed by its own fsync under ext4, its data with it.
    with open(f"{m.path}/new.tmp", "rb") as f:
        assert f.read() == b"new version"


def test_after_a_crash_rule_the_device_stays_dead_until_revived(
        crash_mount: QuotaMount) -> None:
    # Nothing the program does after the cut may reach the post-crash state: every
    # request answers EIO (opens and creates too) until the device is revived; the root's
    # attributes and statfs still answer, so the mount stays usable and unmountable.
    m = crash_mount
    write(f"{m.path}/kept", b"k" * 100, sync=True)
    fsync_dir(m.path)
    m.add_fault("fsync", path="/f", crash=True, nth=1)
    fd = os.open(f"{m.path}/f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"f" * 4096)
        assert errno_of(os.fsync, fd) == errno.EIO  # the cut
    finally:
        close_dead(fd)
    assert m.status().crash_down
    p = m.path
    assert errno_of(os.open, f"{p}/late", os.O_WRONLY | os.O_CREAT, 0o600) == errno.EIO
    assert errno_of(os.open, f"{p}/kept", os.O_RDONLY) == errno.EIO
    assert errno_of(os.mkdir, f"{p}/dir") == errno.EIO
    assert errno_of(os.symlink, "kept", f"{p}/link") == errno.EIO
    assert errno_of(os.unlink, f"{p}/kept") == errno.EIO
    assert errno_of(os.listdir, p) == errno.EIO
    os.stat(p)  # the root's attributes answer
    os.statvfs(p)
    assert backing_names(m.backing) == ["kept"]  # nothing landed
    assert m.revive() is True
    assert not m.status().crash_down
    write(f"{p}/late", b"after the reboot", sync=True)
    assert sorted(os.listdir(p)) == ["kept", "late"]
    assert m.revive() is False  # was not down
    assert_books_are_a_fresh_scan(m)


def test_a_manual_cut_leaves_the_device_up(crash_mount: QuotaMount) -> None:
    # `quotafs crash` from outside is a power cut and a reboot: the device answers at once.
    m = crash_mount
    write(f"{m.path}/u", b"u" * 100)
    m.crash()
    assert not m.status().crash_down
    write(f"{m.path}/v", b"v", sync=True)
    assert os.listdir(m.path) == ["v"]


def test_a_request_delayed_across_a_cut_never_lands(crash_mount: QuotaMount) -> None:
    # A create held by a delay rule when the power goes: it answers EIO, and nothing
    # of it is on disk after the cut.
    m = crash_mount
    m.add_fault("create", path="/slow", delay="1s")
    got: list[int] = []

    def create() -> None:
        got.append(errno_of(os.open, f"{m.path}/slow", os.O_WRONLY | os.O_CREAT, 0o600))

    thread = threading.Thread(target=create)
    thread.start()
    deadline = time.monotonic() + 10
    while not [e for e in m.events() if e.kind == "fault"] and time.monotonic() < deadline:
        time.sleep(0.01)
    m.crash()
    thread.join(30)
    assert got == [errno.EIO]
    assert backing_names(m.backing) == []
    assert os.listdir(m.path) == []


def test_crash_revive_on_the_command_line(crash_mount: QuotaMount) -> None:
    m = crash_mount
    m.add_fault("fsyncdir", crash=True)
    assert errno_of(fsync_dir, m.path) == errno.EIO

    def quotafs(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quotafs", *argv], capture_output=True,
                              text=True, timeout=60, check=False)

    def revive(*options: str) -> subprocess.CompletedProcess[str]:
        return quotafs("crash", m.path, "--revive", *options)

    shown = quotafs("status", m.path)
    assert shown.returncode == 0, shown.stderr
    assert ("device:       DOWN since a --crash rule's cut: every request answers EIO "
            "(quotafs crash --revive)") in shown.stdout.splitlines()
    done = revive("--json")
    assert (done.returncode, json.loads(done.stdout), done.stderr) == (
        0, {"revived": True}, "")
    done = revive()
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{m.path}: was not down\n", "")
    done = revive("--torn")
    assert done.returncode == ExitCode.USAGE
    assert done.stderr == ("quotafs: --revive cuts nothing: it takes no --torn, "
                           "--keep-fraction or --seed\n")
    os.listdir(m.path)  # up again
    assert "DOWN" not in quotafs("status", m.path).stdout


def test_revive_needs_crash_sim(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    done = subprocess.run([sys.executable, "-m", "quotafs", "crash", m.path, "--revive"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ExitCode.USAGE
    assert done.stderr == f"quotafs: {m.path} is not mounted with --crash-sim\n"


def test_the_crash_seed_comes_from_the_rule(mount_factory: MountFactory) -> None:
    # The same rule seed tears the same prefix: a crash rule is replayable.
    kept = []
    for _ in range(2):
        m = mount_factory("16M", crash_sim=True)
        m.add_fault("fsync", crash=True, crash_torn=True, seed=12345)
        fd = os.open(f"{m.path}/f", os.O_WRONLY | os.O_CREAT, 0o600)
        fsync_dir(m.path)
        try:
            os.write(fd, os.urandom(512) * 64)
            assert errno_of(os.fsync, fd) == errno.EIO
        finally:
            close_dead(fd)
        kept.append(os.path.getsize(f"{m.backing}/f"))
        m.close()
    assert kept[0] == kept[1] and kept[0] % 512 == 0 and kept[0] < 512 * 64


def test_drop_unsynced_fails_the_fsync_and_the_next_one_succeeds(
        crash_mount: QuotaMount) -> None:
    m = crash_mount
    rule = m.add_fault("fsync", errno="EIO", drop_unsynced=True, path="/wal")
    fd = os.open(f"{m.path}/wal", os.O_RDWR | os.O_CREAT, 0o600)
    fsync_dir(m.path)  # its name is durable
    try:
        assert errno_of(os.fsync, fd) == 0  # nothing to write back: no writeback error
        os.write(fd, b"s" * 4096)
        m.clear_faults(rule)
        os.fsync(fd)  # 4096 bytes durable
        rule = m.add_fault("fsync", errno="EIO", drop_unsynced=True, path="/wal")
        os.write(fd, b"u" * 8192)  # unsynced
        assert errno_of(os.fsync, fd) == errno.EIO  # the failed writeback...
        assert os.path.getsize(f"{m.backing}/wal") == 4096  # ...dropped them on disk
        assert_books_are_a_fresh_scan(m)  # and gave their two blocks back
        assert errno_of(os.fsync, fd) == 0  # and the next fsync says all is well
        assert errno_of(os.fdatasync, fd) == 0
        os.pwrite(fd, b"v" * 100, 4096)
        assert errno_of(os.fdatasync, fd) == errno.EIO  # a new writeback fails again
    finally:
        os.close(fd)
    [listed] = m.faults()
    assert (listed.fired, listed.matched) == (2, 2)
    events = [e for e in m.events() if e.kind == "fault"]
    assert [(e.op, e.errno, e.effect) for e in events] == [
        ("fsync", "EIO", "errno EIO, unsynced writes dropped")] * 2
    # A power cut now keeps the 4096 synced bytes: the dropped ones never come back.
    m.crash()
    with open(f"{m.path}/wal", "rb") as f:
        assert f.read() == b"s" * 4096
    assert_books_are_a_fresh_scan(m)


def test_drop_unsynced_that_refills_reserved_holes_charges_them_once(
        mount_factory: MountFactory) -> None:
    # --mmap-sigbus reserves the holes a read through a writable handle brings in; undoing
    # the unsynced truncates that made them holes puts the old data back: usage now, so
    # the reservation must go (it counted the same blocks twice until the close).
    m = mount_factory("16M", mmap_sigbus=True, crash_sim=True)
    write(f"{m.path}/db", b"d" * 65536, sync=True)
    fsync_dir(m.path)
    used = m.status().used
    fd = os.open(f"{m.path}/db", os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, 65536)  # 16 holes, unsynced
        os.pread(fd, 65536, 0)
        assert m.status().reserved == 65536
        m.add_fault("fsync", errno="EIO", drop_unsynced=True, path="/db")
        assert errno_of(os.fsync, fd) == errno.EIO  # the truncates are undone
        with open(f"{m.backing}/db", "rb") as f:
            assert f.read() == b"d" * 65536
        status = m.status()
        assert (status.used, status.reserved) == (used, 0)
        assert_books_are_a_fresh_scan(m)
        m.clear_faults()
    finally:
        os.close(fd)
    assert_books_are_a_fresh_scan(m)


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"op": "write", "crash": True}, "--crash"),
    ({"op": "fsync", "errno": "EIO", "drop_unsynced": True}, "--drop-unsynced"),
])
def test_durability_rules_need_crash_sim(mount_factory: MountFactory,
                                         kwargs: dict[str, object], flag: str) -> None:
    m = mount_factory("1M")
    op = str(kwargs.pop("op"))
    with pytest.raises(QuotafsError) as info:
        m.add_fault(op, **kwargs)
    assert str(info.value) == (f"{flag}: the mount is not mounted with --crash-sim (only "
                               "then does it record what is durable)")
    assert info.value.code == ExitCode.USAGE
    assert m.faults() == []


def test_the_cli_refuses_crash_without_crash_sim_with_one_line(
        mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    done = subprocess.run([sys.executable, "-m", "quotafs", "fault", "add", m.path,
                           "--op", "write", "--crash"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == ExitCode.USAGE
    assert done.stderr == ("quotafs: --crash: the mount is not mounted with --crash-sim "
                           "(only then does it record what is durable)\n")


def test_mount_time_rules_need_crash_sim_too() -> None:
    with pytest.raises(QuotafsError, match=r"rule 1 \(--op fsync --crash --crash-model posix"
                                           r"\): the mount is not mounted with --crash-sim"):
        MountOptions.from_values({"rules": [{"op": "fsync", "crash": True}]})
    MountOptions.from_values({"rules": [{"op": "fsync", "crash": True}], "crash_sim": True})
