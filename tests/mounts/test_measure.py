"""How a file is measured, and that the ledger stays equal to a fresh scan of the backing
when files are measured again: after the kernel forgot their inodes, and for every file
present at mount. On real loop-ext4 backings of 1 KiB and 4 KiB blocks, where st_blocks
counts extent-tree and xattr blocks that quotafs does not charge (root only).

Cache drops are this mount's own: the control request "forget" makes the
kernel drop the mount's cached entries, so that it sends FORGET for their inodes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotafs.client import control
from quotafs.client.api import QuotaMount, mounted
from quotafs.errors import QuotafsError
from quotafs.model.costs import Costs, Mode, scan_backing
from quotafs.protocol import FORGET
from quotafs.reference.loopext4 import Ext4Loop, open_ext4_loop
from tests.conftest import needs_fuse_and_loop_ext4
from tests.differential.machinery import image_workdir, wait_until
from tests.mounts.test_posix import assert_healthy

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096  # quotafs's accounting block
COSTS = Costs(Mode.BLOCKS, BLOCK)
J = os.path.join

# Enough examples to mean something, few enough for about 20 s per block size (2 cores).
EXAMPLES = int(os.environ.get("QUOTAFS_MEASURE_EXAMPLES", "40"))


pytestmark = needs_fuse_and_loop_ext4


@contextlib.contextmanager
def _ext4(free: int, block_size: int) -> Iterator[Ext4Loop]:
    """A loop-ext4 of a default mkfs.ext4: 1 KiB blocks below a 512M image, 4 KiB above."""
    try:
        with open_ext4_loop(free, workdir=image_workdir()) as loop:
            assert loop.block_size == block_size
            yield loop
    except QuotafsError as exc:
        pytest.skip(f"no loop-ext4 here: {exc}")


@pytest.fixture(scope="module")
def ext4_1k() -> Iterator[Ext4Loop]:
    """The issue's disk: a default mkfs.ext4 of an image of about 256M (1 KiB blocks)."""
    with _ext4(200 * MiB, 1024) as loop:
        yield loop


@pytest.fixture(scope="module")
def ext4_4k() -> Iterator[Ext4Loop]:
    with _ext4(480 * MiB, 4096) as loop:
        yield loop


@contextlib.contextmanager
def backing_on(loop: Ext4Loop) -> Iterator[str]:
    """A fresh backing directory on the loop-ext4, removed afterwards."""
    path = tempfile.mkdtemp(prefix="backing-", dir=loop.mountpoint)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fragment(path: str, piece: int, count: int, stride: int, start: int = 0) -> None:
    """`count` writes of `piece` bytes, `stride` bytes apart: one extent each on ext4."""
    write_layout(path, [(start + i * stride, piece) for i in range(count)])


def write_layout(path: str, pieces: list[tuple[int, int]], fd: int | None = None) -> None:
    """Write the pieces (offset, length), then fsync, so that ext4 allocates them (and its
    extent tree) now rather than at some later writeback."""
    own = fd is None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644) if fd is None else fd
    try:
        for offset, length in pieces:
            os.pwrite(fd, b"p" * length, offset)
        os.fsync(fd)
    finally:
        if own:
            os.close(fd)


def forget(m: QuotaMount, keep: int = 1) -> None:
    """Make the kernel forget this mount's inodes; wait until the daemon knows at most
    `keep` (the root, and what open files hold)."""
    control.request(m.path, FORGET)
    assert wait_until(lambda: m.status()["known_inodes"] <= keep, timeout=10), \
        f"the kernel still holds {m.status()['known_inodes']} inodes of the mount"


def settle(m: QuotaMount) -> None:
    """RELEASE comes after close(2) returns: wait until the daemon has seen them all."""
    assert wait_until(lambda: m.status()["open_handles"] == 0, timeout=10)


def data_bytes(path: str) -> int:
    """What quotafs charges for the file at `path`: its data extents in 4 KiB blocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return COSTS.open_file(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


# -- the measure itself ------------------------------------------------------------------


def test_a_scan_charges_data_not_the_extent_tree_or_xattr_block(ext4_4k: Ext4Loop) -> None:
    with backing_on(ext4_4k) as b:
        sparse, fragmented = J(b, "sparse"), J(b, "fragmented")
        fragment(sparse, BLOCK, 2, 2 * BLOCK)  # data, hole, data
        os.setxattr(sparse, "user.big", b"v" * 3000)  # too big for the inode: an xattr block
        # st_blocks reaches the size although a third of the file is a hole.
        assert os.stat(sparse).st_blocks * 512 == 3 * BLOCK
        fragment(fragmented, BLOCK, 7, 2 * BLOCK)  # 7 extents: a tree block
        assert os.stat(fragmented).st_blocks * 512 == 8 * BLOCK
        assert scan_backing(b, COSTS) == (2 * BLOCK + 7 * BLOCK, 2)


def test_measure_never_reads_st_blocks_of_a_file_it_can_open(tmp_path: str) -> None:
    path = J(str(tmp_path), "f")
    fragment(path, 100, 3, 3 * BLOCK)  # data in blocks 0, 3 and 6
    real = os.stat(path)
    assert COSTS.measure(real, lambda: os.open(path, os.O_RDONLY)) == 3 * BLOCK
    for blocks in (0, 10**6):  # whatever st_blocks says: the extents decide
        lied = os.stat_result(tuple(real[:10]), {"st_blocks": blocks})
        assert COSTS.measure(lied, lambda: os.open(path, os.O_RDONLY)) == 3 * BLOCK


def test_a_file_that_cannot_be_opened_is_charged_its_allocation_and_logged(
        tmp_path: str, caplog: pytest.LogCaptureFixture) -> None:
    path = J(str(tmp_path), "f")
    fragment(path, BLOCK, 2, 4 * BLOCK)
    st = os.stat(path)

    def refuse() -> int:
        raise PermissionError(13, "Permission denied")

    with caplog.at_level(logging.DEBUG, logger="quotafs.model.costs"):
        assert COSTS.measure(st, refuse) == min(5 * BLOCK, -(-st.st_blocks * 512 // BLOCK)
                                                * BLOCK)
    assert "cannot open inode" in caplog.text


# -- files present at mount --------------------------------------------------------------


def test_rm_of_a_fragmented_file_present_at_mount_gives_everything_back(
        ext4_1k: Ext4Loop) -> None:
    """The issue's reproduction: 12,000 writes of 1 KiB at a 3 KiB stride into B/frag on
    a default mkfs.ext4 of about 256M; mount --backing B; rm M/frag."""
    with backing_on(ext4_1k) as b:
        fragment(J(b, "frag"), KiB, 12_000, 3 * KiB)
        st = os.stat(J(b, "frag"))
        assert st.st_blocks * 512 > 12_000 * KiB  # the extent tree takes blocks of its own
        with mounted(backing=b) as m:
            at_mount = m.usage()["used"]
            assert at_mount == scan_backing(b, COSTS)[0] == data_bytes(J(b, "frag"))
            os.unlink(J(m.path, "frag"))
            assert m.usage()["used"] == scan_backing(b, COSTS)[0] == 0
            assert_healthy(m)


def test_a_write_ending_before_data_in_its_last_block_charges_no_block_twice(
        ext4_1k: Ext4Loop) -> None:
    """On 1 KiB ext4 a 4 KiB accounting block may hold data past the end of a write into
    it: that block is allocated already (found by Hypothesis)."""
    with backing_on(ext4_1k) as b, mounted(limit="64M", backing=b) as m:
        write_layout(J(m.path, "f"), [(0, 1), (5120, 1), (0, 4097)])
        assert m.usage()["used"] == 2 * BLOCK
        assert_healthy(m)


# -- files the kernel forgot -------------------------------------------------------------


@pytest.mark.parametrize("mmap_sigbus", [False, True], ids=["default", "mmap-sigbus"])
def test_a_forgotten_fragmented_file_is_credited_what_it_was_charged(
        ext4_1k: Ext4Loop, mmap_sigbus: bool) -> None:
    with backing_on(ext4_1k) as b, mounted(limit="64M", backing=b,
                                          mmap_sigbus=mmap_sigbus) as m:
        path = J(m.path, "frag")
        fragment(path, KiB, 400, 3 * KiB)
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, 2 * MiB)  # a hole after the fragments, filled through a map
            with mmap.mmap(fd, 64 * KiB, offset=1536 * KiB) as mapping:
                mapping[::BLOCK] = b"m" * 16
                mapping.flush()
        finally:
            os.close(fd)
        settle(m)
        assert_healthy(m)
        forget(m)
        os.truncate(path, 600 * KiB)  # the kernel looks it up again; the daemon measures it
        assert_healthy(m)
        forget(m)
        os.unlink(path)
        assert_healthy(m)
        assert m.usage()["used"] == 0


@pytest.fixture
def no_cache_mount(ext4_4k: Ext4Loop) -> Iterator[QuotaMount]:
    with backing_on(ext4_4k) as b, mounted(limit="64M", backing=b, no_cache=True) as m:
        yield m


def test_a_forgotten_inode_keeps_its_charge_when_a_measure_would_differ(
        no_cache_mount: QuotaMount) -> None:
    """A --no-cache mount shares its backing with other writers: a file that grew behind
    the daemon's back, then forgotten, is still credited what the ledger charged for it,
    not what it holds now (which would take another file's charge with it)."""
    m = no_cache_mount
    fragment(J(m.path, "other"), BLOCK, 2, BLOCK)
    fragment(J(m.path, "f"), BLOCK, 1, BLOCK)
    assert m.usage()["used"] == 3 * BLOCK
    fragment(J(m.backing, "f"), BLOCK, 1, BLOCK, start=8 * BLOCK)  # behind the mount
    forget(m)
    os.truncate(J(m.path, "f"), 4 * BLOCK)  # gives back nothing: block 8 was never charged
    os.unlink(J(m.path, "f"))
    assert m.usage()["used"] == 2 * BLOCK == scan_backing(m.backing, COSTS)[0]
    assert_healthy(m)


def test_unlink_of_a_file_never_charged_is_done_not_eio(
        no_cache_mount: QuotaMount, expect_daemon_log: Callable[[str], None]) -> None:
    """Bookkeeping never fails a request that was done on disk: a file created behind a
    --no-cache mount was never charged, and removing it gives back at most what is used
    (the daemon says that its accounting drifted, which is what an outside writer does)."""
    expect_daemon_log("accounting drifted")
    m = no_cache_mount
    fragment(J(m.backing, "behind"), BLOCK, 4, BLOCK)
    os.truncate(J(m.path, "behind"), BLOCK)  # credits 3 blocks that were never charged
    os.unlink(J(m.path, "behind"))
    assert not os.path.exists(J(m.backing, "behind"))
    assert m.usage()["used"] == 0
    assert m.is_alive()


# -- the property: random sparse layouts, with cache drops between steps ----------------

NAMES = ("a", "b", "c")
SPAN = 256 * KiB  # where the pieces of a layout lie
_name = st.sampled_from(NAMES)
_offset = st.integers(0, SPAN)
_size = st.integers(0, SPAN + 64 * KiB)
# A sparse layout: pieces (offset, length) written and fsynced, so that ext4 allocates
# them and, past four extents, an extent-tree block that st_blocks counts.
LAYOUT = st.lists(st.tuples(_offset, st.integers(1, 6 * KiB)), min_size=1, max_size=40)
INITIAL = st.dictionaries(_name, LAYOUT, min_size=1)

OPS = st.one_of(
    st.tuples(st.just("pieces"), _name, LAYOUT),
    st.tuples(st.just("truncate"), _name, _size),
    st.tuples(st.just("ftruncate"), _name, _size),
    st.tuples(st.just("unlink"), _name),
    st.tuples(st.just("link"), _name, _name),
    st.tuples(st.just("rename"), _name, _name),
    st.tuples(st.just("orphan"), _name, LAYOUT),
    st.tuples(st.just("remount")),
)


def _apply(op: tuple[Any, ...], d: str, m: QuotaMount) -> None:
    """One operation below `d` on the mount; every syscall must succeed (no EIO)."""
    kind, name = op[0], op[1]
    path = J(d, name)
    exists = os.path.exists(path)
    if kind == "pieces":
        write_layout(path, op[2])
    elif kind == "truncate" and exists:
        os.truncate(path, op[2])  # setattr without a handle: the daemon opens the file
    elif kind == "ftruncate" and exists:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, op[2])
        finally:
            os.close(fd)
    elif kind == "unlink" and exists:
        os.unlink(path)
    elif kind == "link" and exists and not os.path.exists(J(d, op[2])):
        os.link(path, J(d, op[2]))
    elif kind == "rename" and exists:
        os.rename(path, J(d, op[2]))  # over the other name, if it exists
    elif kind == "orphan" and exists:
        # Unlinked while open, forgotten meanwhile, written, then closed: the charge goes
        # with the last release.
        fd = os.open(path, os.O_RDWR)
        try:
            os.unlink(path)
            forget(m, keep=3)  # the root, d (the open file's parent) and the file
            write_layout(path, op[2], fd)
        finally:
            os.close(fd)
    settle(m)


@pytest.mark.parametrize("fs", ["1k", "4k"])
def test_ledger_equals_a_fresh_scan_after_every_step(fs: str,
                                                      request: pytest.FixtureRequest) -> None:
    """Random sparse files, present at mount or written through it, then fragmented,
    truncated, unlinked (open or not), hard-linked and renamed over; the kernel forgets
    the mount's inodes after every step, and now and then the mount starts afresh."""
    loop: Ext4Loop = request.getfixturevalue(f"ext4_{fs}")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(initial=INITIAL, before_mount=st.booleans(),
           ops=st.lists(OPS, min_size=1, max_size=10))
    def run(initial: dict[str, list[tuple[int, int]]], before_mount: bool,
            ops: list[tuple[Any, ...]]) -> None:
        with backing_on(loop) as b, contextlib.ExitStack() as stack:
            os.mkdir(J(b, "d"))  # forgetting d drops every dentry below it
            if before_mount:
                for name, pieces in initial.items():
                    write_layout(J(b, "d", name), pieces)
            m = stack.enter_context(mounted(limit="256M", backing=b))
            if not before_mount:
                for name, pieces in initial.items():
                    write_layout(J(m.path, "d", name), pieces)
            assert_healthy(m)
            for op in ops:
                if op[0] == "remount":  # every file is measured afresh by the mount scan
                    stack.close()
                    m = stack.enter_context(mounted(limit="256M", backing=b))
                else:
                    forget(m)
                    _apply(op, J(m.path, "d"), m)
                assert_healthy(m)
            forget(m)
            for name in os.listdir(J(m.path, "d")):
                os.unlink(J(m.path, "d", name))
            assert_healthy(m)
            assert m.usage()["used"] == BLOCK  # d alone

    run()
