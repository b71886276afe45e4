"""--crash-sim driven in-process (quotafs/daemon/crashsim.py): recording, the journal's
bound, the undo of renames over existing names and of removals, drop_unsynced, and the
control request's checks. The real-mount side is tests/mounts/test_crash_sim.py."""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest
from pyfuse3 import FileNameT, InodeT

from quotafs.daemon import crashsim
from quotafs.protocol import CRASH
from tests.operations.driver import Ctx, FsFactory, InProcessFS, SessionStandIns, backing_names


@pytest.fixture
def cfs(make_fs: FsFactory) -> InProcessFS:
    return make_fs("4M", crash_sim=True)


def backing(fs: InProcessFS, name: str) -> bytes:
    with open(os.path.join(fs.backing, name), "rb") as f:
        return f.read()


async def cut(fs: InProcessFS, **args: object) -> dict[str, object]:
    return await fs.control(CRASH, dict(args))


async def test_a_rename_over_an_old_file_is_undone_with_the_old_inode(
        cfs: InProcessFS) -> None:
    await cfs.write_file("/config", b"one")
    f = await cfs.open("/config")
    await cfs.fsync(f)
    await cfs.release(f)
    await cfs.fsyncdir("/")
    old_ino = os.stat(os.path.join(cfs.backing, "config")).st_ino
    await cfs.write_file("/config.tmp", b"two")
    await cfs.rename("/config.tmp", "/config")
    assert await cfs.listdir("/") == ["config"]  # the stash never shows
    report = await cut(cfs, model="posix")
    assert backing(cfs, "config") == b"one"
    assert os.stat(os.path.join(cfs.backing, "config")).st_ino == old_ino
    assert backing_names(cfs) == ["config"]
    assert {(i["path"], i["kind"]) for i in report["lost"]} >= {
        ("/config -> /config.tmp", "renamed"), ("/config.tmp", "created")}
    assert (await cfs.books())[0] == (await cfs.books())[1]


async def test_rmdir_of_a_non_empty_directory_still_fails(cfs: InProcessFS) -> None:
    await cfs.mkdir("/d")
    await cfs.write_file("/d/x", b"x")
    with pytest.raises(OSError) as info:
        await cfs.rmdir("/d")
    assert info.value.errno == errno.ENOTEMPTY
    await cfs.unlink("/d/x")
    await cfs.rmdir("/d")
    assert await cfs.listdir("/") == []


async def test_fsyncdir_makes_removals_real(cfs: InProcessFS) -> None:
    await cfs.write_file("/f", b"f" * 5000)
    await cfs.fsyncdir("/")
    await cfs.unlink("/f")
    assert backing_names(cfs, stashed=True) == []
    await cfs.fsyncdir("/")
    assert backing_names(cfs) == []
    assert (await cfs.status())["crash_journal_entries"] == 0


async def test_the_journal_bound_forces_a_sync(cfs: InProcessFS,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashsim, "JOURNAL_MAX_BYTES", 10_000)
    await cfs.write_file("/f", b"a" * 8192)
    await cfs.fsyncdir("/")
    f = await cfs.open("/f")
    await cfs.fsync(f)
    await cfs.write(f, 0, b"b" * 8192)  # saves 8192 old bytes
    status = await cfs.status()
    assert (status["crash_journal_bytes"], status["crash_forced_syncs"]) == (8192, 0)
    await cfs.write(f, 0, b"c" * 4096)  # 4096 more would pass the bound
    status = await cfs.status()
    assert status["crash_forced_syncs"] == 1 and status["crash_journal_bytes"] == 4096
    await cfs.release(f)
    await cut(cfs)
    assert backing(cfs, "f") == b"b" * 8192  # what the forced sync made durable stays


async def test_drop_unsynced_reverts_one_file_to_its_last_sync(cfs: InProcessFS) -> None:
    await cfs.write_file("/a", b"a" * 100)
    await cfs.write_file("/b", b"b" * 100)
    a = await cfs.open("/a")
    await cfs.fsync(a)
    await cfs.write(a, 100, b"A" * 50)
    await cfs.write(a, 0, b"Z")
    node = cfs.ops.inodes.handle(a.fh).node
    assert cfs.ops.crash.drop_unsynced(node) == 51
    assert backing(cfs, "a") == b"a" * 100
    assert backing(cfs, "b") == b"b" * 100  # another file's unsynced data is untouched
    await cfs.fsync(a)  # the next fsync succeeds: nothing left to sync
    await cfs.release(a)
    assert (await cfs.books())[0] == (await cfs.books())[1]


async def test_drop_unsynced_gives_back_the_blocks_it_freed(cfs: InProcessFS) -> None:
    await cfs.write_file("/a", b"a" * 4096)
    a = await cfs.open("/a")
    await cfs.fsync(a)
    used = (await cfs.status())["used"]
    await cfs.write(a, 4096, b"A" * 65536)  # 16 new blocks, unsynced
    await cfs.write(a, 100, b"Z")  # an overwrite of a synced block
    assert (await cfs.status())["used"] == used + 65536
    node = cfs.ops.inodes.handle(a.fh).node
    assert cfs.ops.crash.drop_unsynced(node) == 65537
    assert backing(cfs, "a") == b"a" * 4096
    assert (await cfs.status())["used"] == used
    assert (await cfs.books())[0] == (await cfs.books())[1]
    await cfs.write(a, 4096, b"B" * 4096)  # the file's layout is asked again: charged
    assert (await cfs.status())["used"] == used + 4096
    await cfs.release(a)
    assert (await cfs.books())[0] == (await cfs.books())[1]


async def test_drop_unsynced_that_refills_reserved_holes_charges_them_once(
        make_fs: FsFactory) -> None:
    fs = make_fs("4M", crash_sim=True, mmap_sigbus=True)
    await fs.write_file("/a", b"a" * 65536)
    a = await fs.open("/a")
    await fs.fsync(a)
    used = (await fs.status())["used"]
    await fs.truncate(a, 0)
    await fs.truncate(a, 65536)  # 16 holes, unsynced
    await fs.read(a, 32768, 16384)  # reserves 4 of them (a page read for a mapping)
    assert (await fs.status())["reserved"] == 16384
    node = fs.ops.inodes.handle(a.fh).node
    fs.ops.crash.drop_unsynced(node)  # the old data is back in all 16
    assert backing(fs, "a") == b"a" * 65536
    assert (await fs.books())[0] == (await fs.books())[1] == (used, 1, 0)
    await fs.release(a)
    assert (await fs.books())[0] == (await fs.books())[1]


async def test_a_removed_open_file_has_no_links_and_no_way_back(cfs: InProcessFS) -> None:
    await cfs.write_file("/f", b"f" * 8192)
    await cfs.fsyncdir("/")
    f = await cfs.open("/f")
    await cfs.unlink("/f")  # stashed for a cut: its inode keeps a name on the backing
    attrs = await cfs.ops.getattr(InodeT(f.inode), cfs.ctx)
    assert attrs.st_nlink == 0  # as the kernel must see it: no name is left
    with pytest.raises(pyfuse3.FUSEError) as info:  # linkat(fd, "", AT_EMPTY_PATH)
        await cfs.ops.link(InodeT(f.inode), InodeT(pyfuse3.ROOT_INODE),
                           FileNameT(b"back"), cfs.ctx)
    assert info.value.errno == errno.ENOENT
    assert await cfs.listdir("/") == []
    await cfs.release(f)
    await cfs.fsyncdir("/")  # the removal is durable: the inode is freed for real
    assert backing_names(cfs) == []
    assert (await cfs.books())[0] == (await cfs.books())[1]


async def test_a_cut_kills_handles_and_leaves_the_kernel_to_forget(
        cfs: InProcessFS, session_stand_ins: SessionStandIns) -> None:
    await cfs.write_file("/f", b"x")
    f = await cfs.open("/f")
    await cut(cfs, model="ext4")
    with pytest.raises(OSError) as info:
        await cfs.read(f, 0, 1)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError):  # close(2): the flush is EIO, the release goes through
        await cfs.release(f)
    assert cfs.ops.inodes.statistics().open_handles == 0 and not cfs.ops.inodes.dead
    await cfs.ops.control.settle()
    assert {f.inode, 1} <= set(session_stand_ins.invalidated_inodes)  # and the root


@pytest.mark.parametrize(("args", "words"), [
    ({"model": "zfs"}, "model must be one of posix, ext4"),
    ({"keep_fraction": 1.5}, "keep_fraction must be a number from 0 to 1"),
    ({"torn": "yes"}, "torn must be true or false"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"when": 1}, "unknown arguments: when"),
])
async def test_bad_crash_arguments_are_refused(cfs: InProcessFS, args: dict[str, object],
                                               words: str) -> None:
    with pytest.raises(OSError) as info:
        await cut(cfs, **args)
    assert info.value.errno == errno.EINVAL and words in str(info.value)


async def test_without_crash_sim_the_request_is_refused(fs: InProcessFS) -> None:
    with pytest.raises(OSError) as info:
        await cut(fs)
    assert info.value.errno == errno.EINVAL and "not mounted with --crash-sim" in str(
        info.value)
    assert (await fs.status())["crash_sim"] is False


async def test_writes_through_an_o_dsync_handle_are_durable(cfs: InProcessFS) -> None:
    await cfs.write_file("/f", b"")
    await cfs.fsyncdir("/")
    f = await cfs.open("/f", os.O_RDWR | os.O_DSYNC)
    await cfs.write(f, 0, b"synced")
    await cfs.release(f)
    assert (await cfs.status())["crash_journal_entries"] == 0
    await cut(cfs)
    assert backing(cfs, "f") == b"synced"


async def test_a_stash_left_by_a_killed_daemon_goes_at_the_next_mount(
        make_fs: FsFactory, tmp_path: object) -> None:
    first = make_fs("4M", crash_sim=True)
    await first.write_file("/f", b"f")
    await first.fsyncdir("/")
    await first.unlink("/f")  # not durable: stashed
    assert backing_names(first, stashed=True) == []
    await first.close()  # as a SIGKILL: nobody cleans up
    again = make_fs("4M", backing=first.backing, crash_sim=True)
    assert backing_names(again) == []
    assert (await again.books())[0] == (await again.books())[1]


async def test_ext4_keeps_an_unlink_a_later_fsync_committed(cfs: InProcessFS) -> None:
    await cfs.write_file("/old", b"o")
    await cfs.write_file("/other", b"")
    await cfs.fsyncdir("/")
    await cfs.unlink("/old")
    other = await cfs.open("/other")
    await cfs.write(other, 0, b"x")  # a size change: its fsync commits (on ext4 too)
    await cfs.fsync(other)  # ext4: commits the unlink; posix would undo it
    await cfs.release(other)
    report = await cut(cfs, model="ext4")
    assert backing_names(cfs) == ["other"]
    assert report["lost"] == []


async def test_ext4_fsync_of_a_clean_file_commits_nothing(cfs: InProcessFS) -> None:
    """As real ext4 (docs/crash.md, "Against real ext4"): a file with no size or name
    change since the last commit has nothing to commit, so its fsync leaves an earlier
    unlink uncommitted, and the cut undoes it."""
    await cfs.write_file("/old", b"o")
    await cfs.write_file("/other", b"")
    await cfs.fsyncdir("/")
    await cfs.unlink("/old")
    other = await cfs.open("/other")
    await cfs.fsync(other)
    await cfs.release(other)
    await cut(cfs, model="ext4")
    assert backing_names(cfs) == ["old", "other"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: another user's request")
async def test_a_forced_sync_in_another_users_request_removes_the_stashed_as_the_daemon(
        cfs: InProcessFS, monkeypatch: pytest.MonkeyPatch) -> None:
    # The forced sync (the log at its bound) made in a request of uid 65534 removes what
    # the root-owned 0700 stash holds: as the daemon, before that user's create is done.
    monkeypatch.setattr(crashsim, "JOURNAL_MAX_ENTRIES", 3)
    os.chmod(cfs.backing, 0o1777)
    await cfs.write_file("/a", b"a")  # create + write: 2 records
    await cfs.unlink("/a")  # 3: stashed
    assert backing_names(cfs, stashed=True) == []
    root = cfs.ctx
    cfs.ctx = Ctx(uid=65534, gid=65534, pid=os.getpid())
    await cfs.write_file("/n", b"n")  # the forced sync comes first: no EACCES
    cfs.ctx = root
    status = await cfs.status()
    assert status["crash_forced_syncs"] == 1
    assert backing_names(cfs) == ["n"]  # a's removal made real, nothing left stashed
    assert os.stat(os.path.join(cfs.backing, "n")).st_uid == 65534
    await cut(cfs, model="posix")  # n was never synced; a's removal is durable
    assert backing_names(cfs) == []
    assert (await cfs.books())[0] == (await cfs.books())[1]
