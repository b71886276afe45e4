"""--mmap-sigbus: quota reserved for the hole blocks of pages read through writable handles.

ext4-faithful mmap: a page brought in through a writable handle may be dirtied through a
shared mapping without the daemon hearing of it until writeback, so the quota for its hole
blocks is reserved when the kernel reads the page in; if it does not fit, the read fails
and the kernel turns that into SIGBUS at the faulting access, as ext4's page_mkwrite
does. The kernel retries a failed readahead one page at a time, so the signal lands on the
first page that does not fit. A reservation becomes usage when the block is written
(charging.py converts it), and goes back to the ledger when its handle is released, the
range truncated, the inode freed or the block filled by --crash-sim's revert of unsynced
writes. Reservations live in `Node.reserved` (block -> fh).
"""

from __future__ import annotations

from collections.abc import Callable

import pyfuse3

from quotafs.daemon.inodes import Handle, Node
from quotafs.model.costs import Costs
from quotafs.model.ledger import Ledger


class Reservations:
    def __init__(self, ledger: Ledger, costs: Costs,
                 refuse: Callable[[str, Node], pyfuse3.FUSEError]) -> None:
        self._ledger = ledger
        self._costs = costs
        self._block = costs.block_size
        self._refuse = refuse  # the quota's ENOSPC for a request on a node (an event)

    def for_read(self, handle: Handle, fh: int, off: int, size: int) -> None:
        """Reserve the hole blocks of [off, off + size) read through a writable handle."""
        node = handle.node
        end = min(off + size, node.size)
        if end <= off:
            return
        wanted = [b for b in self._costs.holes(handle.fd, off, end, node.size)
                  if b not in node.reserved]
        if not wanted:
            return
        if not self._ledger.try_reserve(len(wanted) * self._block,
                                        privileged=handle.privileged):
            raise self._refuse("read", node)
        for b in wanted:
            node.reserved[b] = fh

    def convert(self, node: Node, reserved: list[int], last: int) -> int:
        """The reserved blocks below block `last` were written: usage now. How many."""
        converted = [b for b in reserved if b < last]
        for b in converted:
            del node.reserved[b]
        if converted:
            self._ledger.convert(len(converted) * self._block)
        return len(converted)

    def release_handle(self, node: Node, fh: int) -> None:
        """The handle `fh` is released: its reservations go back."""
        mine = [b for b, owner in node.reserved.items() if owner == fh]
        for b in mine:
            del node.reserved[b]
        if mine:
            self._ledger.release(len(mine) * self._block)

    def release_all(self, node: Node) -> None:
        if node.reserved:
            self._ledger.release(len(node.reserved) * self._block)
            node.reserved.clear()

    def release_filled(self, node: Node, fd: int) -> None:
        """The file changed outside any request (--crash-sim's drop_unsynced put old data
        back): a reserved block that holds data now is charged as usage already, so its
        reservation goes back (it would count twice until its handle's release)."""
        if not node.reserved:
            return
        block = self._block
        lo, hi = min(node.reserved) * block, (max(node.reserved) + 1) * block
        holes = set(self._costs.holes(fd, lo, hi, node.size))
        filled = [b for b in node.reserved if b not in holes]
        for b in filled:
            del node.reserved[b]
        if filled:
            self._ledger.release(len(filled) * block)

    def release_from(self, node: Node, start_block: int) -> None:
        """Truncated: reservations from `start_block` on go back."""
        dropped = [b for b in node.reserved if b >= start_block]
        for b in dropped:
            del node.reserved[b]
        if dropped:
            self._ledger.release(len(dropped) * self._block)
