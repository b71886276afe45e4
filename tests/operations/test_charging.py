"""What QuotaFS charges and refuses, in-process: errno, the bytes on the backing, the
ledger as the status document reports it, and statfs."""

from __future__ import annotations

import errno
import os
import random

import pyfuse3
import pytest

from quotafs.daemon import charging
from quotafs.daemon.charging import LAYOUT_EXTENTS_MAX, SCATTERED_MAX
from tests.operations.driver import FsFactory, InProcessFS

K = 1024
M = 1024 * K
BLOCK = 4096


async def usage(fs: InProcessFS) -> tuple[int, int]:
    """(used bytes, inodes used) as the ledger reports them on the control channel."""
    status = await fs.status()
    return status["used"], status["inodes_used"]


def on_backing(fs: InProcessFS, path: str) -> int:
    """The size of the backing file behind `path` (what the daemon really wrote)."""
    return os.stat(os.path.join(fs.backing, path.lstrip("/"))).st_size


async def assert_books_balance(fs: InProcessFS) -> None:
    ledger, scan = await fs.books()
    assert ledger == scan, "the ledger does not match a fresh scan of the backing"


def refused(exc: pytest.ExceptionInfo[OSError]) -> bool:
    return exc.value.errno == errno.ENOSPC


# -- the byte limit ---------------------------------------------------------------------------


async def test_blocks_enospc_exactly_at_the_limit(fs: InProcessFS) -> None:
    f = await fs.create("/full")
    assert await fs.write(f, 0, b"a" * (M - 1)) == M - 1  # 256 blocks, the last one partly
    assert await fs.write(f, M - 1, b"b") == 1  # inside the last block: allocated already
    with pytest.raises(OSError) as exc:
        await fs.write(f, M, b"c")  # block 257
    assert refused(exc)
    await fs.release(f)
    assert await usage(fs) == (M, 1)
    assert on_backing(fs, "/full") == M  # the refused write left nothing behind
    await assert_books_balance(fs)


async def test_apparent_enospc_exactly_at_the_limit(make_fs: FsFactory) -> None:
    fs = make_fs(10_000, accounting="apparent")
    f = await fs.create("/full")
    assert await fs.write(f, 0, b"a" * 9_999) == 9_999
    assert await fs.write(f, 9_999, b"b") == 1
    with pytest.raises(OSError) as exc:
        await fs.write(f, 10_000, b"c")
    assert refused(exc)
    await fs.release(f)
    assert await usage(fs) == (10_000, 1)
    assert on_backing(fs, "/full") == 10_000
    await assert_books_balance(fs)


async def test_a_write_that_does_not_fit_whole_is_refused_whole(fs: InProcessFS) -> None:
    await fs.write_file("/first", b"a" * (M - 2 * BLOCK))
    f = await fs.create("/second")
    with pytest.raises(OSError) as exc:
        await fs.write(f, 0, b"b" * (3 * BLOCK))  # two blocks would fit, not three
    assert refused(exc)
    assert on_backing(fs, "/second") == 0
    assert await fs.write(f, 0, b"b" * (2 * BLOCK)) == 2 * BLOCK
    await fs.release(f)
    assert await usage(fs) == (M, 2)


@pytest.mark.parametrize("accounting", ["blocks", "apparent"])
async def test_overwriting_allocated_data_needs_no_quota(make_fs: FsFactory,
                                                         accounting: str) -> None:
    fs = make_fs("1M", accounting=accounting)
    await fs.write_file("/full", b"a" * M)
    f = await fs.open("/full")
    assert await fs.write(f, 1234, b"b" * (100 * K)) == 100 * K
    with pytest.raises(OSError) as exc:
        await fs.write(f, M, b"c")
    assert refused(exc)
    await fs.release(f)
    assert await usage(fs) == (M, 1)
    assert (await fs.read_file("/full"))[1234:1240] == b"bbbbbb"


@pytest.mark.parametrize(("accounting", "charged"),
                         [("blocks", BLOCK), ("apparent", 512 * K + 1)])
async def test_holes(make_fs: FsFactory, accounting: str, charged: int) -> None:
    """Block accounting charges the blocks written, apparent sizes charge the hole too."""
    fs = make_fs("1M", accounting=accounting)
    await fs.write_file("/sparse", b"x", offset=512 * K)
    assert await usage(fs) == (charged, 1)
    await assert_books_balance(fs)


@pytest.mark.parametrize("accounting", ["blocks", "apparent"])
async def test_a_write_of_nothing_past_the_end_charges_nothing(make_fs: FsFactory,
                                                               accounting: str) -> None:
    """pwrite of 0 bytes at an offset past the end leaves the file as it was; the ledger
    too (the state machine found apparent accounting charging the offset)."""
    fs = make_fs("1M", accounting=accounting)
    f = await fs.create("/a")
    assert await fs.write(f, 4096, b"") == 0
    await fs.release(f)
    assert os.stat(os.path.join(fs.backing, "a")).st_size == 0
    assert (await fs.status())["used"] == 0
    ledger, scan = await fs.books()
    assert ledger == scan


# -- what a write knows without asking the backing (Node.filled) ----------------------------

async def test_overwrites_past_the_dense_start_charge_only_the_new_blocks(
        fs: InProcessFS) -> None:
    """A one-block overwrite of a block the node knows holds data (Node.scattered) takes
    the overwrite path; a write that reaches one more block still charges that block."""
    f = await fs.create("/s")
    await fs.write(f, 5 * BLOCK, b"a" * BLOCK)  # a hole at blocks 0-4, data at 5
    assert await usage(fs) == (BLOCK, 1)
    await fs.write(f, 5 * BLOCK, b"b" * BLOCK)  # the same block again: nothing new
    assert await usage(fs) == (BLOCK, 1)
    await fs.write(f, 5 * BLOCK + 1, b"c" * BLOCK)  # block 5 and the new block 6
    assert await usage(fs) == (2 * BLOCK, 1)
    await assert_books_balance(fs)
    await fs.release(f)
    with open(os.path.join(fs.backing, "s"), "rb") as back:
        assert back.read() == bytes(5 * BLOCK) + b"b" + b"c" * BLOCK



async def test_random_block_writes_into_a_sparse_file_stop_at_the_limit(
        fs: InProcessFS) -> None:
    """The bench's random writes: one block each into a file truncated far past the
    quota. Each new block is charged until the quota is full, the next new one is
    refused whole, and overwrites of blocks written before still succeed."""
    f = await fs.create("/r")
    await fs.truncate(f, 4 * M)  # 1,024 blocks, the quota holds 256
    order = random.Random(7).sample(range(1024), 300)
    for n, block in enumerate(order):
        data = block.to_bytes(2, "big") * (BLOCK // 2)
        if n < 256:
            assert await fs.write(f, block * BLOCK, data) == BLOCK
        else:
            with pytest.raises(OSError) as exc:
                await fs.write(f, block * BLOCK, data)
            assert refused(exc)
    assert await usage(fs) == (M, 1)
    for block in order[:10]:  # written before: nothing to allocate, even when full
        assert await fs.write(f, block * BLOCK, b"o" * BLOCK) == BLOCK
    await fs.release(f)
    await assert_books_balance(fs)
    with open(os.path.join(fs.backing, "r"), "rb") as back:
        for n, block in enumerate(order):
            back.seek(block * BLOCK)
            want = (b"o" * BLOCK if n < 10 else block.to_bytes(2, "big") * (BLOCK // 2)
                    if n < 256 else bytes(BLOCK))
            assert back.read(BLOCK) == want, f"block {block}"


async def test_one_block_writes_past_what_a_node_remembers_are_charged_alike(
        make_fs: FsFactory) -> None:
    """Past SCATTERED_MAX scattered blocks the node forgets which hold data and asks the
    backing (SEEK_DATA): the charges go on exactly, holes and overwrites alike."""
    fs = make_fs("100M")
    f = await fs.create("/many")
    blocks = list(range(1, 2 * (SCATTERED_MAX + 100), 2))  # every other block: no prefix
    for block in blocks:
        await fs.write(f, block * BLOCK, b"d")
    assert await usage(fs) == (len(blocks) * BLOCK, 1)
    await fs.write(f, blocks[0] * BLOCK, b"again")  # data already
    await fs.write(f, 2 * BLOCK, b"new")  # a hole between two written blocks
    assert await usage(fs) == ((len(blocks) + 1) * BLOCK, 1)
    await fs.release(f)
    await assert_books_balance(fs)


async def test_writes_into_content_found_at_mount_charge_only_its_holes(
        make_fs: FsFactory, tmp_path: os.PathLike[str]) -> None:
    """A file from before the mount: blocks 0-1 data, 2 a hole, 3 data. The first write
    learns its dense start; the hole is still found and charged, the data never again."""
    backing = os.path.join(tmp_path, "prefilled")
    os.mkdir(backing)
    with open(os.path.join(backing, "f"), "wb") as out:
        out.write(b"x" * (2 * BLOCK))
        out.seek(3 * BLOCK)
        out.write(b"x" * BLOCK)
    fs = make_fs("1M", backing=backing)
    assert await usage(fs) == (3 * BLOCK, 1)
    f = await fs.open("/f")
    for block, charged in [(1, 3), (0, 3), (3, 3), (2, 4), (2, 4), (4, 5), (1, 5)]:
        assert await fs.write(f, block * BLOCK, b"o" * BLOCK) == BLOCK
        assert await usage(fs) == (charged * BLOCK, 1), f"after writing block {block}"
    await fs.release(f)
    await assert_books_balance(fs)


async def test_a_reopened_sparse_file_is_charged_for_its_holes_only(fs: InProcessFS) -> None:
    """A file written, closed and opened again: a write past the end learns nothing, the
    first write inside it learns which blocks hold data; later writes into its holes are
    charged, over its data not."""
    f = await fs.create("/s")
    for block in (0, 1, 4, 6, 7):
        await fs.write(f, block * BLOCK, bytes([block]) * BLOCK)
    await fs.release(f)
    assert await usage(fs) == (5 * BLOCK, 1)
    f = await fs.open("/s")
    steps = [(9, 6), (6, 6), (3, 7), (4, 7), (8, 8), (2, 9), (5, 10), (9, 10), (0, 10)]
    for block, charged in steps:
        assert await fs.write(f, block * BLOCK, b"n" * BLOCK) == BLOCK
        assert await usage(fs) == (charged * BLOCK, 1), f"after writing block {block}"
    await fs.release(f)
    await assert_books_balance(fs)
    n, kept = b"n" * BLOCK, [bytes([1]) * BLOCK, bytes([7]) * BLOCK]  # 1 and 7 not rewritten
    assert await fs.read_file("/s") == n + kept[0] + 5 * n + kept[1] + 2 * n


async def test_a_reopened_file_of_many_extents_is_charged_alike(make_fs: FsFactory) -> None:
    """Past LAYOUT_EXTENTS_MAX extents an open does not learn the layout: each write asks
    the backing (SEEK_DATA), and the charges are the same."""
    fs = make_fs("100M")
    f = await fs.create("/many")
    blocks = list(range(0, 2 * (LAYOUT_EXTENTS_MAX + 10), 2))  # every other block
    for block in blocks:
        await fs.write(f, block * BLOCK, b"d")
    await fs.release(f)
    f = await fs.open("/many")
    await fs.write(f, blocks[-1] * BLOCK, b"again")  # data already
    assert await usage(fs) == (len(blocks) * BLOCK, 1)
    for n, block in enumerate([1, 3, blocks[-1] + 5]):  # holes, then past the end
        await fs.write(f, block * BLOCK, b"new")
        assert await usage(fs) == ((len(blocks) + n + 1) * BLOCK, 1)
    await fs.release(f)
    await assert_books_balance(fs)


async def test_a_write_after_a_shrinking_truncate_charges_the_blocks_again(
        fs: InProcessFS) -> None:
    f = await fs.create("/t")
    await fs.write(f, 0, b"a" * (4 * BLOCK))
    await fs.truncate(f, BLOCK + 1)  # blocks 0 and 1 stay (1 holds one byte)
    assert await usage(fs) == (2 * BLOCK, 1)
    await fs.write(f, BLOCK, b"b" * BLOCK)  # block 1 holds data still: free
    assert await usage(fs) == (2 * BLOCK, 1)
    await fs.write(f, 3 * BLOCK, b"c" * BLOCK)  # past the end: new
    assert await usage(fs) == (3 * BLOCK, 1)
    await fs.truncate(f, 8 * BLOCK)  # grows by a hole
    await fs.write(f, 2 * BLOCK, b"d")  # the block the truncate freed, now a hole
    assert await usage(fs) == (4 * BLOCK, 1)
    await fs.release(f)
    await assert_books_balance(fs)


async def test_random_writes_into_a_sparse_file_of_ours_charge_each_block_once(
        fs: InProcessFS) -> None:
    """A file the daemon made: which blocks hold data is known without asking the
    backing, through writes in any order, a shrinking truncate and a growing one."""
    f = await fs.create("/s")
    await fs.truncate(f, 8 * BLOCK)
    for block, charged in [(5, 1), (2, 2), (5, 2), (0, 3), (1, 4), (3, 5), (2, 5), (7, 6)]:
        await fs.write(f, block * BLOCK + 10, b"r" * 100)
        assert await usage(fs) == (charged * BLOCK, 1), f"after writing block {block}"
    await fs.truncate(f, 4 * BLOCK + 1)  # blocks 0-3 stay, 4 is a hole, 5 and 7 go
    assert await usage(fs) == (4 * BLOCK, 1)
    await fs.truncate(f, 8 * BLOCK)
    for block, charged in [(5, 5), (4, 6), (3, 6), (5, 6)]:
        await fs.write(f, block * BLOCK, b"t" * BLOCK)
        assert await usage(fs) == (charged * BLOCK, 1), f"after rewriting block {block}"
    await fs.release(f)
    await assert_books_balance(fs)


async def test_appends_to_a_partly_written_last_block(fs: InProcessFS) -> None:
    """Appending inside the file's last block takes nothing; crossing into the next one
    takes one block; both after a reopen too (what was known is asked again)."""
    await fs.write_file("/a", b"a" * 5000)
    for _ in range(2):
        f = await fs.open("/a")
        size = on_backing(fs, "/a")
        await fs.write(f, size, b"b" * (2 * BLOCK - size))  # fills block 1
        await fs.write(f, 2 * BLOCK, b"c")  # block 2
        await fs.truncate(f, 5000)
        await fs.release(f)
        assert await usage(fs) == (2 * BLOCK, 1)
    await assert_books_balance(fs)


async def test_a_lowered_limit_refuses_growth_and_keeps_data(fs: InProcessFS) -> None:
    await fs.write_file("/a", b"a" * (100 * K))
    assert (await fs.set_limits(limit=64 * K))["limit"] == 64 * K
    with pytest.raises(OSError) as exc:
        await fs.write_file("/b", b"b")
    assert refused(exc)
    assert on_backing(fs, "/a") == 100 * K
    await fs.set_limits(limit=None)
    assert await fs.write_file("/b", b"b") == 1


async def test_existing_content_is_charged_at_mount(make_fs: FsFactory,
                                                    tmp_path: os.PathLike[str]) -> None:
    backing = os.path.join(tmp_path, "prefilled")
    os.makedirs(os.path.join(backing, "d"))
    with open(os.path.join(backing, "d", "f"), "wb") as f:
        f.write(b"x" * (10 * K))
    os.link(os.path.join(backing, "d", "f"), os.path.join(backing, "g"))
    fs = make_fs("1M", backing=backing)
    assert await usage(fs) == (BLOCK + 3 * BLOCK, 2)  # d, f (linked twice: once)
    await assert_books_balance(fs)


# -- names ------------------------------------------------------------------------------------


async def test_hard_links_are_counted_once(fs: InProcessFS) -> None:
    await fs.write_file("/a", b"a" * (8 * K))
    await fs.mkdir("/d")
    await fs.link("/a", "/d/b")
    assert await usage(fs) == (8 * K + BLOCK, 2)
    await fs.unlink("/a")
    assert await usage(fs) == (8 * K + BLOCK, 2)  # d/b still holds the blocks
    await fs.unlink("/d/b")
    assert await usage(fs) == (BLOCK, 1)
    await assert_books_balance(fs)


async def test_unlinking_an_open_file_keeps_its_blocks_until_release(fs: InProcessFS) -> None:
    f = await fs.create("/open")
    await fs.write(f, 0, b"a" * (100 * K))
    await fs.unlink("/open")
    assert not os.path.exists(os.path.join(fs.backing, "open"))
    used, _ = await usage(fs)
    assert used == 100 * K
    assert (await fs.statfs()).f_bfree == (M - 100 * K) // BLOCK
    assert await fs.write(f, 100 * K, b"b" * BLOCK) == BLOCK  # still charged as it grows
    assert (await usage(fs))[0] == 100 * K + BLOCK
    await fs.release(f)
    assert await usage(fs) == (0, 0)
    await assert_books_balance(fs)


async def test_renaming_over_an_open_file_keeps_its_blocks_until_release(
        fs: InProcessFS) -> None:
    await fs.write_file("/new", b"n" * (4 * K))
    f = await fs.create("/old")
    await fs.write(f, 0, b"o" * (40 * K))
    await fs.rename("/new", "/old")
    assert (await usage(fs))[0] == 44 * K
    await fs.release(f)
    assert await usage(fs) == (4 * K, 1)
    await assert_books_balance(fs)


async def test_rename_over_an_existing_file_frees_the_replaced_one(fs: InProcessFS) -> None:
    await fs.write_file("/a", b"a" * (8 * K))
    await fs.write_file("/b", b"b" * (20 * K))
    await fs.rename("/a", "/b")
    assert await usage(fs) == (8 * K, 1)
    assert on_backing(fs, "/b") == 8 * K
    await assert_books_balance(fs)


async def test_rename_over_a_hard_link_frees_nothing(fs: InProcessFS) -> None:
    await fs.write_file("/a", b"a" * (8 * K))
    await fs.write_file("/b", b"b" * (20 * K))
    await fs.link("/b", "/c")
    await fs.rename("/a", "/b")
    assert await usage(fs) == (28 * K, 2)  # /c keeps b's blocks
    await assert_books_balance(fs)


async def test_rename_exchange_and_noreplace(fs: InProcessFS) -> None:
    await fs.write_file("/a", b"a" * (8 * K))
    await fs.mkdir("/d")
    with pytest.raises(FileExistsError):
        await fs.rename("/a", "/d", pyfuse3.RENAME_NOREPLACE)
    await fs.rename("/a", "/d", pyfuse3.RENAME_EXCHANGE)
    assert sorted(await fs.listdir("/")) == ["a", "d"]
    assert os.path.isdir(os.path.join(fs.backing, "a"))
    assert await usage(fs) == (8 * K + BLOCK, 2)
    await assert_books_balance(fs)


@pytest.mark.parametrize("accounting", ["blocks", "apparent"])
async def test_directories_and_symlinks(make_fs: FsFactory, accounting: str) -> None:
    fs = make_fs("1M", accounting=accounting)
    blocks = accounting == "blocks"
    await fs.mkdir("/d")
    await fs.symlink("short", "/d/fast")
    await fs.symlink("t" * 60, "/d/slow")  # ext4 keeps targets under 60 bytes in the inode
    assert await usage(fs) == ((2 * BLOCK) if blocks else 5 + 60, 3)
    with pytest.raises(OSError) as exc:
        await fs.rmdir("/d")
    assert exc.value.errno == errno.ENOTEMPTY
    for name in ("fast", "slow"):
        await fs.unlink(f"/d/{name}")
    await fs.rmdir("/d")
    assert await usage(fs) == (0, 0)


# -- truncation -------------------------------------------------------------------------------


async def test_truncate_gives_space_back(fs: InProcessFS) -> None:
    await fs.write_file("/t", b"t" * (100 * K))
    await fs.truncate("/t", 10 * K)
    assert await usage(fs) == (12 * K, 1)  # 10 KiB is three blocks
    f = await fs.open("/t")
    await fs.truncate(f, 0)
    await fs.release(f)
    assert await usage(fs) == (0, 1)
    assert on_backing(fs, "/t") == 0


async def test_growing_by_truncate(make_fs: FsFactory) -> None:
    """A hole is free in block accounting; with apparent sizes it is charged, and refused
    past the limit."""
    blocks = make_fs("1M")
    await blocks.write_file("/t", b"")
    await blocks.truncate("/t", 10 * M)
    assert await usage(blocks) == (0, 1)
    apparent = make_fs("1M", accounting="apparent")
    await apparent.write_file("/t", b"")
    await apparent.truncate("/t", M)
    assert await usage(apparent) == (M, 1)
    with pytest.raises(OSError) as exc:
        await apparent.truncate("/t", M + 1)
    assert refused(exc)
    assert on_backing(apparent, "/t") == M


async def test_open_with_o_trunc_gives_space_back(fs: InProcessFS) -> None:
    await fs.write_file("/t", b"t" * (100 * K))
    f = await fs.open("/t", os.O_WRONLY | os.O_TRUNC)
    await fs.release(f)
    assert await usage(fs) == (0, 1)


# -- inodes -----------------------------------------------------------------------------------


async def test_inode_limit(make_fs: FsFactory) -> None:
    fs = make_fs("1M", inodes=3)
    await fs.write_file("/a", b"a")
    await fs.mkdir("/d")
    await fs.symlink("a", "/s")
    for make in (fs.create("/b"), fs.mkdir("/e"), fs.symlink("a", "/t"), fs.mknod("/p")):
        with pytest.raises(OSError) as exc:
            await make
        assert refused(exc)
    await fs.link("/a", "/d/a2")  # a name, not an inode
    assert (await usage(fs))[1] == 3
    await fs.unlink("/s")
    await fs.write_file("/b", b"b")
    assert (await usage(fs))[1] == 3
    assert (await fs.statfs()).f_ffree == 0
    await assert_books_balance(fs)


async def test_failed_creations_take_no_inode(fs: InProcessFS) -> None:
    await fs.write_file("/a", b"a")
    with pytest.raises(FileExistsError):
        await fs.create("/a", flags=os.O_RDWR | os.O_EXCL)
    with pytest.raises(FileExistsError):
        await fs.mkdir("/a")
    with pytest.raises(FileNotFoundError):
        await fs.create("/missing/a")
    assert await usage(fs) == (BLOCK, 1)
    await assert_books_balance(fs)


# -- statfs -----------------------------------------------------------------------------------


async def test_statfs_reports_the_quota(make_fs: FsFactory) -> None:
    fs = make_fs("1M", inodes=100)
    await fs.write_file("/a", b"a" * (100 * K))
    await fs.mkdir("/d")
    st = await fs.statfs()
    assert (st.f_bsize, st.f_frsize) == (BLOCK, BLOCK)
    assert st.f_blocks == M // BLOCK
    assert st.f_bfree == st.f_bavail == (M - 100 * K - BLOCK) // BLOCK
    assert (st.f_files, st.f_ffree, st.f_favail) == (100, 98, 98)


async def test_statfs_keeps_the_root_reserve_from_others(make_fs: FsFactory) -> None:
    fs = make_fs("1M", reserve=64 * K)
    st = await fs.statfs()
    assert st.f_bfree == M // BLOCK
    assert st.f_bavail == (M - 64 * K) // BLOCK


async def test_statfs_without_a_limit_is_the_backings(make_fs: FsFactory) -> None:
    fs = make_fs(None)
    st = await fs.statfs()
    backing = os.statvfs(fs.backing)
    assert st.f_blocks == backing.f_blocks * backing.f_frsize // BLOCK


# -- the error boundary of the write path's handlers (inline, not the decorator) ---------


async def test_write_fsync_getxattr_answer_errno_and_eio_for_a_bug(
        fs: InProcessFS, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    f = await fs.create("/f")
    ro = await fs.open("/f", os.O_RDONLY)
    with pytest.raises(OSError) as exc:  # the backing's own errno (an OSError inside)
        await fs.write(ro, 0, b"x")
    assert exc.value.errno == errno.EBADF
    ops = fs.ops
    for request, args in ((ops.write, (987654, 0, b"x")), (ops.fsync, (987654, False)),
                          (ops.getxattr, (987654, b"security.capability", fs.ctx))):
        with pytest.raises(pyfuse3.FUSEError) as fuse_exc:  # no such handle or inode
            await request(*args)
        assert fuse_exc.value.errno in (errno.EBADF, errno.ESTALE)

    def bug(*args: object) -> int:
        raise ZeroDivisionError

    monkeypatch.setattr(ops, "_write", bug)
    monkeypatch.setattr(ops, "_getxattr", bug)
    monkeypatch.setattr(os, "fsync", bug)
    for call in (fs.write(f, 0, b"x"), fs.fsync(f),
                 ops.getxattr(f.inode, b"user.k", fs.ctx)):
        with pytest.raises((OSError, pyfuse3.FUSEError)) as bug_exc:
            await call
        assert getattr(bug_exc.value, "errno", None) == errno.EIO
    logged = [r.getMessage() for r in caplog.get_records("call")]
    assert [m.split(";")[0] for m in logged] == [
        f"unexpected error in {op}" for op in ("write", "fsync", "getxattr")]
    caplog.clear()  # expected: the autouse check fails a test on any other
    monkeypatch.undo()
    assert await fs.write(f, 0, b"after") == 5  # the handlers work on
    await fs.release(f)
    await fs.release(ro)


async def test_a_reopened_file_known_to_hold_too_many_blocks_is_charged_alike(
        fs: InProcessFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose charge alone says its data past the dense start is more than
    SCATTERED_MAX blocks is not scanned at reopen: each write asks SEEK_DATA, and the
    charges are the same."""
    monkeypatch.setattr(charging, "SCATTERED_MAX", 8)
    f = await fs.create("/big")
    await fs.write(f, BLOCK, b"d" * (20 * BLOCK))  # block 0 a hole, 1-20 data
    await fs.release(f)
    f = await fs.open("/big")
    for block, charged in [(5, 20), (0, 21), (0, 21), (25, 22), (23, 23), (20, 23)]:
        await fs.write(f, block * BLOCK, b"n" * 10)
        assert await usage(fs) == (charged * BLOCK, 1), f"after writing block {block}"
    await fs.release(f)
    await assert_books_balance(fs)
