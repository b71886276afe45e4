"""The seam between the handlers and the FUSE session: every call into pyfuse3's session.

QuotaFS never calls a pyfuse3 *session* function (one that needs a mounted, running
pyfuse3: readdir_reply, invalidate_entry_async, get_sup_groups, and after a power cut
invalidate_inode/invalidate_entry) directly; it calls the `Kernel` object it was built
with. `Kernel` (this module) forwards to pyfuse3. An
in-process test layer, which calls the handlers without /dev/fuse, passes its own object
with the same methods (`build_filesystem(config, kernel=...)`), e.g. one whose
readdir_reply collects the entries into the token it was handed. pyfuse3's plain data
types (EntryAttributes, FileInfo, StatvfsData, FUSEError) need no session and are used
directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import pyfuse3
from pyfuse3 import FileNameT, InodeT


class Kernel:
    """The FUSE session of a mounted pyfuse3 (what a test layer replaces)."""

    def readdir_reply(self, token: pyfuse3.ReaddirToken, name: bytes,
                      attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        """Add an entry to a readdir answer; False when the kernel's buffer is full."""
        return pyfuse3.readdir_reply(token, FileNameT(name), attrs, next_id)

    def invalidate_entries(self, entries: Iterable[tuple[int, bytes]]) -> int:
        """Ask the kernel to drop the cached (parent inode, name) entries, so that it forgets
        their inodes as under memory pressure; asynchronous. How many were asked."""
        count = 0
        for parent, name in entries:
            pyfuse3.invalidate_entry_async(InodeT(parent), FileNameT(name), ignore_enoent=True)
            count += 1
        return count

    def invalidate(self, inodes: Sequence[int], entries: Sequence[tuple[int, bytes]]) -> None:
        """Drop the kernel's cached attributes and pages of `inodes` and its cached
        (parent inode, name) `entries`, synchronously: call it from a thread other than the
        loop's, which must answer what the kernel asks meanwhile (writeback). Twice for the
        pages: a dirty mmap page whose writeback failed is clean on the second pass."""
        for _ in range(2):
            for inode in inodes:
                with contextlib.suppress(OSError):  # forgotten meanwhile
                    pyfuse3.invalidate_inode(InodeT(inode), attr_only=False)
        for parent, name in entries:
            with contextlib.suppress(OSError):  # not cached (ENOENT)
                pyfuse3.invalidate_entry(InodeT(parent), FileNameT(name))

    def sup_groups(self, pid: int) -> set[int]:
        """The supplementary groups of the calling process `pid` (raises if it is gone)."""
        return pyfuse3.get_sup_groups(pid)
