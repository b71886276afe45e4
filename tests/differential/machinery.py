"""Differential testing: the same operations on a reference filesystem (a real loop-ext4)
and on a candidate (a quotafs mount with the same room), every result recorded, every
difference reported at once.

    ext4 = Target("ext4", loop.mountpoint, block_size=loop.block_size,
                  reserved_bytes=loop.reserved_clusters_bytes)
    quota = Target("quotafs", mount.path, block_size=4096, settle=...)
    diff = Differential(ext4, quota)
    diff.reset()
    for op in (Create("a"), Write("a", 0, 5000, seed=1), MmapWrite("a", 100, 8000, seed=2)):
        diff.run(op)
    diff.finish()                  # full contents, then empty both and check for leaks
    diff.assert_no_differences()   # one AssertionError listing every difference

What is compared, after every operation:

- the outcome: return value (bytes written or stored), errno name and the call that
  failed, the signal that killed an mmap writer;
- the tree: names, kinds, sizes, link counts, which names share an inode, and the size
  and link count of every file held open (unlinked ones too);
- the bytes an operation wrote, read back from both; at `finish()`, every file whole;
- the space: statvfs free space (after syncfs), and the candidate's usage against what a
  filesystem with the candidate's block size holds for the reference's layout.

Where the two may legitimately differ — and only there — a difference is *explained*, not
reported (and listed in `explained`): an ENOSPC (short write, SIGBUS) on one side only
when both ended within their window of full (ext4: the folio it refuses whole; quotafs:
the write request it refuses whole; both: the drift that block granularity and ext4's
metadata explain, plus one block) and what each acknowledged differs by no more; free
space within that drift; usage off only by blocks of zeros one side keeps (ext4 after a
refused folio, the candidate after a truncate into one of its larger blocks). The window
and the reasons are in docs/semantics.md ("Differences found by the differential
tests"). A divergence at the limit is repaired at once (the longer file is cut back to
where the shorter write stopped, on both sides; an extra directory is removed) so the
two stay comparable.

Operations run in the calling process, except mmap stores, which run in a child process:
a store past the limit may be killed by SIGBUS, and that must not kill the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from quotafs.errors import errno_name
from quotafs.model.allocation import count_blocks
from quotafs.model.costs import data_extents

PAGE = mmap.PAGESIZE
P = ParamSpec("P")
T = TypeVar("T")
MMAP_CHILD_TIMEOUT = 120.0  # seconds; a hung child is killed and reported
FULL_COMPARE = 64 * 1024 * 1024  # files up to this size are compared byte for byte
CHUNK = 1024 * 1024

__all__ = [
    "Close", "Create", "Difference", "Differential", "DifferentialError", "Fsync",
    "HandleFsync", "HandleTruncate", "HandleWrite", "Layout", "Link", "Mkdir", "MmapWrite",
    "Op", "Open", "Rename", "Result", "Rmdir", "Statvfs", "Step", "Target", "Tolerance",
    "Truncate", "Unlink", "Write", "image_workdir", "pattern", "run_mmap_child", "syncfs",
    "wait_until",
]


# -- the data written ---------------------------------------------------------------------

_PERIOD = 251  # prime, so a pattern never lines up with a block
_BASE = bytes((i * 97) % _PERIOD + 1 for i in range(_PERIOD))  # never a zero byte


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes an operation with `seed` writes at `offset`: never zero (so holes show),
    depending on the file position (so misplaced data shows) and on the seed."""
    start = (offset + seed * 61) % _PERIOD
    reps = (start + length) // _PERIOD + 1
    return (_BASE * reps)[start:start + length]


# -- operations ---------------------------------------------------------------------------
# Paths are relative to the target's root; slots name the files the run holds open.

def _off(offset: int | None) -> str:
    return "append" if offset is None else f"{offset}"


@dataclass(frozen=True)
class Create:
    """open(path, O_WRONLY|O_CREAT [|O_EXCL] [|O_TRUNC], 0644), then close."""

    path: str
    exclusive: bool = False
    truncate: bool = False

    def __str__(self) -> str:
        flags = "".join(f"|{f}" for f, on in (("EXCL", self.exclusive),
                                              ("TRUNC", self.truncate)) if on)
        return f"create({self.path!r}, CREAT{flags})"


@dataclass(frozen=True)
class Write:
    """One write(2) of `length` pattern bytes at `offset` (None: O_APPEND) through a
    fresh O_WRONLY [|O_CREAT] descriptor, then close."""

    path: str
    offset: int | None
    length: int
    seed: int = 0
    create: bool = False

    def __str__(self) -> str:
        how = ", CREAT" if self.create else ""
        return f"write({self.path!r}, at={_off(self.offset)}, len={self.length}{how})"


@dataclass(frozen=True)
class Truncate:
    path: str
    size: int

    def __str__(self) -> str:
        return f"truncate({self.path!r}, {self.size})"


@dataclass(frozen=True)
class Unlink:
    path: str

    def __str__(self) -> str:
        return f"unlink({self.path!r})"


@dataclass(frozen=True)
class Link:
    src: str
    dst: str

    def __str__(self) -> str:
        return f"link({self.src!r}, {self.dst!r})"


@dataclass(frozen=True)
class Rename:
    src: str
    dst: str

    def __str__(self) -> str:
        return f"rename({self.src!r}, {self.dst!r})"


@dataclass(frozen=True)
class Mkdir:
    path: str

    def __str__(self) -> str:
        return f"mkdir({self.path!r})"


@dataclass(frozen=True)
class Rmdir:
    path: str

    def __str__(self) -> str:
        return f"rmdir({self.path!r})"


@dataclass(frozen=True)
class Fsync:
    """open(path, O_RDONLY), fsync, close."""

    path: str

    def __str__(self) -> str:
        return f"fsync({self.path!r})"


@dataclass(frozen=True)
class Open:
    """Hold `path` open O_RDWR [|O_CREAT] in `slot` (closing what the slot held)."""

    slot: int
    path: str
    create: bool = False

    def __str__(self) -> str:
        return f"open#{self.slot}({self.path!r}, RDWR{'|CREAT' if self.create else ''})"


@dataclass(frozen=True)
class Close:
    slot: int

    def __str__(self) -> str:
        return f"close#{self.slot}"


@dataclass(frozen=True)
class HandleWrite:
    """pwrite(2) through the descriptor in `slot`, at `offset` (None: at its size)."""

    slot: int
    offset: int | None
    length: int
    seed: int = 0

    def __str__(self) -> str:
        return f"pwrite#{self.slot}(at={_off(self.offset)}, len={self.length})"


@dataclass(frozen=True)
class HandleTruncate:
    slot: int
    size: int

    def __str__(self) -> str:
        return f"ftruncate#{self.slot}({self.size})"


@dataclass(frozen=True)
class HandleFsync:
    slot: int

    def __str__(self) -> str:
        return f"fsync#{self.slot}"


@dataclass(frozen=True)
class MmapWrite:
    """In a child process: open O_RDWR (extend: |O_CREAT, and ftruncate the file up to
    cover the range, as programs do before they map), map the file shared, store `length`
    pattern bytes at `offset` page by page (only what lies inside the file), msync, munmap,
    close."""

    path: str
    offset: int
    length: int
    seed: int = 0
    extend: bool = False

    def __str__(self) -> str:
        how = ", extend" if self.extend else ""
        return f"mmap-store({self.path!r}, at={self.offset}, len={self.length}{how})"


@dataclass(frozen=True)
class Statvfs:
    """Record the free space of both (compared after every step anyway)."""

    def __str__(self) -> str:
        return "statvfs()"


Op = (Create | Write | Truncate | Unlink | Link | Rename | Mkdir | Rmdir | Fsync | Open
      | Close | HandleWrite | HandleTruncate | HandleFsync | MmapWrite | Statvfs)
_WRITES = (Write, HandleWrite, MmapWrite)
_DEFERRED = frozenset({"msync", "fsync", "close"})  # calls after the data was acknowledged


def _allocation(op: Op, block: int) -> int:
    """The most an operation can newly allocate, in bytes (0: it allocates nothing)."""
    if isinstance(op, Mkdir):
        return block
    if isinstance(op, Write | HandleWrite | MmapWrite):
        start = (op.offset or 0) // block * block
        end = -(-((op.offset or 0) + op.length) // block) * block
        if op.offset is None:  # an append starts inside the last block, wherever it is
            end += block
        return end - start
    return 0


# -- results ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Result:
    """What one operation did on one target."""

    error: str | None = None  # errno name, e.g. "ENOSPC"
    call: str | None = None  # the call that failed: open, write, msync, close, ...
    value: int | None = None  # bytes written / stored
    offset: int | None = None  # where a write landed (appends: the size before)
    signal: str | None = None  # the signal that killed the mmap child

    def outcome(self) -> tuple[str | None, str | None, int | None, str | None]:
        """What must be equal on both sides (offset is compared through the tree)."""
        return self.error, self.call, self.value, self.signal

    def __str__(self) -> str:
        parts = []
        if self.value is not None:
            parts.append(f"{self.value:,} B")
        if self.signal is not None:
            parts.append(f"killed by {self.signal}")
        if self.error is not None:
            parts.append(f"{self.error} at {self.call}")
        return ", ".join(parts) or "ok"


def _space_failure(op: Op, r: Result) -> bool:
    if r.error == "ENOSPC" or r.signal == "SIGBUS":
        return True
    return isinstance(op, Write | HandleWrite) and r.value is not None and r.value < op.length


# -- targets ------------------------------------------------------------------------------

def image_workdir() -> str | None:
    """Where to put a loop-ext4's image: on tmpfs when there is one, so journal commits (at
    every ENOSPC retry, every syncfs, every fsync) are memory copies, not disk flushes."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 64 * 1024 * 1024:
            return shm
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """syncfs(2) on the filesystem holding `path`: flushes delayed allocation and, on ext4,
    commits the journal, so freed blocks show in statvfs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


@dataclass
class Target:
    """A directory to run operations in, and how to read its free space."""

    name: str
    root: str
    block_size: int = 4096  # the allocation unit the target charges
    reserved_bytes: int = 0  # statvfs f_bfree counts these but no writer gets them (ext4)
    # Called with the number of files the run holds open: return once the target has
    # processed every release (FUSE sends RELEASE asynchronously after close(2)).
    settle: Callable[[int], None] | None = None
    ignore: frozenset[str] = frozenset({"lost+found"})  # names at the root not under test

    def free(self) -> int:
        """Free space a writer can use, in bytes: statvfs after syncfs."""
        with contextlib.suppress(OSError):  # a writeback error it reports is not ours
            syncfs(self.root)
        st = os.statvfs(self.root)
        return st.f_bfree * st.f_frsize - self.reserved_bytes


class _Side:
    """One target and the descriptors the run holds open on it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.handles: dict[int, int] = {}

    def path(self, rel: str) -> str:
        return os.path.join(self.target.root, rel)

    def close_all(self) -> None:
        for fd in self.handles.values():
            _close_quietly(fd)
        self.handles.clear()

    def settle(self) -> None:
        if self.target.settle is not None:
            self.target.settle(len(self.handles))

    # -- executing --------------------------------------------------------------------

    def execute(self, op: Op) -> Result:
        try:
            return self._execute(op)
        except _Failed as failed:
            return failed.result

    def _execute(self, op: Op) -> Result:
        if isinstance(op, Create):
            flags = os.O_WRONLY | os.O_CREAT
            flags |= (os.O_EXCL if op.exclusive else 0) | (os.O_TRUNC if op.truncate else 0)
            _close(_call("open", os.open, self.path(op.path), flags, 0o644))
            return Result()
        if isinstance(op, Write):
            append = op.offset is None
            flags = os.O_WRONLY | (os.O_APPEND if append else 0)
            flags |= os.O_CREAT if op.create else 0
            fd = _call("open", os.open, self.path(op.path), flags, 0o644)
            at = os.fstat(fd).st_size if op.offset is None else op.offset
            result = _write(fd, at, pattern(op.seed, at, op.length), append)
            if result.error is not None:
                _close_quietly(fd)
                return result
            _close(fd, result)
            return result
        if isinstance(op, HandleWrite):
            fd = self._slot(op.slot)
            at = os.fstat(fd).st_size if op.offset is None else op.offset
            return _write(fd, at, pattern(op.seed, at, op.length), False)
        if isinstance(op, Truncate):
            _call("truncate", os.truncate, self.path(op.path), op.size)
            return Result()
        if isinstance(op, HandleTruncate):
            _call("truncate", os.ftruncate, self._slot(op.slot), op.size)
            return Result()
        if isinstance(op, Unlink):
            _call("unlink", os.unlink, self.path(op.path))
            return Result()
        if isinstance(op, Link):
            _call("link", os.link, self.path(op.src), self.path(op.dst))
            return Result()
        if isinstance(op, Rename):
            _call("rename", os.rename, self.path(op.src), self.path(op.dst))
            return Result()
        if isinstance(op, Mkdir):
            _call("mkdir", os.mkdir, self.path(op.path), 0o755)
            return Result()
        if isinstance(op, Rmdir):
            _call("rmdir", os.rmdir, self.path(op.path))
            return Result()
        if isinstance(op, Fsync):
            fd = _call("open", os.open, self.path(op.path), os.O_RDONLY)
            try:
                _call("fsync", os.fsync, fd)
            except _Failed:
                _close_quietly(fd)
                raise
            _close(fd)
            return Result()
        if isinstance(op, HandleFsync):
            _call("fsync", os.fsync, self._slot(op.slot))
            return Result()
        if isinstance(op, Open):
            old = self.handles.pop(op.slot, None)
            if old is not None:
                _close(old)
            flags = os.O_RDWR | (os.O_CREAT if op.create else 0)
            self.handles[op.slot] = _call("open", os.open, self.path(op.path), flags, 0o644)
            return Result()
        if isinstance(op, Close):
            held = self.handles.pop(op.slot, None)
            if held is None:
                return Result(error="EBADF", call="close")
            _close(held)
            return Result()
        if isinstance(op, MmapWrite):
            return run_mmap_child(self.path(op.path), op.offset,
                                  pattern(op.seed, op.offset, op.length), op.extend)
        assert isinstance(op, Statvfs)
        self.target.free()  # compared after every step, with the tolerance
        return Result()

    def _slot(self, slot: int) -> int:
        fd = self.handles.get(slot)
        if fd is None:
            raise _Failed(Result(error="EBADF", call="slot"))
        return fd

    # -- looking -----------------------------------------------------------------------

    def size_of(self, op: Op) -> int | None:
        """Size of the file an operation wrote to, or None when it is gone."""
        try:
            if isinstance(op, HandleWrite):
                return os.fstat(self._slot(op.slot)).st_size
            if isinstance(op, Write | MmapWrite):
                st = os.lstat(self.path(op.path))
                return st.st_size if stat.S_ISREG(st.st_mode) else None
        except (OSError, _Failed):
            return None
        return None

    def cut(self, op: Op, size: int) -> None:
        """Truncate the file an operation wrote to (repairing a tolerated divergence)."""
        if isinstance(op, HandleWrite):
            os.ftruncate(self.handles[op.slot], size)
        elif isinstance(op, Write | MmapWrite):
            os.truncate(self.path(op.path), size)

    def reader(self, slot: int) -> int:
        """A new O_RDONLY descriptor of the file in `slot` (unlinked or not). Reading
        through the slot's own O_RDWR descriptor would not be neutral: quotafs
        --mmap-sigbus reserves the holes a writable handle reads."""
        return os.open(f"/proc/self/fd/{self.handles[slot]}", os.O_RDONLY)

    def read_range(self, op: Op, offset: int, length: int) -> bytes | None:
        try:
            if isinstance(op, HandleWrite):
                fd = self.reader(op.slot)
            elif isinstance(op, Write | MmapWrite):
                fd = os.open(self.path(op.path), os.O_RDONLY | os.O_NOFOLLOW)
            else:
                return None
        except (OSError, KeyError):
            return None
        try:
            return os.pread(fd, length, offset)
        except OSError:
            return None
        finally:
            os.close(fd)

    def walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """(relative path, lstat) of everything below the root, directories first, sorted."""
        pending = [""]
        while pending:
            rel = pending.pop()
            for name in sorted(os.listdir(self.path(rel) if rel else self.target.root),
                               reverse=True):
                if not rel and name in self.target.ignore:
                    continue
                child = os.path.join(rel, name) if rel else name
                st = os.lstat(self.path(child))
                yield child, st
                if stat.S_ISDIR(st.st_mode):
                    pending.append(child)

    def tree(self) -> dict[str, str]:
        """Every name and open slot, as text to compare: kind, size, links, inode group."""
        out: dict[str, str] = {}
        groups: dict[int, str] = {}

        def group(st: os.stat_result, name: str) -> str:
            return groups.setdefault(st.st_ino, name)

        for rel, st in sorted(self.walk()):
            if stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = (f"file size={st.st_size} links={st.st_nlink} "
                            f"inode={group(st, rel)}")
            else:
                out[rel] = f"mode {stat.filemode(st.st_mode)}"
        for slot, fd in sorted(self.handles.items()):
            st = os.fstat(fd)
            out[f"#{slot}"] = (f"open file size={st.st_size} links={st.st_nlink} "
                               f"inode={group(st, f'#{slot}')}")
        return out

    def files(self) -> list[str]:
        """Every regular file, by name, and every slot ("#N", unlinked files too)."""
        names = [rel for rel, st in self.walk() if stat.S_ISREG(st.st_mode)]
        return sorted(names) + [f"#{slot}" for slot in sorted(self.handles)]

    def open_file(self, name: str) -> int:
        """A new O_RDONLY descriptor of a name or slot from files()."""
        if name.startswith("#"):
            return self.reader(int(name[1:]))
        return os.open(self.path(name), os.O_RDONLY | os.O_NOFOLLOW)

    def clear(self) -> None:
        """Close every slot and remove everything below the root."""
        self.close_all()
        for rel, st in sorted(self.walk(), key=lambda item: -item[0].count("/")):
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(self.path(rel))
            else:
                os.unlink(self.path(rel))


class _Failed(Exception):
    def __init__(self, result: Result) -> None:
        super().__init__(str(result))
        self.result = result


def _call(call: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise _Failed(Result(error=errno_name(exc.errno), call=call)) from None


def _write(fd: int, at: int, data: bytes, append: bool) -> Result:
    try:
        n = os.write(fd, data) if append else os.pwrite(fd, data, at)
    except OSError as exc:
        return Result(error=errno_name(exc.errno), call="write", offset=at)
    return Result(value=n, offset=at)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close(fd: int, after: Result | None = None) -> None:
    """Close `fd`; a failing close(2) is the operation's result, with what it did so far."""
    try:
        os.close(fd)
    except OSError as exc:
        before = after or Result()
        raise _Failed(Result(error=errno_name(exc.errno), call="close", value=before.value,
                             offset=before.offset)) from None


# -- the mmap child -----------------------------------------------------------------------

# A program of its own (linted and typed like the rest), run isolated: -I -S.
MMAP_CHILD = str(Path(__file__).with_name("mmap_child.py"))


def run_mmap_child(path: str, offset: int, data: bytes, extend: bool = False) -> Result:
    """Store `data` at `offset` of `path` through a shared mapping, in a child process
    (extend: create the file, and grow it to cover the range first). Only the part inside
    the file is stored; the result's value is the bytes stored before the child finished
    or was killed."""
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", MMAP_CHILD, path, str(offset),
             "extend" if extend else "in-place"],
            input=data, capture_output=True, timeout=MMAP_CHILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:  # run() has killed and reaped it
        return Result(error="TIMEOUT", call=f"mmap child ({MMAP_CHILD_TIMEOUT:g}s)",
                      offset=offset)
    stored = 0
    error: str | None = None
    call: str | None = None
    for line in proc.stdout.decode(errors="replace").splitlines():
        word, *rest = line.split()
        if word == "ack":
            stored = int(rest[0])
        elif word == "fail" and error is None:
            call, error = rest[0], errno_name(int(rest[1]))
    sig: str | None = None
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
    elif proc.returncode != 0 and error is None:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        error, call = "CHILD", f"exit {proc.returncode}: {' '.join(tail)}"
    return Result(error=error, call=call, value=stored, offset=offset, signal=sig)


# -- what is compared ---------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """How far the two may be apart where they legitimately differ (docs/semantics.md)."""

    slack: int = 4096  # one block on top of the explained drift
    # ext4 reserves space for a whole page-cache folio in page_mkwrite; a fault brings in
    # a readahead-sized folio (128 KiB by default), so an mmap store may fail that early.
    mmap_folio: int = 128 * 1024
    # ext4 reserves per folio in write_begin and refuses the folio whole: a write(2) may
    # stop up to a folio (a power of two no larger than the write, at most PMD size) short
    # of full.
    write_folio: int = 2 * 1024 * 1024
    # quotafs refuses a write request that does not fit whole; the kernel sends a write(2)
    # in requests of at most max_write (1 MiB), so it may stop up to one short of full.
    write_request: int = 1024 * 1024


@dataclass(frozen=True)
class Layout:
    """The reference's content, measured: what the candidate should charge for it, and
    how far the two free spaces may drift apart because of how each allocates."""

    candidate_bytes: int  # data blocks and directories at the candidate's block size
    granularity: int  # candidate's charge minus the reference's data and directory blocks
    metadata: int  # reference blocks that hold neither data nor directories (extent tree)

    @property
    def drift(self) -> int:
        return abs(self.granularity) + abs(self.metadata)


@dataclass(frozen=True)
class Difference:
    step: int  # 0: at reset / finish
    op: str
    aspect: str  # result, enospc, tree at NAME, contents, accounting, statvfs free,
    #              capacity, leak
    reference: str
    candidate: str
    note: str = ""

    def __str__(self) -> str:
        where = f"step {self.step}: " if self.step else ""
        text = (f"{where}{self.op}: {self.aspect} differs\n"
                f"    {'reference':>10}: {self.reference}\n"
                f"    {'candidate':>10}: {self.candidate}")
        return text + (f"\n    {'':>10}  {self.note}" if self.note else "")


@dataclass
class Step:
    index: int
    op: Op
    reference: Result
    candidate: Result
    free: tuple[int, int]  # (reference, candidate) writable free bytes after the step
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        same = self.reference.outcome() == self.candidate.outcome()
        results = f"{self.reference}" if same else f"{self.reference} | {self.candidate}"
        extra = "".join(f"  [{n}]" for n in self.notes)
        return (f"{self.index:>3}. {self.op}  ->  {results}  "
                f"(free {self.free[0]:,} | {self.free[1]:,}){extra}")


def _why(zeros: int, tails: int) -> str:
    return (f"the reference holds {zeros:,} B of data blocks that read as zeros (kept from a "
            f"refused write or page fault), the candidate may hold {tails:,} B of blocks a "
            "truncate cut into")


class DifferentialError(AssertionError):
    """Raised by assert_no_differences with the whole report as its message."""


class Differential:
    """Runs operations on a reference and a candidate and collects what differs."""

    def __init__(self, reference: Target, candidate: Target,
                 tolerance: Tolerance | None = None) -> None:
        self.ref = _Side(reference)
        self.cand = _Side(candidate)
        self.tolerance = tolerance or Tolerance()
        self.capacity: tuple[int, int] | None = None  # free of both when empty
        self.steps: list[Step] = []
        self.differences: list[Difference] = []
        self.explained: list[Difference] = []
        self._layout = Layout(0, 0, 0)
        # (reference inode, candidate block): a block a truncate cut into, that held data
        # in the candidate's block size before and none after on the reference; a
        # filesystem with the candidate's (larger) blocks keeps it, as a block of zeros.
        self._tails: set[tuple[int, int]] = set()
        self.totals: dict[str, int] = {"steps": 0, "enospc": 0, "explained": 0,
                                       "differences": 0}

    @property
    def reference(self) -> Target:
        return self.ref.target

    @property
    def candidate(self) -> Target:
        return self.cand.target

    # -- the run ---------------------------------------------------------------------------

    def reset(self) -> list[Difference]:
        """Empty both targets and start a new record. The first reset measures both free
        spaces; later ones check that emptying gave every byte back (else: a leak)."""
        leaks = self._empty()
        self.steps = []
        self.differences = leaks
        self.explained = []
        return leaks

    def _empty(self) -> list[Difference]:
        for side in (self.ref, self.cand):
            side.clear()
            side.settle()
        free = (self.reference.free(), self.candidate.free())
        self._layout = Layout(0, 0, 0)
        self._tails.clear()
        if self.capacity is None:
            self.capacity = free
            room = free[0] - free[1]
            if not 0 <= room < self.candidate.block_size:
                # The candidate hands out whole blocks of its limit, which is the
                # reference's room: it may start with less than a block fewer, no more.
                return self._count([Difference(
                    0, "at the start", "capacity", f"{free[0]:,} B free when empty",
                    f"{free[1]:,} B free when empty ({-room:+,} B)",
                    "both must start with the same room, up to one candidate block")])
            return []
        leaks = [
            Difference(0, "at the end, after emptying both", "leak", f"{then:,} B free when empty",
                       f"{now:,} B free after removing everything ({now - then:+,} B)",
                       f"the {name} did not give back all its space")
            for name, now, then in zip((self.reference.name, self.candidate.name), free,
                                       self.capacity, strict=True) if now != then]
        self.capacity = free
        return self._count(leaks)

    def _count(self, found: list[Difference]) -> list[Difference]:
        self.totals["differences"] += len(found)
        return found

    def run(self, op: Op) -> Step:
        """Run `op` on both, compare everything, record and return the step."""
        if self.capacity is None:
            raise RuntimeError("call reset() before run()")
        index = len(self.steps) + 1
        if isinstance(op, Truncate | HandleTruncate):
            r = self._truncating(op, lambda: self.ref.execute(op))
        else:
            r = self.ref.execute(op)
        c = self.cand.execute(op)
        before = self._layout
        step = Step(index, op, r, c, (0, 0))
        diverged = r.outcome() != c.outcome()
        if diverged:
            if _space_failure(op, r) or _space_failure(op, c):
                # Judged on the free space right after the op, before any repair.
                for side in (self.ref, self.cand):
                    side.settle()
                step.free = (self.reference.free(), self.candidate.free())
                self._judge_space(step, max(before.drift, self._measure_layout().drift))
                if self._repairable(op, r, c):
                    self._repair(op, r, c, step.notes)
            else:
                self._differ(step, "result", str(r), str(c))
        for side in (self.ref, self.cand):
            side.settle()
        layout = self._layout = self._measure_layout()
        step.free = (self.reference.free(), self.candidate.free())
        self.steps.append(step)
        self.totals["steps"] += 1
        self.totals["enospc"] += _space_failure(op, r)
        self._compare_written(step)
        self._compare_tree(step)
        self._compare_space(step, layout)
        return step

    def finish(self) -> list[Difference]:
        """Compare every file whole, then empty both (checking for leaks); returns all the
        differences of the run."""
        ref, cand = self.ref.files(), self.cand.files()
        for name in sorted(set(ref) & set(cand)):  # the tree compared the names already
            found = self._compare_file(name)
            if found is not None:
                self._record(Difference(0, f"at the end, {name!r}", "contents", *found))
        self.differences += self._empty()
        return self.differences

    def _compare_file(self, name: str) -> tuple[str, str, str] | None:
        """(reference, candidate, where) for a file whose bytes differ, else None. Files up
        to FULL_COMPARE bytes are read whole; beyond, only the reference's data extents
        (the rest must be holes there: reading terabytes of them helps no one)."""
        fd_r, fd_c = self.ref.open_file(name), self.cand.open_file(name)
        try:
            size_r, size_c = os.fstat(fd_r).st_size, os.fstat(fd_c).st_size
            if size_r != size_c:
                return f"{size_r:,} bytes", f"{size_c:,} bytes", "sizes differ"
            ranges = [(0, size_r)] if size_r <= FULL_COMPARE else \
                data_extents(fd_r, 0, size_r)
            for start, end in ranges:
                for at in range(start, end, CHUNK):
                    n = min(CHUNK, end - at)
                    a, b = os.pread(fd_r, n, at), os.pread(fd_c, n, at)
                    if a != b:
                        return (f"{size_r:,} bytes", f"{size_c:,} bytes",
                                _first_difference(a, b, at))
            return None
        finally:
            os.close(fd_r)
            os.close(fd_c)

    def close(self) -> None:
        """Close every descriptor the run holds (nothing is removed)."""
        self.ref.close_all()
        self.cand.close_all()

    # -- reporting --------------------------------------------------------------------------

    def report(self) -> str:
        lines = [f"{len(self.differences)} difference(s) between {self.reference.name} "
                 f"(reference) and {self.candidate.name} (candidate):", ""]
        lines += [str(d) for d in self.differences]
        if self.explained:
            lines += ["", f"{len(self.explained)} explained (within the documented "
                          "tolerance):"]
            lines += [str(d) for d in self.explained]
        lines += ["", f"the run ({self.reference.name} | {self.candidate.name}):"]
        lines += [str(s) for s in self.steps]
        return "\n".join(lines)

    def assert_no_differences(self) -> None:
        if self.differences:
            raise DifferentialError(self.report())

    # -- comparisons -----------------------------------------------------------------------

    def _record(self, difference: Difference) -> None:
        self.differences.append(difference)
        self.totals["differences"] += 1

    def _differ(self, step: Step, aspect: str, reference: str, candidate: str,
                note: str = "") -> None:
        self._record(Difference(step.index, str(step.op), aspect, reference, candidate,
                                note))

    def _windows(self, op: Op, drift: int) -> tuple[int, int]:
        """How close to full (reference, candidate) must have ended for an ENOSPC on one
        side only to be accepted. ext4 reserves per page-cache folio and refuses a folio
        whole: in write_begin (a folio of at most the write's length, a power of two) or in
        page_mkwrite (the folio readahead made); the candidate refuses a write request
        whole, so it must end within a request (at most the write) of full — unless ext4
        failed a whole mmap folio early, which leaves the candidate up to that folio."""
        tol = self.tolerance
        near = drift + tol.slack
        if isinstance(op, MmapWrite):
            return tol.mmap_folio + near, tol.mmap_folio + near
        length = _allocation(op, self.candidate.block_size)
        folio = min(1 << (length.bit_length() - 1), tol.write_folio) if length else 0
        return folio + near, min(length, tol.write_request) + near

    def _judge_space(self, step: Step, drift: int) -> None:
        """ENOSPC (or a short write, or SIGBUS) on one side only, or at different points:
        accepted when both ended within their window of full."""
        r, c = str(step.reference), str(step.candidate)
        if _allocation(step.op, self.candidate.block_size) == 0:
            self._differ(step, "enospc", r, c, "the operation allocates nothing")
            return
        free_r, free_c = step.free
        win_r, win_c = self._windows(step.op, drift)
        if not (free_r < win_r and free_c < win_c):
            extra = sum(self._allowances())
            win_r, win_c = win_r + extra, win_c + extra
        text = (f"right after it, {self.reference.name} had {free_r:,} B free (window "
                f"{win_r:,} B), {self.candidate.name} {free_c:,} B (window {win_c:,} B)")
        deferred = {res.call for res in (step.reference, step.candidate)
                    if res.error == "ENOSPC" and res.call in _DEFERRED}
        if deferred and step.reference.call != step.candidate.call:
            # ext4 reserves at write(2) and page_mkwrite, so writeback never runs out of
            # room: an ENOSPC only at msync/fsync/close means that writes or stores the
            # program was told succeeded did not reach the disk. Never "at the limit".
            self._differ(step, "enospc", r, c, f"ENOSPC deferred to {', '.join(deferred)}: "
                         "acknowledged data did not reach the disk")
        elif free_r < win_r and free_c < win_c:
            self._explain(step, "enospc", r, c, "both at the limit: " + text)
        else:
            self._differ(step, "enospc", r, c, "not at the limit: " + text)

    def _repairable(self, op: Op, r: Result, c: Result) -> bool:
        if isinstance(op, Mkdir):
            return (r.error is None) != (c.error is None)
        return isinstance(op, _WRITES) and r.signal in (None, "SIGBUS") \
            and c.signal in (None, "SIGBUS")

    def _repair(self, op: Op, r: Result, c: Result, notes: list[str]) -> None:
        """Make the two equal again after a divergence at the limit."""
        if isinstance(op, Mkdir):
            side = self.ref if r.error is None else self.cand
            os.rmdir(side.path(op.path))
            notes.append(f"repaired: removed {op.path!r} from {side.target.name}")
            return
        sizes = [s.size_of(op) for s in (self.ref, self.cand)]
        if None in sizes or r.offset is None or c.offset is None:
            return
        cut = min(min(r.offset, c.offset) + min(r.value or 0, c.value or 0),
                  *(s for s in sizes if s is not None))
        self._truncating(op, lambda: self.ref.cut(op, cut))
        self.cand.cut(op, cut)
        notes.append(f"repaired: both cut to {cut:,} B")

    def _compare_written(self, step: Step) -> None:
        op = step.op
        if not isinstance(op, _WRITES):
            return
        at = step.reference.offset if step.reference.offset is not None else \
            step.candidate.offset
        if at is None:
            return
        a = self.ref.read_range(op, at, op.length)
        b = self.cand.read_range(op, at, op.length)
        if a != b:
            self._differ(step, "contents", _describe_bytes(a), _describe_bytes(b),
                         f"read back at {at:,}: " + _first_difference(a, b, at))

    def _compare_tree(self, step: Step) -> None:
        a, b = self.ref.tree(), self.cand.tree()
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                self._differ(step, f"tree at {name!r}", a.get(name, "absent"),
                             b.get(name, "absent"))

    def _compare_space(self, step: Step, layout: Layout) -> None:
        assert self.capacity is not None
        cap_r, cap_c = self.capacity
        free_r, free_c = step.free
        used_c = cap_c - free_c
        model = layout.candidate_bytes
        extra: tuple[int, int] | None = None  # measured only when needed (reads data)
        if used_c != model:
            zeros, tails = extra = self._allowances()
            text = (f"{model:,} B in use at {self.candidate.block_size}-byte blocks for its "
                    "content")
            mine = f"{used_c:,} B in use ({used_c - model:+,} B)"
            if model - zeros <= used_c <= model + tails:
                self._explain(step, "accounting", text, mine, _why(zeros, tails))
            else:
                self._differ(step, "accounting", text, mine,
                             "the candidate must charge what the reference holds, counted "
                             f"in the candidate's blocks ({_why(zeros, tails)})")
        allowed = abs(cap_c - cap_r) + layout.drift + self.tolerance.slack
        apart = abs(free_c - free_r)
        if apart > allowed:
            zeros, tails = extra = self._allowances() if extra is None else extra
            text = (f"apart by {free_c - free_r:+,} B; block size, directories and metadata "
                    f"explain {allowed:,} B")
            if apart <= allowed + zeros + tails:
                self._explain(step, "statvfs free", f"{free_r:,} B", f"{free_c:,} B",
                              f"{text}, and {_why(zeros, tails)}")
            else:
                self._differ(step, "statvfs free", f"{free_r:,} B", f"{free_c:,} B",
                             f"{text} ({_why(zeros, tails)})")

    def _explain(self, step: Step, aspect: str, reference: str, candidate: str,
                 why: str) -> None:
        self.explained.append(Difference(step.index, str(step.op), aspect, reference,
                                         candidate, why))
        self.totals["explained"] += 1
        step.notes.append(f"explained: {aspect}")

    def _reference_files(self) -> Iterator[tuple[int, os.stat_result]]:
        """(open descriptor, stat) of every regular file of the reference, inodes once,
        unlinked open ones too; each descriptor is valid until the next item."""
        seen: set[int] = set()
        for rel, st in self.ref.walk():
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                fd = os.open(self.ref.path(rel), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    yield fd, st
                finally:
                    os.close(fd)
        for fd in list(self.ref.handles.values()):
            st = os.fstat(fd)
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                yield fd, st

    def _data_blocks(self, fd: int) -> set[int]:
        cb = self.candidate.block_size
        blocks: set[int] = set()
        for start, end in data_extents(fd, 0, os.fstat(fd).st_size):
            blocks.update(range(start // cb, -(-end // cb)))
        return blocks

    def _truncating(self, op: Op, truncate: Callable[[], T]) -> T:
        """Run `truncate` (which truncates the reference's file of `op`) and note the block
        it cut into when the reference dropped it but the candidate's blocks keep it."""
        cb = self.candidate.block_size
        try:
            if isinstance(op, HandleTruncate | HandleWrite):
                fd = self.ref.reader(op.slot)
            elif isinstance(op, Truncate | Write | MmapWrite):
                fd = os.open(self.ref.path(op.path), os.O_RDONLY | os.O_NOFOLLOW)
            else:
                return truncate()
        except (OSError, KeyError):
            return truncate()
        try:
            before = self._data_blocks(fd)
            result = truncate()
            st = os.fstat(fd)
            block = st.st_size // cb
            if st.st_size % cb and block in before and block not in self._data_blocks(fd):
                self._tails.add((st.st_ino, block))
            return result
        finally:
            os.close(fd)

    def _allowances(self) -> tuple[int, int]:
        """(zeros, tails): what block granularity and failed reservations explain of a
        difference in usage, counted in the candidate's blocks.

        zeros: the reference's data blocks that read as all zeros — ext4 keeps the
        delayed-allocation reservations of a refused write or page fault as such blocks,
        where the candidate holds nothing. tails: blocks a truncate cut into that the
        reference (smaller blocks) gave back and the candidate keeps, still holes on the
        reference."""
        cb = self.candidate.block_size
        zeros = tails = 0
        for fd, st in self._reference_files():
            data = self._data_blocks(fd)
            for block in data:
                if not any(os.pread(fd, cb, block * cb)):
                    zeros += cb
            tails += cb * sum(1 for ino, block in self._tails
                              if ino == st.st_ino and block * cb < st.st_size
                              and block not in data)
        return zeros, tails

    def _measure_layout(self) -> Layout:
        """Walk the reference: its data extents and blocks, file by file (inodes once)."""
        cb, rb = self.candidate.block_size, self.reference.block_size
        candidate = granularity = metadata = 0
        for _, st in self.ref.walk():
            if stat.S_ISDIR(st.st_mode):
                candidate += cb
                granularity += cb - st.st_blocks * 512
        for fd, st in self._reference_files():
            extents = data_extents(fd, 0, st.st_size)
            mine = count_blocks(extents, cb) * cb
            theirs = count_blocks(extents, rb) * rb
            candidate += mine
            granularity += mine - theirs
            metadata += st.st_blocks * 512 - theirs
        return Layout(candidate, granularity, metadata)


def _describe_bytes(data: bytes | None) -> str:
    if data is None:
        return "unreadable or absent"
    return f"{len(data):,} bytes"


def _first_difference(a: bytes | None, b: bytes | None, base: int = 0) -> str:
    if a is None or b is None:
        return "present on one side only"
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first different byte at {base + i:,} ({x:#04x} vs {y:#04x})"
    return f"one is a prefix of the other (lengths {len(a):,} and {len(b):,})"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
               interval: float = 0.002) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; return the last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)
    return True
