"""The workloads: each measures one number, higher is better, in a directory of a target.

fio runs the three block workloads where it is installed (its own runtime, which includes
the final fsync); a Python loop with the same pattern replaces it otherwise. The others
are Python, the same code on every target. Untimed set-up (laying out the file to read,
building the tree to walk) happens outside the meter; caches are written back before
every timed part, and dropped before the cold ones (read, walk).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from bench.system import FOREIGN, BenchError, cpu_seconds, drop_caches

MiB = 1024 * 1024
KiB = 1024


@dataclass(frozen=True)
class Sizes:
    seq: int  # sequential write / read file size
    rand: int  # random 4 KiB write file size
    mmap: int  # mmap writer file size
    files: int  # create+stat+unlink: number of files
    tree_dirs: int  # tree walk: directories ...
    tree_files: int  # ... of this many files each
    sqlite_txns: int  # SQLite workloads (bench/apps.py): transactions
    tar_files: int  # tar: files in the archive
    git_files: int  # git clone: files in the repository


FULL = Sizes(seq=256 * MiB, rand=64 * MiB, mmap=128 * MiB, files=2000, tree_dirs=40,
             tree_files=100, sqlite_txns=300, tar_files=3000, git_files=500)
SMOKE = Sizes(seq=8 * MiB, rand=2 * MiB, mmap=8 * MiB, files=100, tree_dirs=4, tree_files=25,
              sqlite_txns=20, tar_files=200, git_files=50)
WARMUP = Sizes(seq=4 * MiB, rand=1 * MiB, mmap=4 * MiB, files=50, tree_dirs=2, tree_files=10,
               sqlite_txns=10, tar_files=100, git_files=20)


class Meter:
    """Wall time and daemon CPU (utime + stime) of the timed part of a workload."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.seconds = 0.0
        self.cpu: float | None = None
        self.foreign = 0.0  # CPU seconds of other people's processes meanwhile
        self._t0 = 0.0
        self._c0 = 0.0
        self._f0 = 0.0

    def __enter__(self) -> Meter:
        self._f0 = FOREIGN.snapshot()
        if self.pid is not None:
            self._c0 = cpu_seconds(self.pid)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.pid is not None:
            self.cpu = cpu_seconds(self.pid) - self._c0
        self.foreign = FOREIGN.snapshot() - self._f0

    def sample(self, value: float, seconds: float, ops: float) -> Sample:
        return Sample(value, seconds, self.seconds, ops, self.cpu,
                      self.foreign / self.seconds if self.seconds > 0 else 0.0)


@dataclass
class Sample:
    value: float  # in the workload's unit, higher is better
    seconds: float  # the measured time behind `value`
    wall: float  # wall time of the timed part (fio: including its start-up)
    ops: float  # units of work, for daemon CPU per op
    daemon_cpu: float | None  # seconds of daemon CPU during the timed part
    foreign_load: float = 0.0  # cores used by processes not ours during the timed part


@dataclass
class Context:
    directory: str  # a fresh directory on the target, removed after the run
    sizes: Sizes
    engine: str  # "fio" or "python"
    pid: int | None  # the daemon, for CPU accounting (None: native)
    cold: bool  # drop caches before cold parts
    pretouch_bytes: int = 0  # memory to touch and free right before the timed part

    def meter(self) -> Meter:
        if self.pretouch_bytes:
            _pretouch(self.pretouch_bytes)
        return Meter(self.pid)


def _pretouch(nbytes: int) -> None:
    """Touch `nbytes` of fresh memory and free it again.

    This VM hands pages that stay free for about a second back to the host (free page
    reporting), and the first touch of such a page costs a fault in the host. A workload
    that allocates hundreds of MiB of page cache then runs at a third of its speed in
    some rounds and not in others, whatever the target. Touching the memory right before
    the timed part gives every target host-backed pages to allocate from.
    """
    page = mmap.PAGESIZE
    buf = bytearray(nbytes)
    buf[::page] = b"\x01" * len(range(0, nbytes, page))
    del buf


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str
    op: str  # what one op is, for "daemon CPU per op"
    goal: float | None  # minimum ratio to native
    run: Callable[[Context], Sample]
    prepare: Callable[[str, Sizes], None] | None = None  # once per target, untimed
    uses_fio: bool = False
    memory_heavy: bool = False  # allocates page cache of the order of Sizes.seq: pretouch
    reads_back: bool = False  # reads what it wrote: needs a target that stores data


# -- fio ----------------------------------------------------------------------------------------

def _fio(name: str, path: str, rw: str, bs: int, size: int,
         end_fsync: bool, invalidate: bool = True) -> tuple[float, float]:
    """Run one fio job; return (bytes, seconds) from fio's own accounting. `invalidate`:
    fio drops the file's cached pages first (POSIX_FADV_DONTNEED)."""
    cmd = ["fio", f"--name={name}", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--ioengine=psync", "--direct=0", "--fallocate=none",
           "--randrepeat=1", f"--invalidate={int(invalidate)}", "--output-format=json",
           "--thread",
           f"--end_fsync={int(end_fsync)}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise BenchError(f"fio {name}: {(result.stderr.strip() or result.stdout)[-300:]}")
    out = result.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    direction = "read" if rw in ("read", "randread") else "write"
    io_bytes = float(job[direction]["io_bytes"])
    runtime_ms = float(job[direction]["runtime"])
    if io_bytes < size or runtime_ms <= 0:
        raise BenchError(f"fio {name}: did {io_bytes:.0f} of {size} bytes in {runtime_ms} ms")
    return io_bytes, runtime_ms / 1000


def _pattern(size: int) -> bytes:
    return random.Random(1).randbytes(size)


# -- sequential write ---------------------------------------------------------------------------

def _seqwrite(ctx: Context) -> Sample:
    path = os.path.join(ctx.directory, "seq.bin")
    size = ctx.sizes.seq
    os.sync()
    if ctx.engine == "fio":
        with ctx.meter() as m:
            nbytes, seconds = _fio("seqwrite", path, "write", MiB, size, end_fsync=True)
    else:
        buf = _pattern(MiB)
        with ctx.meter() as m:
            write_file(path, size, buf)
        nbytes, seconds = float(size), m.seconds
    return m.sample(nbytes / MiB / seconds, seconds, nbytes / MiB)


# -- random 4 KiB writes ------------------------------------------------------------------------

def _randwrite(ctx: Context) -> Sample:
    path = os.path.join(ctx.directory, "rand.bin")
    size = ctx.sizes.rand
    block = 4 * KiB
    os.sync()
    if ctx.engine == "fio":
        with ctx.meter() as m:
            nbytes, seconds = _fio("randwrite", path, "randwrite", block, size, end_fsync=True)
    else:
        order = list(range(size // block))
        random.Random(1).shuffle(order)
        buf = _pattern(block)
        with ctx.meter() as m:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, size)
                for index in order:
                    os.pwrite(fd, buf, index * block)
                os.fsync(fd)
            finally:
                os.close(fd)
        nbytes, seconds = float(size), m.seconds
    writes = nbytes / block
    return m.sample(writes / seconds, seconds, writes)


# -- sequential read ----------------------------------------------------------------------------

def write_file(path: str, size: int, buf: bytes | None = None) -> None:
    """Write `size` bytes in 1 MiB write(2)s of `buf` (default: the bench's pattern), then
    fsync."""
    if buf is None:
        buf = _pattern(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < size:
            done += os.write(fd, buf[:min(MiB, size - done)])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path: str) -> float:
    """Read the file in 1 MiB calls; the number of bytes read."""
    fd = os.open(path, os.O_RDONLY)
    nbytes = 0.0
    try:
        while chunk := os.read(fd, MiB):
            nbytes += len(chunk)
    finally:
        os.close(fd)
    return nbytes


def _read_back(ctx: Context, cold: bool) -> Sample:
    path = os.path.join(ctx.directory, "read.bin")
    size = ctx.sizes.seq
    write_file(path, size)  # untimed: through the target, so the daemon accounts it
    if cold:
        drop_caches()
    else:
        os.sync()
        read_all(path)  # untimed: now the file has been read once since it was written
    if ctx.engine == "fio":
        with ctx.meter() as m:
            nbytes, seconds = _fio("seqread", path, "read", MiB, size, end_fsync=False,
                                   invalidate=cold)
    else:
        with ctx.meter() as m:
            nbytes = read_all(path)
        seconds = m.seconds
    return m.sample(nbytes / MiB / seconds, seconds, nbytes / MiB)


def _seqread(ctx: Context) -> Sample:
    """Read a file that is no longer in any cache (the daemon serves every byte)."""
    return _read_back(ctx, cold=ctx.cold)


def _seqread_warm(ctx: Context) -> Sample:
    """Read a file a second time: what the page cache kept across opens is used. (The
    first read after writing goes to a FUSE daemon whatever it asks for: the kernel
    drops a FUSE file's pages when it sees the mtime that the writes changed.)"""
    return _read_back(ctx, cold=False)


# -- create + stat + unlink ---------------------------------------------------------------------

def _files(ctx: Context) -> Sample:
    count = ctx.sizes.files
    data = _pattern(4 * KiB)
    names = [os.path.join(ctx.directory, f"f{i:06d}") for i in range(count)]
    os.sync()
    with ctx.meter() as m:
        for name in names:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        for name in names:
            os.stat(name)
        for name in names:
            os.unlink(name)
    return m.sample(count / m.seconds, m.seconds, count)


# -- tree walk ----------------------------------------------------------------------------------

TREE = "tree"


def _prepare_tree(target_path: str, sizes: Sizes) -> None:
    """D directories of F small files each, plus a nested level: built once per target,
    through the target, before the rounds."""
    top = os.path.join(target_path, TREE)
    shutil.rmtree(top, ignore_errors=True)
    os.makedirs(top)
    data = b"x" * 100
    for d in range(sizes.tree_dirs):
        directory = os.path.join(top, f"d{d:04d}")
        nested = os.path.join(directory, "sub")
        os.makedirs(nested)
        for i in range(sizes.tree_files):
            where = nested if i % 4 == 0 else directory
            with open(os.path.join(where, f"f{i:05d}"), "wb") as f:
                f.write(data)
    os.sync()


def _walk(ctx: Context) -> Sample:
    top = os.path.join(os.path.dirname(ctx.directory), TREE)
    if ctx.cold:
        drop_caches()
    entries = 0
    with ctx.meter() as m:
        for root, dirs, files in os.walk(top):
            for name in dirs:
                os.lstat(os.path.join(root, name))
            for name in files:
                os.lstat(os.path.join(root, name))
            entries += len(dirs) + len(files)
    if entries < ctx.sizes.tree_dirs * ctx.sizes.tree_files:
        raise BenchError(f"tree walk saw {entries} entries: the tree is incomplete")
    return m.sample(entries / m.seconds, m.seconds, entries)


# -- mmap writer --------------------------------------------------------------------------------

def _mmap(ctx: Context) -> Sample:
    """The seed's writer: a sparse file mapped shared, written in 1 MiB chunks, msync'ed."""
    path = os.path.join(ctx.directory, "mmap.bin")
    size = ctx.sizes.mmap
    chunk = _pattern(MiB)
    os.sync()
    with ctx.meter() as m:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                for off in range(0, size, MiB):
                    n = min(MiB, size - off)
                    mm[off:off + n] = chunk[:n]
                mm.flush()  # msync(MS_SYNC): dirty pages reach the filesystem, errors here
        finally:
            os.close(fd)
    return m.sample(size / MiB / m.seconds, m.seconds, size / MiB)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("seqwrite", "seq write 1 MiB + fsync", "MiB/s", "MiB", 0.8, _seqwrite,
             uses_fio=True, memory_heavy=True),
    Workload("randwrite", "random write 4 KiB + fsync", "IOPS", "4K write", 0.2, _randwrite,
             uses_fio=True),
    Workload("seqread", "seq read 1 MiB (cold)", "MiB/s", "MiB", 0.9, _seqread, uses_fio=True,
             memory_heavy=True),
    Workload("seqread-warm", "seq re-read 1 MiB (warm)", "MiB/s", "MiB", 0.9, _seqread_warm,
             uses_fio=True, memory_heavy=True),
    Workload("files", "create+stat+unlink 4 KiB files", "files/s", "file", 0.08, _files),
    Workload("walk", "tree walk: readdir + lstat (cold)", "entries/s", "entry", None, _walk,
             prepare=_prepare_tree),
    Workload("mmap", "mmap writer 1 MiB chunks + msync", "MiB/s", "MiB", 0.45, _mmap,
             memory_heavy=True),
]}
