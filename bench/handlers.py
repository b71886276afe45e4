"""The write path's handlers called in-process, no FUSE: thread CPU time per call.

    PYTHONPATH=TREE python bench/handlers.py [--calls N] [--rounds R] [--backing DIR]

For each request the kernel sends for a random 4 KiB write + fsync (WRITE, into holes of
a fresh sparse file, of one closed and opened again, and over the same blocks again;
GETXATTR security.capability; FSYNC), and for the 1 MiB WRITEs of a sequential writer
(appends to a file emptied before each round, its pages allocated beforehand), the least
over R rounds of N calls (32 for the appends) of QuotaFS's handler, of the pyfuse3
example's (writes into holes, appends), and of the bare syscall the handler makes; the
filesystem built by the daemon's own factory on a backing directory (default: a fresh
directory below /dev/shm, a tmpfs, so that the backing's own cost stays small).
Thread CPU time mostly does not see other processes; run two trees alternately (A/B) to
compare them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pyfuse3
import trio

from tests.operations.conftest import new_filesystem
from tests.operations.driver import Ctx

BLOCK = 4096
FILE_BLOCKS = 16_384  # a 64 MiB sparse file
APPEND = 1 << 20  # the WRITE requests of a sequential writer (FUSE's largest)
APPENDS = 32  # per round: a 32 MiB file, emptied before each round


def _run(coro: Coroutine[Any, Any, Any]) -> None:
    """Drive a handler that never awaits (no fault rule is live) without a trio loop."""
    try:
        coro.send(None)
    except StopIteration:
        return
    except pyfuse3.FUSEError:
        return
    raise RuntimeError("a handler awaited")


async def _example_write(fd: int, off: int, buf: bytes) -> int:
    """The pyfuse3 example's (passthroughfs.py) write handler, as it is there."""
    os.lseek(fd, off, os.SEEK_SET)
    return os.write(fd, buf)


def _least(rounds: int, calls: int, one: Callable[[int], object],
           before: Callable[[], None] = lambda: None) -> float:
    best = float("inf")
    for _ in range(rounds):
        before()
        start = time.thread_time_ns()
        for i in range(calls):
            one(i)
        best = min(best, (time.thread_time_ns() - start) / calls / 1000)
    return round(best, 2)


class _Files:
    """A fresh sparse file per round, made through the handlers (as a program's), and one
    made directly in the backing for the bare syscalls."""

    def __init__(self, fs: Any, backing: str) -> None:
        self.fs, self.backing, self.round = fs, backing, 0
        self.fh = self.inode = self.fd = -1
        self.opened: list[Any] = []

    def fresh(self) -> None:
        self.round += 1
        f = trio.run(self.fs.create, f"/data-{self.round}")
        self.opened.append(f)
        self.fh, self.inode = f.fh, f.inode

    def reopened(self) -> None:
        """A sparse file made, closed and opened again, as a program's existing file."""
        self.fresh()
        last = (FILE_BLOCKS - 1) * BLOCK  # data at the end only: the rest is holes
        _run(self.fs.ops.write(self.fh, last, os.urandom(BLOCK)))
        f = self.opened.pop()
        trio.run(self.fs.release, f)
        f = trio.run(self.fs.open, f"/data-{self.round}")
        self.opened.append(f)
        self.fh = f.fh

    def fresh_bare(self) -> None:
        self.round += 1
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(os.path.join(self.backing, f"bare-{self.round}"),
                          os.O_RDWR | os.O_CREAT, 0o644)

    def close(self) -> None:
        for f in self.opened:
            trio.run(self.fs.release, f)
        if self.fd >= 0:
            os.close(self.fd)


class _Appends:
    """One file made through the handlers and one in the backing, emptied before each
    round (through the handlers for the first: its charges and blocks go with it), then
    given their pages past the end (fallocate KEEP_SIZE, behind the handlers' back): an
    append then costs the copy, not the allocation of 256 tmpfs pages, whose spread
    (tens of µs) would hide the handler's own few."""

    def __init__(self, fs: Any, backing: str) -> None:
        self.fs = fs
        self.file = trio.run(fs.create, "/appends")
        self.backing_fd = os.open(os.path.join(backing, "appends"), os.O_RDWR)
        self.fd = os.open(os.path.join(backing, "bare-appends"), os.O_RDWR | os.O_CREAT, 0o644)

    def empty(self) -> None:
        trio.run(self.fs.truncate, self.file, 0)
        _preallocate(self.backing_fd)

    def empty_bare(self) -> None:
        os.ftruncate(self.fd, 0)
        _preallocate(self.fd)

    def close(self) -> None:
        trio.run(self.fs.truncate, self.file, 0)
        trio.run(self.fs.release, self.file)
        os.close(self.backing_fd)
        os.close(self.fd)


FALLOC_FL_KEEP_SIZE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _preallocate(fd: int) -> None:
    """Best effort: a --backing without fallocate measures the allocation too."""
    _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, APPENDS * APPEND)


def _append_figures(fs: Any, backing: str, rounds: int) -> dict[str, float]:
    """1 MiB WRITE requests at the end of a file, as a sequential writer sends them."""
    appends, buf, ops = _Appends(fs, backing), os.urandom(APPEND), fs.ops

    def write(i: int) -> None:
        _run(ops.write(appends.file.fh, i * APPEND, buf))

    def example_write(i: int) -> None:
        _run(_example_write(appends.fd, i * APPEND, buf))

    results = {
        "append_1m_us": _least(rounds, APPENDS, write, appends.empty),
        "example_append_1m_us": _least(rounds, APPENDS, example_write, appends.empty_bare),
        "pwrite_append_1m_us": _least(rounds, APPENDS, lambda i: os.pwrite(
            appends.fd, buf, i * APPEND), appends.empty_bare),
    }
    appends.close()
    return results


def measure(backing: str, calls: int, rounds: int) -> dict[str, float]:
    fs = new_filesystem(backing)
    ops: Any = fs.ops
    files = _Files(fs, backing)
    ctx = fs.ctx
    other = Ctx(65534, 65534, os.getpid())
    buf = os.urandom(BLOCK)
    # Distinct blocks: each write of a round allocates one (a random write into a hole).
    offsets = [b * BLOCK for b in random.sample(range(FILE_BLOCKS), calls)]
    cap = b"security.capability"

    def write(i: int) -> None:
        _run(ops.write(files.fh, offsets[i], buf))

    def pwrite(i: int) -> None:
        os.pwrite(files.fd, buf, offsets[i])

    def example_write(i: int) -> None:
        _run(_example_write(files.fd, offsets[i], buf))

    results = {
        "write_into_holes_us": _least(rounds, calls, write, files.fresh),
        "pwrite_into_holes_us": _least(rounds, calls, pwrite, files.fresh_bare),
        "example_write_into_holes_us": _least(rounds, calls, example_write, files.fresh_bare),
        # The last file again, at the same offsets: every block holds data now.
        "overwrite_us": _least(rounds, calls, write),
        "pwrite_overwrite_us": _least(rounds, calls, pwrite),
        "write_into_holes_reopened_us": _least(rounds, calls, write, files.reopened),
        "getxattr_capability_us": _least(rounds, calls,
                                         lambda i: _run(ops.getxattr(files.inode, cap, ctx))),
        # Another user's write(2) on an --allow-other mount (a root daemon switches ids).
        "getxattr_capability_other_user_us": _least(
            rounds, calls, lambda i: _run(ops.getxattr(files.inode, cap, other))),
        "fsync_us": _least(rounds, calls, lambda i: _run(ops.fsync(files.fh, False))),
        "fsync_alone_us": _least(rounds, calls, lambda i: os.fsync(files.fd)),
        **_append_figures(fs, backing, rounds),
    }
    files.close()
    trio.run(fs.close)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=16_384, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the least is kept")
    parser.add_argument("--backing", help="parent of the backing directory (/dev/shm)")
    args = parser.parse_args()
    parent = tempfile.mkdtemp(dir=args.backing or "/dev/shm")
    try:
        backing = os.path.join(parent, "backing")
        os.mkdir(backing)
        print(json.dumps(measure(backing, args.calls, args.rounds)))
    finally:
        shutil.rmtree(parent)


if __name__ == "__main__":
    main()
