"""--crash-sim's bounds, driven in-process (quotafs/daemon/crashsim.py): descriptors,
the stash's bytes in the journal's bound, appends merged into one record, an O_DSYNC
write's range, and two cuts before the kernel's caches were dropped."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import pytest
import trio

from quotafs.daemon import crashsim
from quotafs.protocol import CRASH
from tests.operations.driver import FsFactory, InProcessFS, backing_names


@pytest.fixture
def cfs(make_fs: FsFactory) -> InProcessFS:
    return make_fs("64M", crash_sim=True)


def backing(fs: InProcessFS, name: str) -> bytes:
    with open(os.path.join(fs.backing, name), "rb") as f:
        return f.read()


async def synced_file(fs: InProcessFS, name: str, data: bytes) -> None:
    await fs.write_file(name, data)
    f = await fs.open(name)
    await fs.fsync(f)
    await fs.release(f)
    await fs.fsyncdir("/")


# -- 3: descriptors ---------------------------------------------------------------------


@pytest.fixture
def few_descriptors() -> Iterator[int]:
    """RLIMIT_NOFILE lowered to 700 above what is open now, for the test's length."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 700
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_many_unsynced_files_never_run_the_mount_out_of_descriptors(
        cfs: InProcessFS, few_descriptors: int) -> None:
    """Each known inode holds an O_PATH descriptor; the recording's own (a file's, a
    directory's) stay within an eighth of the limit, by forced syncs."""
    for i in range(500):  # 500 known inodes + 500 recorded files would pass the limit
        await cfs.write_file(f"/f{i}", b"x" * 100)
    status = await cfs.status()
    assert status["crash_forced_syncs"] >= 1
    assert len(os.listdir("/proc/self/fd")) < few_descriptors
    await cfs.control(CRASH, {"model": "posix"})
    # what the forced syncs made durable stays: whole files, or (a name synced before
    # its data) empty ones
    sizes = [len(backing(cfs, n)) for n in backing_names(cfs)]
    assert sizes.count(100) >= 100 and set(sizes) <= {0, 100}


async def test_a_change_that_cannot_be_recorded_is_durable_not_an_error(
        cfs: InProcessFS, monkeypatch: pytest.MonkeyPatch) -> None:
    await cfs.write_file("/old", b"o" * 5000)
    await cfs.fsyncdir("/")

    def no_descriptor(*args: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(cfs.ops.crash, "_dir", no_descriptor)
    await cfs.write_file("/new", b"n")  # the create happened: it must not fail
    await cfs.unlink("/old")  # nor the unlink: its stashed inode goes for real
    assert backing_names(cfs) == ["new"]
    status = await cfs.status()
    assert status["crash_unrecorded"] == 2 and status["crash_stash_bytes"] == 0
    monkeypatch.undo()
    await cfs.control(CRASH, {"model": "posix"})
    assert backing_names(cfs) == ["new"]  # both durable
    assert (await cfs.books())[0] == (await cfs.books())[1]


# -- 5: the stash's bytes ---------------------------------------------------------------


async def test_stashed_bytes_count_in_the_journal_bound(
        cfs: InProcessFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashsim, "JOURNAL_MAX_BYTES", 20_000)
    await synced_file(cfs, "/a", b"a" * 8192)
    await synced_file(cfs, "/b", b"b" * 16384)
    await synced_file(cfs, "/big", b"c" * 32768)
    await cfs.unlink("/a")
    status = await cfs.status()
    assert (status["crash_stash_bytes"], status["crash_forced_syncs"]) == (8192, 0)
    await cfs.unlink("/b")  # 8192 + 16384 stashed would pass the bound: a forced sync
    status = await cfs.status()
    assert (status["crash_stash_bytes"], status["crash_forced_syncs"]) == (16384, 1)
    await cfs.write_file("/new", b"n")
    await cfs.control(CRASH, {"model": "posix"})
    assert backing_names(cfs) == ["b", "big"]  # b's removal was undone
    assert (await cfs.status())["crash_stash_bytes"] == 0
    await cfs.unlink("/big")  # larger than the bound by itself: durable at once
    status = await cfs.status()
    assert (status["crash_stash_bytes"], status["crash_journal_entries"]) == (0, 0)
    assert backing_names(cfs) == ["b"]  # no stash: the data is gone


async def test_a_rename_over_a_file_larger_than_the_bound_is_durable_at_once(
        cfs: InProcessFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashsim, "JOURNAL_MAX_BYTES", 20_000)
    await synced_file(cfs, "/big", b"c" * 65536)
    await synced_file(cfs, "/new", b"n" * 100)
    await cfs.fsyncdir("/")
    await cfs.rename("/new", "/big")  # the replaced 64 KiB alone pass the bound
    status = await cfs.status()
    assert (status["crash_stash_bytes"], status["crash_unrecorded"]) == (0, 1)
    await cfs.control(CRASH, {"model": "posix"})
    # all or nothing: the rename stands whole (newpath never goes missing)
    assert backing_names(cfs) == ["big"]
    assert backing(cfs, "big") == b"n" * 100


async def test_a_stashed_directory_counts_its_blocks(cfs: InProcessFS) -> None:
    await cfs.mkdir("/old")
    await cfs.mkdir("/moved")
    await cfs.fsyncdir("/")
    await cfs.rename("/moved", "/old")  # over an empty directory: it is stashed
    stash = os.path.join(cfs.backing, crashsim.STASH.decode())
    [stashed] = [n for n in os.listdir(stash) if n != crashsim.STASH_MARK.decode()]
    blocks = os.stat(os.path.join(stash, stashed)).st_blocks * 512
    assert (await cfs.status())["crash_stash_bytes"] == blocks


# -- 7: one record for consecutive appends ----------------------------------------------


async def test_consecutive_appends_are_one_record(cfs: InProcessFS) -> None:
    await synced_file(cfs, "/log", b"s" * 100)
    f = await cfs.open("/log")
    for i in range(100):
        await cfs.write(f, 100 + 4096 * i, b"a" * 4096)
    assert (await cfs.status())["crash_journal_entries"] == 1
    await cfs.write(f, 0, b"o")  # an overwrite: its own record
    await cfs.write(f, 100 + 4096 * 100, b"b" * 10)  # after it: a new append record
    assert (await cfs.status())["crash_journal_entries"] == 3
    await cfs.release(f)
    report = await cfs.control(CRASH, {"model": "posix"})
    assert backing(cfs, "log") == b"s" * 100
    data = [i for i in report["lost"] if i["kind"] == "data"]
    assert data == [{"path": "/log", "kind": "data", "bytes": 4096 * 100 + 1 + 10}]


async def test_a_refused_append_leaves_the_merged_record_as_it_was(
        make_fs: FsFactory) -> None:
    fs = make_fs("64K", crash_sim=True)
    await synced_file(fs, "/f", b"")
    f = await fs.open("/f")
    await fs.write(f, 0, b"a" * 4096)
    with pytest.raises(OSError):  # past the 64K limit: refused whole
        await fs.write(f, 4096, b"b" * (1 << 20))
    await fs.write(f, 4096, b"c" * 4096)
    await fs.release(f)
    report = await fs.control(CRASH, {"model": "posix"})
    assert [i["bytes"] for i in report["lost"] if i["kind"] == "data"] == [8192]


# -- 9: an O_DSYNC write syncs its own range only ----------------------------------------


async def test_an_o_dsync_write_leaves_the_files_other_writes_unsynced(
        cfs: InProcessFS) -> None:
    await synced_file(cfs, "/f", b"a" * 1000)
    plain = await cfs.open("/f")
    await cfs.write(plain, 0, b"b" * 100)
    dsync = await cfs.open("/f", os.O_RDWR | os.O_DSYNC)
    await cfs.write(dsync, 500, b"c" * 100)
    await cfs.release(dsync)
    await cfs.release(plain)
    await cfs.control(CRASH, {"model": "posix"})
    assert backing(cfs, "f") == b"a" * 500 + b"c" * 100 + b"a" * 400


async def test_an_o_dsync_write_over_an_unsynced_one_survives_whole(
        cfs: InProcessFS) -> None:
    await synced_file(cfs, "/f", b"a" * 1000)
    plain = await cfs.open("/f")
    await cfs.write(plain, 0, b"b" * 100)
    await cfs.write(plain, 1000, b"e" * 100)  # an append past the synced size
    dsync = await cfs.open("/f", os.O_RDWR | os.O_DSYNC)
    await cfs.write(dsync, 50, b"c" * 100)  # overlaps the first write
    await cfs.release(dsync)
    await cfs.release(plain)
    await cfs.control(CRASH, {"model": "posix"})
    assert backing(cfs, "f") == b"b" * 50 + b"c" * 100 + b"a" * 850  # the append lost


# -- 8: two cuts before the first one settled -------------------------------------------


async def test_an_open_waiting_on_a_cut_is_woken_after_a_second_cut(
        cfs: InProcessFS) -> None:
    crash = cfs.ops.crash
    assert crash is not None
    crash.cut("posix", False, 0.0, 1)
    woken = trio.Event()

    async def an_open() -> None:
        await crash.wait_settled()
        woken.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(an_open)
        await trio.testing.wait_all_tasks_blocked()
        crash.cut("posix", False, 0.0, 2)  # before the first cut's settle() ran
        await crash.settle()
        with trio.fail_after(5):
            await woken.wait()


async def appended(fs: InProcessFS, name: str, count: int) -> None:
    """`count` appends of 4 KiB (A, B, C, ...) to an empty file, synced empty."""
    await synced_file(fs, name, b"")
    f = await fs.open(name)
    for i in range(count):
        await fs.write(f, 4096 * i, bytes([65 + i]) * 4096)
    await fs.release(f)
    assert (await fs.status())["crash_journal_entries"] == 1  # merged


@pytest.mark.parametrize("seed", range(6))
async def test_keep_fraction_keeps_a_prefix_of_merged_appends(cfs: InProcessFS,
                                                              seed: int) -> None:
    await appended(cfs, "/f", 8)
    report = await cfs.control(CRASH, {"model": "posix", "keep_fraction": 0.5,
                                       "seed": seed})
    kept = backing(cfs, "f")
    assert kept == b"".join(bytes([65 + i]) * 4096 for i in range(len(kept) // 4096))
    items = {i["kind"]: i["bytes"] for i in report["lost"]}
    assert items.get("kept", 0) == len(kept) and items.get("data", 0) == 8 * 4096 - len(kept)


@pytest.mark.parametrize("seed", range(4))
async def test_torn_tears_the_last_of_merged_appends(cfs: InProcessFS, seed: int) -> None:
    await appended(cfs, "/f", 4)
    await cfs.control(CRASH, {"model": "posix", "torn": True, "seed": seed})
    data = backing(cfs, "f")
    if data:  # the last append's prefix, at its own offset; the earlier ones lost
        assert data[:3 * 4096] == bytes(3 * 4096)
        tail = data[3 * 4096:]
        assert tail == b"D" * len(tail) and 0 < len(tail) < 4096 and len(tail) % 512 == 0
