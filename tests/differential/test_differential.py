"""quotafs against a real loop-ext4 with the same free space: the same operations on both,
every result compared (tests/differential/machinery.py). Root only; skipped with the reason when
there is no FUSE or no loop device.

A Hypothesis state machine generates sequences of operations near and past the limit (a
couple of MiB free, so ENOSPC comes often) over a few names; one ext4 and one quotafs serve
the whole module and are emptied between examples. Every difference found is either an
explained one — documented in docs/semantics.md ("Differences found by the differential
tests") and pinned below by a test_difference_* test — or a quotafs bug, pinned by a strict
xfail that flips when the bug is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from quotafs.client.api import QuotaMount, mounted
from quotafs.errors import QuotafsError
from quotafs.reference.loopext4 import Ext4Loop, open_ext4_loop
from tests.conftest import needs_fuse_and_loop_ext4
from tests.differential.machinery import (
    Close,
    Create,
    Difference,
    Differential,
    DifferentialError,
    Fsync,
    HandleFsync,
    HandleTruncate,
    HandleWrite,
    Link,
    Mkdir,
    MmapWrite,
    Op,
    Open,
    Rename,
    Rmdir,
    Statvfs,
    Step,
    Target,
    Truncate,
    Unlink,
    Write,
    image_workdir,
    wait_until,
)

KiB = 1024
MiB = 1024 * KiB
FREE = 1536 * KiB  # ext4's free space; quotafs gets what a writer can use of it

# Enough examples to mean something, few enough for CI: about a minute on 2 cores.
EXAMPLES = int(os.environ.get("QUOTAFS_DIFFERENTIAL_EXAMPLES", "300"))
STEPS = 30

FILES = ("a", "b", "d/a", "d/b", "e/a")
DIRS = ("d", "e")
NAMES = FILES + DIRS
SLOTS = (0, 1)


pytestmark = needs_fuse_and_loop_ext4


def _settle(mount: QuotaMount) -> Callable[[int], None]:
    """FUSE sends RELEASE after close(2) returns: wait until quotafs has seen them all."""
    def settle(open_files: int) -> None:
        if not wait_until(lambda: mount.status()["open_handles"] == open_files):
            raise AssertionError(f"quotafs still holds {mount.status()['open_handles']} "
                                 f"handles, the test {open_files}")
    return settle


@dataclass
class Pair:
    ext4: Ext4Loop
    quota: QuotaMount
    diff: Differential
    started: list[Difference]  # what the first reset found (the capacity check)


@contextlib.contextmanager
def open_pair(free: int = FREE, **options: Any) -> Iterator[Pair]:
    """A loop-ext4 with `free` bytes free and a quotafs limited to what ext4 lets a writer
    use of it, wrapped in a Differential (ext4 the reference)."""
    with contextlib.ExitStack() as stack:
        try:
            ext4 = stack.enter_context(open_ext4_loop(free, workdir=image_workdir()))
        except QuotafsError as exc:
            pytest.skip(f"no loop-ext4 here: {exc}")
        quota = stack.enter_context(mounted(limit=ext4.write_capacity_hint, **options))
        reference = Target("ext4", ext4.mountpoint, block_size=ext4.block_size,
                           reserved_bytes=ext4.reserved_clusters_bytes)
        candidate = Target("quotafs", quota.path, block_size=4096, settle=_settle(quota))
        diff = Differential(reference, candidate)
        stack.callback(diff.close)
        yield Pair(ext4, quota, diff, diff.reset())


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """One ext4 and one quotafs (ext4-faithful mmap mode) for the whole module."""
    with open_pair(mmap_sigbus=True) as p:
        yield p


@pytest.fixture
def fresh(pair: Pair) -> Iterator[Differential]:
    """The module's pair, emptied; emptied again afterwards."""
    pair.diff.reset()
    yield pair.diff
    pair.diff.close()
    pair.diff.reset()


def run(diff: Differential, *ops: Op) -> list[Step]:
    return [diff.run(op) for op in ops]


# -- the state machine ------------------------------------------------------------------

OFFSETS = st.one_of(
    st.sampled_from([0, 1, 1023, 1024, 4095, 4096, 4097, 65536, 131071, 1 * MiB,
                     1 * MiB + 1000, 2 * MiB]),
    st.integers(0, 3 * MiB))
LENGTHS = st.one_of(
    st.sampled_from([1, 100, 1024, 3000, 4096, 4097, 65536, 131072, 262144, 524288]),
    st.integers(1, 16 * KiB),
    st.integers(64 * KiB, 1 * MiB))
BIG = st.integers(128 * KiB, 1 * MiB)
SEEDS = st.integers(0, 250)


@dataclass
class Counters:
    examples: int = 0
    seconds: float = 0.0


class DifferentialMachine(RuleBasedStateMachine):
    """Operations on a few names, run on ext4 and quotafs; all compared at every step."""

    def __init__(self, diff: Differential, counters: Counters) -> None:
        super().__init__()
        self.diff = diff
        self.counters = counters
        counters.examples += 1
        diff.reset()

    def teardown(self) -> None:
        self.diff.finish()
        self.diff.close()
        self.diff.assert_no_differences()

    @initialize()
    def start(self) -> None:
        for path in DIRS:
            self.diff.run(Mkdir(path))

    @rule(path=st.sampled_from(FILES), exclusive=st.booleans(), truncate=st.booleans())
    def create(self, path: str, exclusive: bool, truncate: bool) -> None:
        self.diff.run(Create(path, exclusive, truncate))

    # Writes come in three rules, so that about a fifth of the steps write; they create
    # the file (ENOENT comes often enough from the other rules).
    @rule(path=st.sampled_from(FILES), offset=OFFSETS, length=LENGTHS, seed=SEEDS)
    def write(self, path: str, offset: int, length: int, seed: int) -> None:
        self.diff.run(Write(path, offset, length, seed, create=True))

    @rule(path=st.sampled_from(FILES), offset=OFFSETS, length=BIG, seed=SEEDS)
    def write_big(self, path: str, offset: int, length: int, seed: int) -> None:
        self.diff.run(Write(path, offset, length, seed, create=True))

    @rule(path=st.sampled_from(FILES), length=LENGTHS, seed=SEEDS)
    def append(self, path: str, length: int, seed: int) -> None:
        self.diff.run(Write(path, None, length, seed, create=True))

    @rule(path=st.sampled_from(FILES), size=OFFSETS)
    def truncate(self, path: str, size: int) -> None:
        self.diff.run(Truncate(path, size))

    @rule(path=st.sampled_from(FILES))
    def unlink(self, path: str) -> None:
        self.diff.run(Unlink(path))

    @rule(src=st.sampled_from(FILES), dst=st.sampled_from(FILES))
    def link(self, src: str, dst: str) -> None:
        self.diff.run(Link(src, dst))

    @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
    def rename(self, src: str, dst: str) -> None:
        self.diff.run(Rename(src, dst))

    @rule(path=st.sampled_from(DIRS))
    def mkdir(self, path: str) -> None:
        self.diff.run(Mkdir(path))

    @rule(path=st.sampled_from(DIRS))
    def rmdir(self, path: str) -> None:
        self.diff.run(Rmdir(path))

    @rule(path=st.sampled_from(FILES))
    def fsync(self, path: str) -> None:
        self.diff.run(Fsync(path))

    @rule(slot=st.sampled_from(SLOTS), path=st.sampled_from(FILES), create=st.booleans())
    def open(self, slot: int, path: str, create: bool) -> None:
        self.diff.run(Open(slot, path, create))

    @rule(slot=st.sampled_from(SLOTS))
    def close(self, slot: int) -> None:
        self.diff.run(Close(slot))

    @rule(slot=st.sampled_from(SLOTS), offset=st.none() | OFFSETS, length=LENGTHS,
          seed=SEEDS)
    def pwrite(self, slot: int, offset: int | None, length: int, seed: int) -> None:
        self.diff.run(HandleWrite(slot, offset, length, seed))

    @rule(slot=st.sampled_from(SLOTS), size=OFFSETS)
    def ftruncate(self, slot: int, size: int) -> None:
        self.diff.run(HandleTruncate(slot, size))

    @rule(slot=st.sampled_from(SLOTS))
    def fsync_handle(self, slot: int) -> None:
        self.diff.run(HandleFsync(slot))

    @rule(path=st.sampled_from(FILES), offset=OFFSETS, length=LENGTHS, seed=SEEDS,
          extend=st.booleans())
    def mmap_store(self, path: str, offset: int, length: int, seed: int,
                   extend: bool) -> None:
        self.diff.run(MmapWrite(path, offset, length, seed, extend))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a failure's shrinking may take minutes: let it report
def test_differential_state_machine(pair: Pair, terminal_summary: Callable[[str], None],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    counters = Counters()
    diff = pair.diff
    before = dict(diff.totals)
    start = time.monotonic()
    try:
        run_state_machine_as_test(
            lambda: DifferentialMachine(diff, counters),
            settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS,
                              derandomize=True, database=None, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow]))
    finally:
        counters.seconds = time.monotonic() - start
        totals = {k: v - before[k] for k, v in diff.totals.items()}
        line = (f"differential ext4 vs quotafs: {counters.examples} examples, "
                f"{totals['steps']:,} steps, {totals['enospc']:,} ENOSPC/short/SIGBUS on "
                f"ext4, {totals['explained']:,} explained differences, "
                f"{totals['differences']:,} unexplained, {counters.seconds:.1f}s "
                f"(ext4 {pair.ext4.free_bytes:,} B free, quotafs limit "
                f"{pair.ext4.write_capacity_hint:,} B)")
        terminal_summary(line)
        with capsys.disabled():
            print("\n" + line)
    assert counters.examples >= min(EXAMPLES, 100)


# -- the harness itself -----------------------------------------------------------------

def test_harness_clean_run(fresh: Differential) -> None:
    """A run without differences: nothing reported, the run listed step by step."""
    run(fresh, Create("a"), Write("a", 0, 100, 1), Mkdir("d"), Write("a", 5000, 10, 2))
    assert fresh.finish() == []
    fresh.assert_no_differences()
    report = fresh.report()
    assert "0 difference(s)" in report
    assert "  4. write('a', at=5000, len=10)  ->  10 B  (free " in report


def test_harness_reports_every_difference_at_once(pair: Pair, tmp_path: Path) -> None:
    """Point the candidate at a plain directory (no quota, no limit): every difference
    is collected — the room at the start, the ENOSPC ext4 gives and the directory does
    not, and whatever the host's own traffic adds — and reported in one error, with the
    run."""
    plain = tmp_path / "plain"
    plain.mkdir()
    diff = Differential(pair.diff.reference, Target("plain", str(plain), block_size=4096))
    diff.reset()
    try:
        run(diff, Create("a"), Write("a", 0, 4 * MiB, 1))
        found = diff.finish()
        with pytest.raises(DifferentialError) as info:
            diff.assert_no_differences()
    finally:
        diff.close()
        diff.reset()
    text = str(info.value)
    assert text.startswith(f"{len(found)} difference(s) between ext4 (reference) and plain "
                           "(candidate):")
    assert {d.aspect for d in found} >= {"capacity", "enospc"}
    assert "at the start: capacity differs" in text
    assert "step 2: write('a', at=0, len=4194304): enospc differs" in text
    assert "not at the limit" in text
    assert "  2. write('a', at=0, len=4194304)  ->  ENOSPC at write | 4,194,304 B" in text


# -- differences found, explained and pinned (docs/semantics.md) ------------------------

def _explained(diff: Differential, aspect: str) -> list[Difference]:
    return [d for d in diff.explained if d.aspect == aspect]


def test_difference_block_size(fresh: Differential, pair: Pair) -> None:
    """ext4 below 512 MiB uses 1 KiB blocks; quotafs charges 4 KiB ones: a 1-byte file
    costs ext4 1 KiB and quotafs 4 KiB. The harness counts the gap as explained drift."""
    assert pair.ext4.block_size == 1024
    steps = run(fresh, Create("a"), Write("a", 0, 1, 1))
    before, after = steps[0].free, steps[1].free
    assert (before[0] - after[0], before[1] - after[1]) == (1024, 4096)
    assert fresh.differences == [], fresh.report()


def test_difference_directory_block(fresh: Differential) -> None:
    """A new directory takes one ext4 block (1 KiB here) and one quotafs block (4 KiB)."""
    before, after = (s.free for s in run(fresh, Statvfs(), Mkdir("d")))
    assert (before[0] - after[0], before[1] - after[1]) == (1024, 4096)
    assert fresh.differences == [], fresh.report()


def test_difference_extra_room_from_small_blocks(fresh: Differential) -> None:
    """What the 4 KiB blocks cost quotafs, ext4 still has at quotafs's limit: there ext4
    accepts a store into a hole that quotafs refuses — an mmap writer dies by SIGBUS on
    quotafs at a page ext4 takes. The harness explains it: both are at the limit."""
    steps = run(fresh, Mkdir("d"), Mkdir("e"), Write("b", 0, 1, 1, create=True))
    room = steps[-1].free[1]
    steps = run(fresh, Create("a"), Write("a", 4096, room, 2),
                MmapWrite("a", 0, 64 * KiB, 3))
    filled, stored = steps[1], steps[2]
    assert filled.free[1] == 0 and filled.free[0] >= 9 * KiB  # 3 x 3 KiB of small blocks
    assert (stored.reference.value, stored.reference.signal) == (64 * KiB, None)
    assert (stored.candidate.value, stored.candidate.signal) == (0, "SIGBUS")
    assert fresh.differences == [], fresh.report()
    assert [d.step for d in _explained(fresh, "enospc")] == [6]


def test_difference_truncate_keeps_the_partial_block(fresh: Differential) -> None:
    """One byte at 1024, then truncate to 1 byte: ext4 (1 KiB blocks) frees the block that
    held the byte, quotafs (4 KiB blocks, like ext4 with 4 KiB blocks) keeps the block the
    new end of file lies in, as zeros."""
    steps = run(fresh, Create("a"), Write("a", 1024, 1, 1), Truncate("a", 1))
    empty, written, cut = (s.free for s in steps)
    assert cut[0] == empty[0]  # ext4: all back
    assert cut[1] == written[1] == empty[1] - 4096  # quotafs: the block stays
    assert fresh.differences == [], fresh.report()
    assert [d.step for d in _explained(fresh, "accounting")] == [3]


def test_difference_max_file_size(fresh: Differential, pair: Pair) -> None:
    """The largest file is the backing filesystem's: ext4 with 1 KiB blocks refuses a
    size past 4 TiB with EFBIG, quotafs passes the truncate on to its backing directory
    (16 TiB on ext4 with 4 KiB blocks, more on tmpfs or xfs). The harness reports it."""
    tib = 1 << 40
    steps = run(fresh, Create("a"), Truncate("a", 3 * tib), Truncate("a", 5 * tib))
    assert (steps[1].reference.error, steps[1].candidate.error) == (None, None)
    last = steps[2]
    assert last.reference.error == "EFBIG"
    if last.candidate.error is not None:
        pytest.skip(f"quotafs's backing refuses 5 TiB files too: {last.candidate}")
    assert [d.aspect for d in fresh.differences] == ["result", "tree at 'a'"]
    fresh.differences.clear()


def test_difference_limit_rounded_to_blocks(pair: Pair) -> None:
    """quotafs's limit is ext4's write capacity, which need not be a multiple of 4 KiB;
    quotafs hands out whole blocks, so up to 4 KiB - 1 of it is never usable."""
    assert pair.started == [], "\n".join(map(str, pair.started))
    assert pair.diff.capacity is not None
    ext4_free, quotafs_free = pair.diff.capacity
    assert ext4_free == pair.ext4.write_capacity_hint
    assert quotafs_free == pair.ext4.write_capacity_hint // 4096 * 4096


def test_difference_whole_folio_refusal(fresh: Differential) -> None:
    """Near the limit ext4 refuses a write(2) whose page-cache folio does not fit — whole,
    though part of it would fit — and quotafs refuses the write request whole: with the
    write on a folio boundary both answer ENOSPC and write nothing. Off the boundary ext4
    serves the write in smaller folios and stores those that fit (a short count), where
    quotafs still refuses its one request: both end at the limit, the harness explains it."""
    assert fresh.capacity is not None
    room = fresh.capacity[1]
    steps = run(fresh, Create("a"), Write("a", 0, room - 200 * KiB, 1),
                Write("a", 2 * MiB, 512 * KiB, 2), Write("a", 2 * MiB + 4 * KiB, 512 * KiB, 3))
    aligned, unaligned = steps[-2], steps[-1]
    assert aligned.reference == aligned.candidate
    assert (aligned.candidate.error, aligned.candidate.value) == ("ENOSPC", None)
    assert (unaligned.candidate.error, unaligned.candidate.value) == ("ENOSPC", None)
    assert unaligned.reference.value is not None
    assert 0 < unaligned.reference.value <= 200 * KiB
    assert fresh.differences == [], fresh.report()
    assert [d.step for d in _explained(fresh, "enospc")] == [4]


def test_difference_ext4_keeps_refused_reservations(fresh: Differential) -> None:
    """A write(2) ext4 refuses inside the file (here: into a hole) still leaves the
    reservations of the refused folio's first blocks behind: they read as zeros, count as
    data (SEEK_DATA) and take the free space until the file is truncated or removed.
    quotafs keeps nothing of a refused write."""
    assert fresh.capacity is not None
    room = fresh.capacity[1]
    run(fresh, Create("a"), Write("a", 0, room - 64 * KiB, 1), Truncate("a", 4 * MiB))
    ext4_file = os.path.join(fresh.reference.root, "a")
    fd = os.open(ext4_file, os.O_RDWR)
    try:
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, b"x" * 256 * KiB, 2 * MiB)
        assert refused.value.errno == errno.ENOSPC
        assert os.lseek(fd, 2 * MiB, os.SEEK_DATA) == 2 * MiB  # blocks reserved...
        assert not any(os.pread(fd, 64 * KiB, 2 * MiB))  # ...holding nothing written
        assert fresh.reference.free() < 4 * KiB  # ...and the free space is gone
    finally:
        os.close(fd)
    quota_file = os.path.join(fresh.candidate.root, "a")
    free = fresh.candidate.free()
    fd = os.open(quota_file, os.O_RDWR)
    try:
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, b"x" * 256 * KiB, 2 * MiB)  # refused whole, nothing kept
        assert refused.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert 60 * KiB < fresh.candidate.free() == free


def test_difference_mmap_folio_reservation(fresh: Differential) -> None:
    """Through a shared mapping ext4 reserves a whole folio at page_mkwrite and dies by
    SIGBUS when it does not fit, keeping the reservation of the blocks that did; quotafs
    (--mmap-sigbus) reserves page by page. Both die by SIGBUS within a folio of full;
    ext4's kept reservation shows as blocks of zeros the harness explains."""
    assert fresh.capacity is not None
    steps = run(fresh, Create("a"), Truncate("a", 4 * MiB), MmapWrite("a", 0, 4 * MiB, 3))
    last = steps[-1]
    assert (last.reference.signal, last.candidate.signal) == ("SIGBUS", "SIGBUS")
    assert last.reference.value is not None and last.candidate.value is not None
    assert abs(last.reference.value - last.candidate.value) <= 128 * KiB
    assert fresh.differences == [], fresh.report()
    assert "read as zeros" in _explained(fresh, "accounting")[0].note


def test_difference_release_is_asynchronous(pair: Pair, fresh: Differential) -> None:
    """FUSE sends RELEASE after close(2) has returned: the blocks of an unlinked file that
    was held open come back on ext4 at the close, on quotafs when the daemon has handled
    the release (a delay rule makes that moment late enough to see). The harness waits
    for quotafs to have handled every release before it compares."""
    run(fresh, Create("a"), Open(0, "a"), Unlink("a"), HandleWrite(0, 0, 512 * KiB, 1))
    fd = fresh.cand.handles.pop(0)
    ext4_fd = fresh.ref.handles.pop(0)
    assert fresh.capacity is not None
    ext4_room, quotafs_room = fresh.capacity
    rule = pair.quota.add_fault("release", delay="2s", times=1)
    try:
        os.close(ext4_fd)
        os.close(fd)
        assert fresh.reference.free() == ext4_room
        assert fresh.candidate.free() == quotafs_room - 512 * KiB  # not yet
        assert wait_until(lambda: fresh.candidate.free() == quotafs_room, timeout=10)
    finally:
        pair.quota.clear_faults(rule)
    assert fresh.run(Statvfs()).free == (ext4_room, quotafs_room)
    assert fresh.differences == [], fresh.report()


def test_difference_mmap_sigbus_mode_reads_reserve(fresh: Differential) -> None:
    """quotafs --mmap-sigbus reserves the holes read through a writable descriptor (it
    cannot tell a read(2) from a mapping's page-in): free space drops on quotafs, not on
    ext4, until the descriptor is closed. The harness reads back only through O_RDONLY
    descriptors; this is the documented cost of the mode."""
    run(fresh, Create("a"), Open(0, "a"), HandleTruncate(0, 256 * KiB))
    assert fresh.capacity is not None
    assert os.pread(fresh.ref.handles[0], 256 * KiB, 0) == bytes(256 * KiB)
    assert os.pread(fresh.cand.handles[0], 256 * KiB, 0) == bytes(256 * KiB)
    assert fresh.reference.free() == fresh.capacity[0]
    assert fresh.candidate.free() == fresh.capacity[1] - 256 * KiB
    step = fresh.run(Close(0))
    assert step.free == fresh.capacity
    assert fresh.differences == [], fresh.report()


@pytest.fixture(scope="module")
def default_pair() -> Iterator[Pair]:
    """ext4 and a quotafs in its default mmap mode (plain FUSE semantics)."""
    with open_pair() as p:
        yield p


def test_difference_default_mode_mmap_defers_enospc(default_pair: Pair) -> None:
    """In its default mode quotafs never stops an mmap writer: every store succeeds, the
    pages that do not fit are refused at writeback and msync reports ENOSPC (ext4 kills
    the writer by SIGBUS). Documented in "mmap: where ext4 and plain FUSE part ways";
    the harness reports it as a difference, since acknowledged stores are lost. Writeback
    sends 1 MiB requests and quotafs refuses the one that does not fit whole, so the
    stores from 1 MiB on are not on disk, and the room they would have taken stays free."""
    diff = default_pair.diff
    diff.reset()
    try:
        steps = run(diff, Create("a"), Truncate("a", 4 * MiB), MmapWrite("a", 0, 4 * MiB, 3))
    finally:
        diff.close()
    last = steps[-1]
    assert (last.reference.signal, last.reference.error) == ("SIGBUS", None)
    assert (last.candidate.signal, last.candidate.error) == (None, "ENOSPC")
    assert (last.candidate.call, last.candidate.value) == ("msync", 4 * MiB)
    aspects = [d.aspect for d in diff.differences]
    assert aspects == ["enospc", "contents", "accounting", "statvfs free"], diff.report()
    assert "ENOSPC deferred to msync" in diff.differences[0].note
    assert "first different byte at 1,048,576 " in diff.differences[1].note
    diff.reset()
