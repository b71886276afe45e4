"""The loop-ext4 reference: sizing, teardown in every case, and the writers on a real full
ext4 (root only; skipped with the reason when loop devices can't be used)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import quotafs.reference.loopext4 as loopext4
from quotafs.compare.writers import bytes_on_disk, run_writer
from quotafs.errors import ExitCode, QuotafsError
from quotafs.reference.loopext4 import Ext4Loop, open_ext4_loop
from quotafs.reference.shutdown import FS_IOC_SHUTDOWN, shutdown

M = 1024 * 1024
ROOT = str(Path(__file__).resolve().parents[2])


@functools.cache
def _loop_unusable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mkfs.ext4, mount)"
    try:
        with open_ext4_loop(loopext4.MIN_FREE):
            pass
    except QuotafsError as exc:
        return f"no loop-ext4 here: {exc}"
    return None


@pytest.fixture
def needs_loop() -> None:
    if (reason := _loop_unusable_reason()) is not None:
        pytest.skip(reason)


@pytest.fixture
def ext4(needs_loop: None, tmp_path: Path) -> Iterator[Ext4Loop]:
    """A fresh loop-ext4 with 32 MiB free, its image under tmp_path."""
    with open_ext4_loop(32 * M, workdir=str(tmp_path)) as loop:
        yield loop


def _mounted_at(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _loops_backed_under(directory: str) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if directory in line]


def _assert_gone(loop: Ext4Loop) -> None:
    assert not _mounted_at(loop.mountpoint)
    assert _loops_backed_under(loop.workdir) == []
    assert not os.path.exists(loop.image)
    assert not os.path.exists(loop.workdir)


# --- arguments and permissions ---------------------------------------------------------------


def test_too_small_a_request_is_a_usage_error() -> None:
    with pytest.raises(QuotafsError) as info, open_ext4_loop(1000):
        pass
    assert info.value.code == ExitCode.USAGE


def test_non_root_gets_one_clear_error() -> None:
    # As root, drop the effective uid in a child (the interpreter may sit in root's home,
    # so it must start as root); as non-root, the child is already what we want.
    code = (
        "import os\n"
        "from quotafs.errors import QuotafsError\n"
        "from quotafs.reference.loopext4 import open_ext4_loop\n"
        "if os.geteuid() == 0:\n"
        "    os.setegid(65534)\n"
        "    os.seteuid(65534)\n"
        "try:\n"
        "    with open_ext4_loop(32 << 20):\n"
        "        pass\n"
        "except QuotafsError as exc:\n"
        "    print(int(exc.code), exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{int(ExitCode.PERMISSION)} compare needs root: "
        "it attaches a loop device and mounts ext4")


# --- sizing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mib", [32, 120])
def test_free_space_matches_the_request(needs_loop: None, tmp_path: Path, mib: int) -> None:
    want = mib * M
    with open_ext4_loop(want, workdir=str(tmp_path)) as loop:
        st = os.statvfs(loop.mountpoint)
        assert loop.free_bytes == st.f_bfree * st.f_frsize
        assert want <= loop.free_bytes <= want + want // 100
        assert loop.avail_bytes < loop.free_bytes  # root's 5% exist: default mkfs options
        assert 0 < loop.write_capacity_hint < loop.free_bytes
        assert loop.image_size > loop.free_bytes
        assert os.path.getsize(loop.image) == loop.image_size
        assert _mounted_at(loop.mountpoint)
        assert _loops_backed_under(loop.workdir) != []


# --- teardown ---------------------------------------------------------------------------------


def test_normal_exit_leaves_nothing(needs_loop: None, tmp_path: Path) -> None:
    with open_ext4_loop(16 * M, workdir=str(tmp_path)) as loop:
        Path(loop.mountpoint, "data").write_bytes(b"x" * M)
    _assert_gone(loop)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_in_body_leaves_nothing(needs_loop: None, tmp_path: Path,
                                          exc_type: type[BaseException]) -> None:
    with pytest.raises(exc_type), open_ext4_loop(16 * M, workdir=str(tmp_path)) as loop:
        raise exc_type("boom")
    _assert_gone(loop)


def test_busy_mount_is_lazily_unmounted(needs_loop: None, tmp_path: Path) -> None:
    with open_ext4_loop(16 * M, workdir=str(tmp_path)) as loop:
        held = open(os.path.join(loop.mountpoint, "held"), "w")  # noqa: SIM115 - kept past exit
    try:
        # The open file keeps the filesystem (and so the loop device) alive, but nothing is
        # reachable any more: no mount point, no image, no work directory.
        assert not _mounted_at(loop.mountpoint)
        assert not os.path.exists(loop.workdir)
    finally:
        held.close()
    # losetup -d on the busy device set autoclear: it goes once the last user closes.
    deadline = time.monotonic() + 5
    while _loops_backed_under(loop.workdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _loops_backed_under(loop.workdir) == []


_OWNER = """
import sys, time
from quotafs.reference.loopext4 import open_ext4_loop
with open_ext4_loop(16 * 1024 * 1024, workdir=sys.argv[1], keep=sys.argv[2] == "keep") as loop:
    print(loop.workdir, loop.mountpoint, flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def _killed_owner(tmp_path: Path, keep: bool) -> Iterator[tuple[str, str]]:
    """A process that holds a loop-ext4 (kept or not), SIGKILLed once it is mounted:
    (its work directory, its mount point). Whatever is left is removed afterwards."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path),
                              "keep" if keep else "no"], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    workdir = ""
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 60)
        assert ready, "the reference was not built within 60 s"
        line = owner.stdout.readline().split()
        assert len(line) == 2, f"the owner failed: {owner.wait()}"
        workdir, mnt = line
        assert _mounted_at(mnt)
        owner.kill()
        owner.wait()
        yield workdir, mnt
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        if workdir:
            loopext4.teardown_dir(workdir)  # kept, or the reaper failed: the test cleans up


def test_sigkill_of_the_owner_leaves_nothing(needs_loop: None, tmp_path: Path) -> None:
    """No finally runs in a SIGKILLed process: its reaper tears the reference down."""
    with _killed_owner(tmp_path, keep=False) as (workdir, mnt):
        deadline = time.monotonic() + 30
        while (os.path.exists(workdir) or _loops_backed_under(workdir)) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _mounted_at(mnt)
        assert _loops_backed_under(workdir) == []
        assert not os.path.exists(workdir)


def test_a_kept_reference_outlives_a_sigkill_of_its_owner(needs_loop: None,
                                                          tmp_path: Path) -> None:
    with _killed_owner(tmp_path, keep=True) as (workdir, mnt):
        time.sleep(2)  # what a reaper would need to tear it down (it has exited)
        assert _mounted_at(mnt)
        assert _loops_backed_under(workdir) != []


def test_keep_leaves_it_and_says_how_to_remove_it(needs_loop: None, tmp_path: Path) -> None:
    with open_ext4_loop(16 * M, workdir=str(tmp_path), keep=True) as loop:
        pass
    try:
        assert _mounted_at(loop.mountpoint)
        assert os.path.exists(loop.image)
    finally:
        for command in loop.cleanup_commands():
            subprocess.run(command, shell=True, check=True)
    _assert_gone(loop)


@pytest.mark.parametrize("broken", ["mkfs", "mount"])
def test_a_failing_step_leaves_nothing(needs_loop: None, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    # The tool fails (as a real one would); every step before it has really happened.
    real = loopext4._find_tools()
    tools = loopext4._Tools(
        losetup=real.losetup,
        mkfs="/bin/false" if broken == "mkfs" else real.mkfs,
        mount="/bin/false" if broken == "mount" else real.mount,
        umount=real.umount,
    )
    monkeypatch.setattr(loopext4, "_find_tools", lambda: tools)
    with pytest.raises(QuotafsError) as info, open_ext4_loop(16 * M, workdir=str(tmp_path)):
        pass
    assert info.value.code == ExitCode.LOOP
    assert len(str(info.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert _loops_backed_under(str(tmp_path)) == []


# --- the writers on a full ext4 -------------------------------------------------------------


def test_mmap_writer_dies_by_sigbus(ext4: Ext4Loop) -> None:
    path = os.path.join(ext4.mountpoint, "mmap")
    result = run_writer("mmap", path, 256 * M, M, timeout=120)
    assert (result.outcome, result.signal_name, result.exit_status) == ("signal", "SIGBUS", 135)
    assert result.failed_call is None
    assert ext4.free_bytes - 4 * M <= result.bytes_acknowledged <= ext4.write_capacity_hint
    # Every acknowledged chunk is in the file; at most the chunk that faulted is partial.
    on_disk = bytes_on_disk(path, M, 256 * M)
    assert result.bytes_acknowledged <= on_disk < result.bytes_acknowledged + M


def test_write_writer_ends_with_enospc(ext4: Ext4Loop) -> None:
    path = os.path.join(ext4.mountpoint, "write")
    result = run_writer("write", path, 256 * M, M, timeout=120)
    assert (result.outcome, result.failed_call, result.errno_name) == ("errno", "write", "ENOSPC")
    assert result.exit_status == 1
    # write(2) can't have the clusters ext4 holds back for metadata, and refuses whole
    # large folios at the end: within one chunk of the capacity, never beyond it.
    assert ext4.write_capacity_hint - M < result.bytes_acknowledged <= ext4.write_capacity_hint
    assert ext4.free_bytes - result.bytes_acknowledged < M + ext4.reserved_clusters_bytes
    assert bytes_on_disk(path, M, 256 * M) == result.bytes_acknowledged


def test_fallocate_beyond_free_space_fails_after_allocating(ext4: Ext4Loop) -> None:
    path = os.path.join(ext4.mountpoint, "fallocate")
    result = run_writer("fallocate", path, 64 * M, M, timeout=120)
    assert (result.outcome, result.failed_call, result.errno_name) == (
        "errno", "fallocate", "ENOSPC")
    assert result.bytes_acknowledged == 0  # nothing written when the allocation failed
    # posix_fallocate keeps what it allocated before running out, and the size it reached.
    assert result.allocated_bytes is not None and result.file_size is not None
    assert ext4.free_bytes - 2 * M < result.allocated_bytes <= ext4.free_bytes
    assert 0 < result.file_size <= result.allocated_bytes


def test_sigbus_is_not_caught_even_with_faulthandler_on(ext4: Ext4Loop) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "quotafs.compare.writers", "mmap",
         os.path.join(ext4.mountpoint, "f"), "--size", "64M", "--report-fd", "1"],
        env=env, capture_output=True, text=True, timeout=120, check=False, cwd=ext4.mountpoint)
    assert proc.returncode == -signal.SIGBUS
    assert proc.stderr == ""  # no "Fatal Python error" dump
    assert proc.stdout.splitlines()[-1].startswith("ack ")
    assert not os.path.exists(os.path.join(ext4.mountpoint, "core"))


# --- the power cut (FS_IOC_SHUTDOWN without log flush, then remount) --------------------------


def _write(path: str, data: bytes, sync: bool, append: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_power_cut_keeps_what_the_journal_committed(ext4: Ext4Loop) -> None:
    """The issue's measurement: a = 10,000 bytes fsynced, then 5,000 appended unsynced;
    b created and written, never synced; c created, written and fsynced after b. After the
    cut: a has its 10,000 bytes, b exists (c's fsync committed its name) with size 0
    (its data was never written back), c has its 100 bytes."""
    a, b, c = (os.path.join(ext4.mountpoint, n) for n in "abc")
    _write(a, b"A" * 10_000, sync=True)
    _write(a, b"a" * 5_000, sync=False, append=True)
    _write(b, b"B" * 100, sync=False)
    _write(c, b"C" * 100, sync=True)
    assert os.path.getsize(a) == 15_000
    ext4.power_cut()
    assert _mounted_at(ext4.mountpoint)
    assert Path(a).read_bytes() == b"A" * 10_000
    assert Path(b).read_bytes() == b""
    assert Path(c).read_bytes() == b"C" * 100
    # The remounted filesystem is alive: it takes writes again, and another cut.
    _write(b, b"b" * 50, sync=True)
    ext4.power_cut()
    assert Path(b).read_bytes() == b"b" * 50


def test_power_cut_loses_an_uncommitted_name(ext4: Ext4Loop) -> None:
    """Nothing synced after the create: the name itself is gone (the running transaction
    was thrown away, not committed, as FS_GOING_FLAGS_NOLOGFLUSH promises)."""
    path = os.path.join(ext4.mountpoint, "new")
    _write(path, b"x" * 100, sync=False)
    ext4.power_cut()
    assert not os.path.exists(path)
    assert sorted(os.listdir(ext4.mountpoint)) == ["lost+found"]


def test_power_cut_with_a_descriptor_open_fails_clearly_and_tears_down(
        needs_loop: None, tmp_path: Path) -> None:
    """A descriptor held across the cut keeps the mount busy: one clear error (no lazy
    unmount, whose live superblock would come back shut down), and teardown still removes
    the mount, the loop device and the image."""
    with pytest.raises(QuotafsError) as info, \
            open_ext4_loop(16 * M, workdir=str(tmp_path)) as loop:
        fd = os.open(os.path.join(loop.mountpoint, "held"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            loop.power_cut()
        finally:
            with pytest.raises(OSError):  # the dead device answers EIO
                os.write(fd, b"x")
            os.close(fd)
    assert info.value.code == ExitCode.LOOP
    assert "after the power cut" in str(info.value) and "still open" in str(info.value)
    _assert_gone(loop)


def test_shutdown_ioctl_number_is_the_kernels(ext4: Ext4Loop) -> None:
    """_IOR('X', 125, __u32) is what this kernel's ext4 answers (a wrong number is ENOTTY):
    after it, requests on the mount fail with EIO."""
    assert FS_IOC_SHUTDOWN == 0x8004587D
    shutdown(ext4.mountpoint)
    with pytest.raises(OSError) as info:
        _write(os.path.join(ext4.mountpoint, "after"), b"x", sync=False)
    assert info.value.errno == errno.EIO


def test_power_cut_while_another_namespace_holds_the_mount(ext4: Ext4Loop) -> None:
    """A mount namespace made while the ext4 is mounted keeps its superblock alive after
    our unmount; mounting the same device again would hand back that shut-down
    superblock, pre-cut state and all. The cut mounts a new loop device instead."""
    holder = subprocess.Popen(["unshare", "-m", "sleep", "60"])
    try:
        time.sleep(0.3)  # the namespace's copy of the mount table exists
        _write(os.path.join(ext4.mountpoint, "unsynced"), b"x", sync=False)
        before = ext4.device
        ext4.power_cut()
        assert ext4.device != before
        assert sorted(os.listdir(ext4.mountpoint)) == ["lost+found"]
        _write(os.path.join(ext4.mountpoint, "after"), b"y", sync=True)  # alive
    finally:
        holder.kill()
        holder.wait()
