"""What a file, directory or symlink costs, measured on the backing filesystem.

Block mode charges whole blocks of data, as ext4 allocates them: holes are free, a partly
written block costs a whole one, a directory costs one block, a symlink whose target does
not fit in the inode (60 bytes or more, as ext4's fast symlinks) costs one block.
Apparent mode charges st_size of files and the target length of symlinks.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass

from quotafs.allocation import Extent, count_blocks, round_up

EXT4_FAST_SYMLINK_MAX = 59  # ext4 keeps targets shorter than 60 bytes inside the inode


class Mode(enum.Enum):
    BLOCKS = "blocks"
    APPARENT = "apparent"


def data_extents(fd: int, start: int, end: int) -> list[Extent]:
    """Data extents of the open file `fd` within [start, end), via SEEK_DATA/SEEK_HOLE."""
    extents: list[Extent] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past pos
                break
            if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                return [(start, end)]
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        extents.append((data, min(hole, end)))
        pos = hole
    return extents


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
        """Cost of a regular file open as `fd` (any access mode) with st_size `size`."""
        if not self.blocks:
            return size
        return count_blocks(data_extents(fd, 0, size), self.block_size) * self.block_size

    def stat_result(self, st: os.stat_result) -> int:
        """Cost of an inode from its stat alone. For a sparse regular file in block mode
        this is the backing allocation rounded to blocks; callers that can open the file
        use open_file() instead, which reads the extents."""
        if stat.S_ISDIR(st.st_mode):
            return self.directory()
        if stat.S_ISLNK(st.st_mode):
            return self.symlink(st.st_size)
        if not stat.S_ISREG(st.st_mode):
            return 0
        if not self.blocks:
            return st.st_size
        # Not sparse: every block up to EOF holds data, which is what SEEK_DATA would say.
        return min(round_up(st.st_size, self.block_size),
                   round_up(st.st_blocks * 512, self.block_size))

    def is_sparse(self, st: os.stat_result) -> bool:
        return self.blocks and stat.S_ISREG(st.st_mode) and \
            st.st_blocks * 512 < round_up(st.st_size, self.block_size)

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
                elif costs.is_sparse(st):
                    total += _measure_sparse_at(dir_fd, entry.name, st, costs)
                else:
                    total += costs.stat_result(st)
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


def _measure_sparse_at(dir_fd: int, name: str, st: os.stat_result, costs: Costs) -> int:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return costs.stat_result(st)
    try:
        return costs.open_file(fd, st.st_size)
    finally:
        os.close(fd)
