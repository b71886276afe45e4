"""Write requests that do not fit whole, on real mounts: refused whole with ENOSPC.

A short count is safe only for a buffered write(2): the kernel's writeback of dirty mmap
pages reads only the error of a reply and marks the pages it was not told about clean
(DESIGN.md fact 6), and its direct-I/O path turns a short count into EIO (fact 7). So
quotafs refuses a request that does not fit whole, and every refusal is an event.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from quotafs.client.api import ext4_loop, mounted
from tests.conftest import MountFactory, fuse_unusable_reason, needs_fuse

KiB = 1024
MiB = 1024 * KiB
PAGE = 4096

# Stores into a shared mapping page by page (printing each page it stored), then msync
# and fsync; prints what each of the two answered. A store killed by SIGBUS ends it.
_MAPPER = """
import json, mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, size)
m = mmap.mmap(fd, size)
for page in range(size // 4096):
    m[page * 4096:(page + 1) * 4096] = b"A" * 4096
    print("stored", page, flush=True)
answers = {}
for name, call in (("msync", m.flush), ("fsync", lambda: os.fsync(fd))):
    try:
        call()
        answers[name] = None
    except OSError as exc:
        answers[name] = exc.errno
print(json.dumps(answers), flush=True)
"""


def store_through_mapping(path: str, size: int) -> tuple[int, dict[str, int | None] | None,
                                                         int]:
    """(pages stored, {"msync": errno or None, "fsync": ...} or None if killed, returncode)."""
    proc = subprocess.run([sys.executable, "-c", _MAPPER, path, str(size)],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    stored = sum(1 for line in lines if line.startswith("stored "))
    answers = json.loads(lines[-1]) if proc.returncode == 0 else None
    return stored, answers, proc.returncode


def quota_refusals(events: list[dict[str, Any]], op: str, path: str) -> int:
    return sum(1 for e in events
               if (e["kind"], e["op"], e["path"], e["errno"]) == ("quota", op, path, "ENOSPC"))


def write_errno(call: Callable[[], int]) -> int | None:
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


@needs_fuse
@pytest.mark.parametrize("sigbus", [False, True], ids=["default", "mmap-sigbus"])
def test_mmap_stores_are_on_disk_or_msync_reports_enospc(tmp_path: Path, sigbus: bool) -> None:
    """The issue's reproduction: 8 KiB of room, a 16 KiB mapping stored whole."""
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "ballast").write_bytes(os.urandom(MiB - 8 * KiB))
    with mounted(limit="1M", backing=str(backing), mmap_sigbus=sigbus) as m:
        stored, answers, code = store_through_mapping(os.path.join(m.path, "f"), 16 * KiB)
        events = m.events()
    on_disk = (backing / "f").read_bytes()
    intact = on_disk[:stored * PAGE] == b"A" * stored * PAGE
    if sigbus:
        # ext4-faithful: the store that does not fit is killed; what was stored is kept.
        assert (code, stored) == (-signal.SIGBUS, 2)  # at the third page
        assert intact
        return
    assert code == 0 and answers is not None and stored == 4
    reported = [e for e in answers.values() if e is not None]
    if not reported:
        assert intact, "msync and fsync returned 0 but stored pages are not on disk"
        return
    assert reported[0] == errno.ENOSPC
    assert quota_refusals(events, "write", "/f") >= 1, events


@needs_fuse
def test_mmap_writeback_of_many_requests_never_loses_silently(tmp_path: Path) -> None:
    """Writeback in 1 MiB requests, the room ending inside the second: the first may be
    stored, the second is refused whole and msync says so."""
    backing = tmp_path / "backing"
    backing.mkdir()
    with mounted(limit="1536K", backing=str(backing)) as m:
        stored, answers, code = store_through_mapping(os.path.join(m.path, "f"), 2 * MiB)
        events = m.events()
        used = m.usage()["used"]
    assert (code, stored) == (0, 512)
    assert answers is not None and answers["msync"] == errno.ENOSPC
    assert quota_refusals(events, "write", "/f") >= 1
    on_disk = (backing / "f").read_bytes()
    pages = [on_disk[i:i + PAGE] for i in range(0, len(on_disk), PAGE)]
    assert set(pages) <= {b"A" * PAGE, bytes(PAGE)}  # a page is stored whole or not at all
    assert used == pages.count(b"A" * PAGE) * PAGE <= 1536 * KiB  # charged as stored


@pytest.mark.parametrize("accounting", ["blocks", "apparent"])
def test_write_that_does_not_fit_whole_is_refused_whole(mount_factory: MountFactory,
                                                         accounting: str) -> None:
    """Page-aligned writes, so that each write(2) is one request: 8 KiB of room."""
    m = mount_factory("1M", accounting=accounting)
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        first = MiB - 2 * PAGE
        assert os.write(fd, b"a" * first) == first
        assert write_errno(lambda: os.write(fd, b"b" * 3 * PAGE)) == errno.ENOSPC
        assert write_errno(lambda: os.write(fd, b"c" * (2 * PAGE + 1))) == errno.ENOSPC
        assert os.write(fd, b"d" * 2 * PAGE) == 2 * PAGE  # what fits whole is written
        assert write_errno(lambda: os.write(fd, b"e")) == errno.ENOSPC
    finally:
        os.close(fd)
    assert (Path(m.backing) / "f").read_bytes() == b"a" * first + b"d" * 2 * PAGE
    events = m.events()
    assert quota_refusals(events, "write", "/f") == 3, events
    usage = m.usage()
    assert (usage["used"], usage["enospc_count"]) == (MiB, 3)


def test_large_write_is_split_into_requests_each_refused_whole(
        mount_factory: MountFactory) -> None:
    """The kernel sends a write(2) in requests of at most 1 MiB (max_write): those that
    fit are stored and counted, the first that does not ends the call there."""
    m = mount_factory("2560K")
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"w" * 4 * MiB) == 2 * MiB
        assert write_errno(lambda: os.write(fd, b"w" * MiB)) == errno.ENOSPC
        assert os.write(fd, b"v" * (MiB // 2)) == MiB // 2
    finally:
        os.close(fd)
    assert (Path(m.backing) / "f").read_bytes() == b"w" * 2 * MiB + b"v" * (MiB // 2)
    assert quota_refusals(m.events(), "write", "/f") == 2


# -- O_DIRECT: a short count would be EIO and a truncate back ------------------------------

def leave_free(root: str, room: int) -> None:
    """Fill the filesystem at `root` with page-sized writes until ENOSPC, then give back
    `room` bytes: what a writer can store there is then `room` (plus less than a page)."""
    ballast = os.path.join(root, "ballast")
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while write_errno(lambda: os.write(fd, b"x" * PAGE)) is None:
            pass
        os.fsync(fd)
        os.ftruncate(fd, os.fstat(fd).st_size - room)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.sync()


def direct_write(path: str, size: int, offset: int) -> int | None:
    """One O_DIRECT pwrite of `size` bytes of b"D" (page-aligned buffer); its errno."""
    buf = mmap.mmap(-1, size)
    buf.write(b"D" * size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        return write_errno(lambda: os.pwritev(fd, [buf], offset))
    finally:
        os.close(fd)
        buf.close()


@pytest.fixture(params=["quotafs-blocks", "quotafs-apparent", "ext4"])
def full_but_64k(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A quotafs (either accounting) or a loop-ext4 with 64 KiB of room left."""
    if request.param == "ext4":
        if os.geteuid() != 0:
            pytest.skip("the ext4 reference needs root")
        target = ext4_loop("8M", workdir=str(tmp_path))
    else:
        if (reason := fuse_unusable_reason()) is not None:
            pytest.skip(reason)
        target = mounted(limit="1M", accounting=request.param.split("-")[1])
    with target as m:
        leave_free(m.path, 64 * KiB)
        yield m


def test_o_direct_write_that_does_not_fit_is_enospc(full_but_64k: Any) -> None:
    """With 64 KiB free one 128 KiB O_DIRECT write answers ENOSPC (ext4 does; the short
    count of before was EIO) and leaves nothing in the file; an existing file keeps its
    content and size; 64 KiB still fit."""
    m = full_but_64k
    new, old = os.path.join(m.path, "new"), os.path.join(m.path, "old")
    assert direct_write(new, 128 * KiB, 0) == errno.ENOSPC
    assert os.path.getsize(new) == 0
    with open(old, "wb") as f:
        f.write(b"E" * 8192)
    assert direct_write(old, 128 * KiB, 8192) == errno.ENOSPC
    assert Path(old).read_bytes() == b"E" * 8192
    os.unlink(old)
    assert direct_write(new, 64 * KiB, 0) is None
    assert Path(new).read_bytes() == b"D" * 64 * KiB
    if m.pid is not None:  # quotafs: each refusal is an event
        events = m.events()
        assert quota_refusals(events, "write", "/new") == 1, events
        assert quota_refusals(events, "write", "/old") == 1, events



@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a backing filesystem that itself fills up in mid-request."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "quotafs-test", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_backing_that_fills_mid_request_is_an_error_not_a_short_count(
        small_tmpfs: Path) -> None:
    """No limit, but the backing itself has 64 KiB: a 128 KiB O_DIRECT write gets the
    backing's ENOSPC (the short count that pwrite gave was passed on, and the kernel made it
    EIO), and the kernel's truncate back to the old size leaves nothing stored or charged."""
    if (reason := fuse_unusable_reason()) is not None:
        pytest.skip(reason)
    with mounted(limit=None, backing=str(small_tmpfs)) as m:
        path = os.path.join(m.path, "f")
        assert direct_write(path, 128 * KiB, 0) == errno.ENOSPC
        assert (small_tmpfs / "f").stat().st_size == 0
        assert m.usage()["used"] == 0


@pytest.mark.parametrize("offset", [5 * PAGE, 5 * PAGE + 100],
                         ids=["inside-one-block", "across-two-blocks"])
def test_a_backing_that_stores_part_of_a_write_gets_the_rest_too(
        mount_factory: MountFactory, offset: int) -> None:
    """The backing is itself a quotafs mount whose next write stores 1,000 bytes and says
    so (a short-write rule): the outer daemon writes the rest, so the program's 4 KiB
    pwrite into a hole returns 4096, the data reads back whole, and the outer ledger holds
    the blocks it touched. A short count passed on would be data lost for mmap writeback."""
    inner = mount_factory(None)
    outer = mount_factory("1M", backing=inner.path)
    data = os.urandom(PAGE)
    path = os.path.join(outer.path, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        inner.add_fault("write", short_write=1000, times=1)
        assert os.pwrite(fd, data, offset) == PAGE
        assert os.pread(fd, PAGE, offset) == data
    finally:
        os.close(fd)
    assert [r.fired for r in inner.faults()] == [1]
    with open(os.path.join(inner.path, "f"), "rb") as f:
        assert f.read() == bytes(offset) + data
    blocks = (offset + PAGE - 1) // PAGE - offset // PAGE + 1
    assert outer.usage()["used"] == blocks * PAGE
