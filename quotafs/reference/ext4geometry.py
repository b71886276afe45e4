"""`--like-ext4 SIZE`: the room a default `mkfs.ext4` of an image of SIZE gives, measured.

No root and no mount is needed: mkfs.ext4 formats a sparse plain file, and `dumpe2fs -h`
reads its superblock. For `truncate -s 128M; mkfs.ext4` (1 KiB blocks): block count
131,072, overhead 13,869, free 117,189, reserved 6,553, inodes 32,768 (32,757 free). The
kernel then keeps back min(2% of blocks, 4096) clusters from every writer, root included
(ext4_calculate_resv_clusters), so mounted its statfs says f_blocks 117,203 (count -
overhead), f_bfree 117,189, f_bavail 108,015 (free - reserved - kept back): `df -h` 115M
size, 106M avail.

quotafs reproduces that with limit = free blocks, root's reserve = reserved blocks, kept
back = the kernel's clusters, block size and inode limit = ext4's free inodes. What ext4
used itself at mkfs (root directory, lost+found: 14 blocks and 11 inodes here) is not
part of the limit, so f_blocks and f_files are that much smaller than ext4's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from quotafs.errors import ExitCode, QuotafsError
from quotafs.reference.tools import find_tool, last_line, run_tool
from quotafs.units import format_size

MIN_SIZE = 2 * 1024 * 1024  # mkfs.ext4 refuses smaller images for lack of a journal
# The --like-ext4 values an explicit option may replace (as mkfs.ext4 -m / -N would).
OVERRIDABLE = ("limit", "reserve", "inodes")


@dataclass(frozen=True)
class Ext4Geometry:
    image_size: int
    block_size: int
    block_count: int
    overhead_blocks: int
    free_blocks: int
    reserved_blocks: int
    inode_count: int
    free_inodes: int

    @property
    def kept_back_blocks(self) -> int:
        """Clusters the kernel keeps back at mount (no bigalloc: a cluster is a block)."""
        return min(self.block_count // 50, 4096)

    def settings(self) -> dict[str, Any]:
        """The quotafs mount settings that give this filesystem's room, in bytes."""
        b = self.block_size
        return {"limit": self.free_blocks * b, "reserve": self.reserved_blocks * b,
                "kept_back": self.kept_back_blocks * b, "block_size": b,
                "inodes": self.free_inodes, "accounting": "blocks"}


def measure(size: int) -> Ext4Geometry:
    """Format a sparse temp file of `size` bytes with a default mkfs.ext4 and read its
    superblock. Raises QuotafsError with one line."""
    if size < MIN_SIZE:
        raise QuotafsError(f"--like-ext4 needs an image of at least {format_size(MIN_SIZE)}, "
                           f"got {size:,} bytes", ExitCode.USAGE)
    mkfs, dumpe2fs = (find_tool(tool, "--like-ext4: ", ExitCode.FAILURE)
                      for tool in ("mkfs.ext4", "dumpe2fs"))
    tmp = tempfile.mkdtemp(prefix="quotafs-geometry-")
    try:
        image = os.path.join(tmp, "ext4.img")
        with open(image, "wb") as f:
            f.truncate(size)
        proc = run_tool([mkfs, "-q", "-F", image])
        if proc.returncode != 0:
            raise QuotafsError(f"mkfs.ext4 of a {format_size(size)} image failed: "
                               f"{last_line(proc)}", ExitCode.USAGE)
        proc = run_tool([dumpe2fs, "-h", image])
        if proc.returncode != 0:
            raise QuotafsError(f"dumpe2fs -h failed: {last_line(proc)}", ExitCode.FAILURE)
        return parse_superblock(proc.stdout, size)
    except OSError as exc:
        raise QuotafsError(f"--like-ext4: cannot make a {format_size(size)} image in "
                           f"{tmp}: {exc.strerror}", ExitCode.FAILURE) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_FIELDS = {"Block size": "block_size", "Block count": "block_count",
           "Overhead clusters": "overhead_blocks", "Free blocks": "free_blocks",
           "Reserved block count": "reserved_blocks", "Inode count": "inode_count",
           "Free inodes": "free_inodes"}


def parse_superblock(text: str, size: int) -> Ext4Geometry:
    """The fields of `dumpe2fs -h` output that the geometry needs."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _FIELDS and value.strip().isdigit():
            found[_FIELDS[key.strip()]] = int(value)
    missing = sorted(set(_FIELDS.values()) - set(found))
    if missing or "Cluster size" in text:  # bigalloc: blocks and clusters differ
        raise QuotafsError("dumpe2fs -h gave no " + ", ".join(missing or ["block clusters"])
                           + ": not a default ext4", ExitCode.FAILURE)
    return Ext4Geometry(image_size=size, **found)


def like_ext4_settings(size: int, given: dict[str, Any]) -> dict[str, Any]:
    """Mount settings for --like-ext4 SIZE. `given` are the options given with it: limit,
    reserve and inodes (not None) replace ext4's values; block_size and accounting are
    ext4's and may not be given."""
    if given.get("block_size") is not None or given.get("accounting") == "apparent":
        raise QuotafsError("--like-ext4 sets the block size and block accounting itself: "
                           "do not combine it with --block-size or --accounting apparent",
                           ExitCode.USAGE)
    settings = measure(size).settings()
    for name in OVERRIDABLE:
        if given.get(name) is not None:
            settings[name] = given[name]
    return settings
