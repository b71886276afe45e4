"""What a file, directory or symlink costs, measured on the backing filesystem.

Block mode charges whole blocks of data, as ext4 allocates them: holes are free, a partly
written block costs a whole one, a directory costs one block, a symlink whose target does
not fit in the inode (60 bytes or more, as ext4's fast symlinks) costs one block.
Apparent mode charges st_size of files and the target length of symlinks.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from quotafs.model.allocation import Extent, ceil_div, count_blocks, hole_blocks, round_up

log = logging.getLogger(__name__)

EXT4_FAST_SYMLINK_MAX = 59  # ext4 keeps targets shorter than 60 bytes inside the inode


class Mode(enum.Enum):
    BLOCKS = "blocks"
    APPARENT = "apparent"


def _extents(fd: int, start: int, end: int) -> Iterator[Extent]:
    """Data extents of the open file `fd` within [start, end), asked one at a time."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past pos
                return
            if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


def data_extents(fd: int, start: int, end: int) -> list[Extent]:
    """Data extents of the open file `fd` within [start, end), via SEEK_DATA/SEEK_HOLE."""
    return list(_extents(fd, start, end))


def data_blocks(fd: int, start: int, end: int, block: int, most_blocks: int,
                most_extents: int) -> set[int] | None:
    """The blocks that data of the open file `fd` in [start, end) touches; None when they
    are more than `most_blocks`, or the extents more than `most_extents` (each costs two
    syscalls here), without asking further."""
    found: set[int] = set()
    for n, (lo, hi) in enumerate(_extents(fd, start, end)):
        first, stop = lo // block, ceil_div(hi, block)
        if n == most_extents or len(found) + stop - first > most_blocks:
            return None
        found.update(range(first, stop))
    return found


def _has_data(fd: int, start: int, end: int) -> bool:
    """Does the open file `fd` hold data anywhere in [start, end)? One SEEK_DATA, where
    data_extents would also ask SEEK_HOLE, which tmpfs answers by walking every cached
    page up to the next hole: the whole file, for an overwrite of a dense one."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data past start
            return False
        if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
            return True
        raise


def data_prefix(fd: int, size: int, block: int) -> int:
    """How many blocks from the start of the open file `fd` (st_size `size`) all hold
    data: those before its first hole (SEEK_HOLE), a block the hole starts inside not
    counted; every block of the file if it has no hole before EOF."""
    if size <= 0:
        return 0
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # no SEEK_HOLE support: all data, as data_extents
            hole = size
        elif exc.errno == errno.ENXIO:  # the file shrank since `size`
            return 0
        else:
            raise
    return ceil_div(size, block) if hole >= size else hole // block


@dataclass(frozen=True)
class Costs:
    mode: Mode
    block_size: int

    @property
    def blocks(self) -> bool:
        return self.mode is Mode.BLOCKS

    def directory(self) -> int:
        return self.block_size if self.blocks else 0

    def symlink(self, target_length: int) -> int:
        if self.blocks:
            return self.block_size if target_length > EXT4_FAST_SYMLINK_MAX else 0
        return target_length

    def open_file(self, fd: int, size: int) -> int:
        """Cost of a regular file open as `fd` (any access mode) with st_size `size`: its
        data extents (SEEK_DATA/SEEK_HOLE), each block they touch counted once."""
        if not self.blocks:
            return size
        return count_blocks(data_extents(fd, 0, size), self.block_size) * self.block_size

    def holes(self, fd: int, off: int, end: int, size: int) -> list[int]:
        """The blocks that [off, end) touches and that hold no data yet, in the file `fd`
        of st_size `size` (block mode): what writing there would newly allocate.

        Extents are asked up to the end of the last block touched: on a backing of smaller
        blocks (1 KiB ext4) data past `end` in it means it is no hole. Blocks past EOF hold
        no data; only the part inside the file needs SEEK_DATA, so a plain append costs no
        syscall here.
        """
        block = self.block_size
        start = off - off % block
        data_end = min(ceil_div(end, block) * block, size)
        if data_end - start > block:
            extents = data_extents(fd, start, data_end)
        elif start < data_end and _has_data(fd, start, data_end):  # one block: any data?
            extents = [(start, data_end)]
        else:
            extents = []
        return hole_blocks(off, end, extents, block)

    def measure(self, st: os.stat_result, opener: Callable[[], int]) -> int:
        """What the inode behind `st` costs: the one way every inode is measured, by the
        mount scan and by every later measure alike, so that they always agree.

        A regular file in block mode is measured by its data extents, on a descriptor
        from `opener()` (closed here), never by st_blocks: on ext4 st_blocks also counts
        extent-tree and xattr blocks, which the model does not charge. Everything else
        costs what its stat says.
        """
        if not (self.blocks and stat.S_ISREG(st.st_mode)):
            return self.stat_result(st)
        try:
            fd = opener()
        except OSError as exc:
            log.debug("cannot open inode %d to measure it (%s); charging its st_blocks",
                      st.st_ino, exc.strerror)
            return self.stat_result(st)
        try:
            return self.open_file(fd, st.st_size)
        finally:
            os.close(fd)

    def stat_result(self, st: os.stat_result) -> int:
        """Cost of an inode from its stat alone: directories, symlinks, special files, and
        regular files in apparent mode. For a regular file in block mode this is only the
        fallback of measure() for a file that cannot be opened for reading at all (a
        daemon without root and a file without read permission for it): its allocation
        as the backing filesystem reports it, bounded by its size in blocks."""
        if stat.S_ISDIR(st.st_mode):
            return self.directory()
        if stat.S_ISLNK(st.st_mode):
            return self.symlink(st.st_size)
        if not stat.S_ISREG(st.st_mode):
            return 0
        if not self.blocks:
            return st.st_size
        return min(round_up(st.st_size, self.block_size),
                   round_up(st.st_blocks * 512, self.block_size))


def open_entry(dir_fd: int, name: str | bytes) -> int:
    """A descriptor of the regular file `name` in `dir_fd` to measure it with: read-only,
    never following a symlink, never blocking (a fifo that replaced it)."""
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                   dir_fd=dir_fd)


def scan_backing(root: str, costs: Costs) -> tuple[int, int]:
    """(bytes, inodes) of what the backing directory holds already; hard links once.

    The root itself is free, as a fresh filesystem's root is part of its overhead. The walk
    goes by directory descriptors, never by path, so that no depth of the tree and no
    length of `root`'s own path can make it fail with ENAMETOOLONG; it holds one
    descriptor per level of the directory it is in.
    """
    total = 0
    inodes = 0
    seen_links: set[tuple[int, int]] = set()

    def visit(dir_fd: int) -> list[str]:
        """Count the entries of one directory; return the names of its subdirectories."""
        nonlocal total, inodes
        subdirs = []
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen_links:
                        continue
                    seen_links.add(key)
                inodes += 1
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry.name)
                    total += costs.directory()
                else:
                    total += costs.measure(st, functools.partial(open_entry, dir_fd, entry.name))
        return subdirs

    stack: list[tuple[int, list[str]]] = []  # (directory fd, subdirectories left)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        stack.append((fd, []))
        stack[-1] = (fd, visit(fd))
        while stack:
            dir_fd, pending = stack[-1]
            if not pending:
                stack.pop()
                os.close(dir_fd)
                continue
            fd = os.open(pending.pop(), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                         dir_fd=dir_fd)
            stack.append((fd, []))
            stack[-1] = (fd, visit(fd))
    finally:
        for dir_fd, _ in stack:
            os.close(dir_fd)
    return total, inodes

