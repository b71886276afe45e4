"""What the ledger holds for each inode, and every change of it a request makes.

Charges are exact: each node remembers what the ledger holds for it (`Node.charged`,
measured the first time it is needed, by model/costs.py's one measure), each request
charges or credits the difference it makes, and each check-and-charge is refused whole or
rolled back when the backing syscall fails. A node the kernel forgets keeps its charge
here when measuring it again would not give it back (`kept`); a freed inode gives its
space and inode back, at the last release if it is still open (orphaned).

Allocating calls take `privileged` (may the root reserve be used?) from the request:
its caller's uid, or for read and write the handle's opener.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, NoReturn

import pyfuse3

from quotafs.daemon.inodes import Handle, InodeTable, Key, Node
from quotafs.daemon.reservations import Reservations
from quotafs.model.allocation import ceil_div
from quotafs.model.costs import Costs, data_blocks, data_prefix, open_entry
from quotafs.model.ledger import Ledger

log = logging.getLogger(__name__)


def pwrite_whole(fd: int, buf: bytes, off: int) -> tuple[int, OSError | None]:
    """Write all of `buf` at `off`: (bytes written, None), or the backing's error once part
    of it is written. Never a short count: writeback of mmap pages would take one for
    success and lose the rest, O_DIRECT would make it EIO. An error before any byte is
    written is raised as it is."""
    written = os.pwrite(fd, buf, off)
    if written == len(buf):  # nearly always
        return written, None
    view = memoryview(buf)
    while written < len(buf):
        try:
            n = os.pwrite(fd, view[written:], off + written)
        except OSError as exc:
            return written, exc
        if n == 0:
            return written, OSError(errno.EIO, "the backing file took no more bytes")
        written += n
    return written, None


def _stored(node: Node, off: int, written: int, error: OSError | None) -> int:
    """The answer to a write request whose data went to the backing file in part or
    whole (charged already): the count, or the backing's error if it stopped short."""
    end = off + written
    if end > node.size:  # (no call of max(): every write comes here)
        node.size = end
    if error is not None:
        raise error
    return written


# Blocks: past this, Node.scattered is dropped and SEEK_DATA tells (a set of 16,384 blocks,
# 64 MiB of data in 4 KiB blocks, takes about 1 MB; it lives while the file is open).
SCATTERED_MAX = 1 << 14
# At the first write into a file opened again, the extents asked (two syscalls each) to
# learn which blocks hold data: past this the file is left to SEEK_DATA at each write.
LAYOUT_EXTENTS_MAX = 1024


def _note_data(node: Node, first: int, stop: int) -> None:
    """Blocks [first, stop) of `node` now hold data: keep Node.filled/scattered true."""
    filled, scattered = node.filled, node.scattered
    if filled is None:
        return
    if first <= filled:
        if stop > filled:
            if scattered:  # the prefix takes in the blocks it reached
                scattered.difference_update(range(filled, stop))
                while stop in scattered:
                    scattered.remove(stop)
                    stop += 1
            node.filled = stop
    elif scattered is not None:
        scattered.update(range(first, stop))
        if len(scattered) > SCATTERED_MAX:
            node.scattered = None


def _truncated(node: Node, stop: int) -> None:
    """`node` now ends in block `stop`: the blocks past it hold no data."""
    if node.filled is None:
        if stop == 0:  # emptied: everything is known again
            node.filled, node.scattered = 0, set()
        return
    node.filled = min(node.filled, stop)
    if node.scattered is not None:
        node.scattered = {b for b in node.scattered if b < stop}
    elif node.filled >= stop:  # all that is left is the dense prefix
        node.scattered = set()


class Charging:
    def __init__(self, ledger: Ledger, costs: Costs, inodes: InodeTable,
                 reservations: Reservations,
                 refuse: Callable[[str, Node, bytes | None], pyfuse3.FUSEError],
                 as_daemon: Callable[[], AbstractContextManager[Any]]) -> None:
        self._ledger = ledger
        self._costs = costs
        self._block = costs.block_size
        self._inodes = inodes
        self._reservations = reservations
        # the quota's ENOSPC for a request on a node, or on a name in it (an event)
        self._refuse = refuse
        self._as_daemon = as_daemon  # measuring is the daemon's business, not the caller's
        # What the ledger holds for regular files whose node was dropped (the kernel forgot
        # them) while a fresh measure would say otherwise; taken back when the inode is
        # seen again, removed when it is freed. Usually empty: the charges are exact.
        self._kept: dict[Key, int] = {}
        # The write path, chosen once: blocks of data, or apparent sizes.
        self.write: Callable[[Handle, int, bytes], int] = (
            self._write_blocks if costs.blocks else self._write_apparent)

    # -- measuring ------------------------------------------------------------------------

    def kept(self, key: Key) -> int | None:
        """For a node new to the table: the charge kept when it was forgotten, if any."""
        return self._kept.pop(key, None)

    def charge_of(self, node: Node, st: os.stat_result | None = None) -> int:
        """What the ledger holds for `node`, measuring it the first time it is needed."""
        if node.charged is None:
            node.charged = self._measure(node, st or self._inodes.stat(node))
        return node.charged

    def _measure(self, node: Node, st: os.stat_result) -> int:
        """Costs.measure of the node: on a handle's descriptor if one is open, so that a
        file the daemon may no longer open (its mode changed) is measured all the same."""
        handle = self._inodes.open_handle_of(node)
        if handle is not None:
            fd = handle.fd
            return self._costs.measure(st, lambda: os.dup(fd))
        return self._costs.measure(st, lambda: self._open_to_measure(
            lambda: os.open(self._inodes.proc(node), os.O_RDONLY | os.O_NONBLOCK)))

    def _open_to_measure(self, opener: Callable[[], int]) -> int:
        # A caller who may unlink or truncate a file may still be refused a read of it.
        with self._as_daemon():
            return opener()

    def forget_kept(self) -> None:
        """After a power cut the ledger is a fresh scan: no kept charge holds any more."""
        self._kept.clear()

    def keep_charge(self, node: Node) -> None:
        """The node is dropped: keep its charge if measuring it again would not give it."""
        if (node.charged is None or node.kind != stat.S_IFREG
                or not self._inodes.is_current(node)):  # unmeasured, or freed
            return
        try:
            again: int | None = self._measure(node, self._inodes.stat(node))
        except (OSError, pyfuse3.FUSEError):
            again = None
        if again != node.charged:
            self._kept[node.key] = node.charged

    # -- new inodes -----------------------------------------------------------------------

    def add_inode(self, op: str, parent: Node, name: bytes | None = None) -> None:
        """Count a new inode, or refuse the request that makes it (`name` in `parent`)."""
        if not self._ledger.try_add_inode():
            raise self._refuse(op, parent, name)

    @contextlib.contextmanager
    def new_inode(self, op: str, parent: Node, privileged: bool, cost: int = 0,
                  name: bytes | None = None) -> Iterator[None]:
        """Around the syscall that makes a new inode costing `cost`: charge both first (or
        refuse), give both back if the syscall fails. The caller sets the node's charge."""
        self.add_inode(op, parent, name)
        if cost and not self._ledger.try_charge(cost, privileged=privileged):
            self._ledger.remove_inode()
            raise self._refuse(op, parent, name)
        try:
            yield
        except BaseException:
            self._ledger.remove_inode()
            if cost:
                self._ledger.credit(cost)
            raise

    def drop_inode(self) -> None:
        """A counted new inode was not made after all (create lost a race)."""
        self._ledger.remove_inode()

    # -- freeing --------------------------------------------------------------------------

    def losing_name(self, parent: Node, name: bytes,
                    st: os.stat_result) -> tuple[Node | None, int]:
        """Before `name` (the inode behind `st`) goes: its node, pinned if this is its last
        name, and what the ledger holds for the inode."""
        node = self._inodes.by_key.get((st.st_dev, st.st_ino))
        last = stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1
        if node is not None:
            charge = self.charge_of(node, st)  # measure before the name (and extents) go
            if last:
                self._inodes.pin(node)  # no name will reach it any more
            return node, charge
        if not last:
            return None, 0
        # No node: kept when the kernel forgot it, or untouched since the mount scan,
        # which measured it as this does.
        kept = self._kept.get((st.st_dev, st.st_ino))
        if kept is not None:
            return None, kept
        return None, self._costs.measure(st, lambda: self._open_to_measure(
            lambda: open_entry(self._inodes.fd(parent), name)))

    def forget_charge(self, node: Node | None, st: os.stat_result, charge: int) -> None:
        """The inode behind `st` lost its last name: give its space and inode back.
        `charge` is what losing_name said the ledger holds for it."""
        if self._ledger.inodes_used > 0:
            self._ledger.remove_inode()
        else:
            log.warning("inode %d freed with no inode counted: accounting drifted", st.st_ino)
        self._kept.pop((st.st_dev, st.st_ino), None)
        if node is None:
            self.credit(charge)
            return
        self._inodes.freed(node)
        if node.open_count > 0 and stat.S_ISREG(st.st_mode):
            # An unlinked file that is still open keeps its blocks until the last release.
            node.orphaned = True
            return
        self.credit(charge)
        node.charged = 0
        self._reservations.release_all(node)

    def handle_closed(self, node: Node, fh: int) -> None:
        """The handle `fh` of `node` is gone: its reservations go back, and an unlinked
        file's charge with its last handle."""
        if node.reserved:
            self._reservations.release_handle(node, fh)
        if node.open_count == 0:  # asked again at the next open: free the set meanwhile
            node.filled, node.scattered = None, None
        if node.open_count == 0 and node.orphaned:
            node.orphaned = False
            self.credit(node.charged or 0)
            node.charged = 0

    def credit(self, nbytes: int) -> None:
        """Give space back for a change already made on disk. Bookkeeping never fails such
        a request: a credit beyond usage (accounting drifted) is logged and clamped."""
        if nbytes > self._ledger.used:
            log.warning("credit of %d bytes exceeds usage %d: accounting drifted",
                        nbytes, self._ledger.used)
            nbytes = self._ledger.used
        self._ledger.credit(nbytes)

    # -- writes and truncates -------------------------------------------------------------

    def _write_blocks(self, handle: Handle, off: int, buf: bytes) -> int:
        """Block accounting's write. The usual one, of a database or a program, is inside
        one block of a file whose data blocks the node knows: served here in as few
        steps as a write can take (they are a third of the daemon's own cost per write);
        any other in _write_span."""
        node, block = handle.node, self._block
        index = off // block
        filled = node.filled
        if filled is None or node.reserved or off + len(buf) > (index + 1) * block:
            return self._write_span(handle, off, buf)
        scattered = node.scattered
        if index < filled or (scattered is not None and index in scattered):
            written, error = pwrite_whole(handle.fd, buf, off)  # nothing to allocate
            return _stored(node, off, written, error)
        if scattered is None:  # past the dense start, not known: SEEK_DATA tells
            return self._write_span(handle, off, buf)
        # A new block (a hole, or past the end).
        ledger = self._ledger
        charged = node.charged if node.charged is not None else self.charge_of(node)
        if block > ledger.free_for(handle.privileged):
            self._refuse_write(node)
        written, error = pwrite_whole(handle.fd, buf, off)
        if written:  # (none when the backing refused the rest of a first pwrite of 0)
            ledger.force_charge(block)
            ledger.allocating_writes += 1
            node.charged = charged + block
            if index == filled:
                _note_data(node, index, index + 1)
            else:
                scattered.add(index)
                if len(scattered) > SCATTERED_MAX:
                    node.scattered = None
        return _stored(node, off, written, error)

    def _write_span(self, handle: Handle, off: int, buf: bytes) -> int:
        """_write_blocks of any other write: several blocks, a layout not known yet, or
        reserved blocks (--mmap-sigbus)."""
        node, block = handle.node, self._block
        end = off + len(buf)
        first, last = off // block, -(-end // block)
        charged = node.charged
        if charged is None:
            charged = self.charge_of(node)
        filled = node.filled
        if filled is None and first < -(-node.size // block):
            # The first write inside the file since it was opened (an append learns
            # nothing: its blocks are new, and a log's appends then never scan it).
            filled = self._learn_layout(handle, charged)
        if filled is not None and (last <= filled or (
                last - first == 1 and node.scattered and first in node.scattered)):
            # An overwrite of blocks that hold data (most writes of a database, and every
            # rewrite; or one block past the prefix that a write filled): nothing to
            # allocate, nothing to ask the backing.
            written, error = pwrite_whole(handle.fd, buf, off)
            return _stored(node, off, written, error)
        return self._allocating_write(handle, off, buf, max(first, filled or 0), charged)

    def _allocating_write(self, handle: Handle, off: int, buf: bytes, lo: int,
                          charged: int) -> int:
        """A write that may allocate blocks from block `lo` on (those below hold data)."""
        node, block, ledger = handle.node, self._block, self._ledger
        end = off + len(buf)
        last = -(-end // block)
        scattered = node.scattered
        if lo * block >= node.size or (scattered is not None and not scattered):
            # Past EOF, or known to be holes: a range, not a list (a list of a 1 MiB
            # write's 256 block numbers took 8 µs, more than the rest of the handler).
            holes: Sequence[int] = range(lo, last)
        elif scattered is not None:
            holes = (([] if lo in scattered else [lo]) if last - lo == 1  # the usual case
                     else [b for b in range(lo, last) if b not in scattered])
        else:
            holes = self._costs.holes(handle.fd, max(off, lo * block), end, node.size)
        new, reserved = holes, []
        if node.reserved:  # --mmap-sigbus: blocks reserved by reads are no longer new
            reserved = [b for b in holes if b in node.reserved]
            new = [b for b in holes if b not in node.reserved]
        if len(new) > ledger.free_for(handle.privileged) // block:
            self._refuse_write(node)
        written, error = pwrite_whole(handle.fd, buf, off)
        stored_end = -(-(off + written) // block)
        taken = len(new) if error is None else sum(1 for b in new if b < stored_end)
        ledger.force_charge(taken * block)  # fits: checked against free_for() above
        if holes and written:
            ledger.allocating_writes += 1
        converted = self._reservations.convert(node, reserved, stored_end) if reserved else 0
        node.charged = charged + (taken + converted) * block
        if written:
            _note_data(node, off // block, stored_end)
        return _stored(node, off, written, error)

    def _learn_layout(self, handle: Handle, charged: int) -> int:
        """Node.filled and Node.scattered from the backing file, while they are unknown
        (a file opened again; they are forgotten at its last release): its dense start
        (SEEK_HOLE), and the blocks past it that hold data, unless they are too many
        (scattered stays None: each write past the start then asks SEEK_DATA)."""
        node, block = handle.node, self._block
        filled = node.filled = data_prefix(handle.fd, node.size, block)
        if filled * block >= node.size:
            node.scattered = set()
        elif charged // block - filled > SCATTERED_MAX:
            # Known too many without a scan, which on tmpfs walks every page of the file.
            node.scattered = None
        else:
            node.scattered = data_blocks(handle.fd, filled * block, node.size, block,
                                         SCATTERED_MAX, LAYOUT_EXTENTS_MAX)
        return filled

    def _write_apparent(self, handle: Handle, off: int, buf: bytes) -> int:
        node = handle.node
        charged = self.charge_of(node)
        growth = max(0, off + len(buf) - max(node.size, charged))
        if growth > self._ledger.free_for(handle.privileged):
            self._refuse_write(node)
        written, error = pwrite_whole(handle.fd, buf, off)
        new_size = max(node.size, off + written)
        if new_size > charged:
            self._ledger.force_charge(new_size - charged)
            self._ledger.allocating_writes += 1
            node.charged = new_size
        return _stored(node, off, written, error)

    def allocates(self, handle: Handle, off: int, size: int) -> bool:
        """Would a write of `size` bytes at `off` newly allocate (what allocating_writes
        counts)? For allocating fault rules: asked before the write, only while one is live."""
        node = handle.node
        if not size:
            return False
        if self._costs.blocks:
            return bool(self._costs.holes(handle.fd, off, off + size, node.size))
        return off + size > max(node.size, self.charge_of(node))

    def _refuse_write(self, node: Node) -> NoReturn:
        """A write request that does not fit whole is refused whole: a short count would
        lose data, because the kernel's writeback of mmap pages marks the pages it was not
        told about clean (msync/fsync return 0), and O_DIRECT makes it EIO."""
        self._ledger.note_enospc()
        raise self._refuse("write", node, None)

    def truncate(self, node: Node, size: int, handle: Handle | None, privileged: bool) -> None:
        if node.kind != stat.S_IFREG:
            raise pyfuse3.FUSEError(errno.EINVAL if node.kind != stat.S_IFDIR else errno.EISDIR)
        fd = handle.fd if handle is not None and handle.writable else None
        own_fd = fd is None
        if fd is None:
            fd = os.open(self._inodes.proc(node), os.O_WRONLY)
        try:
            old_charge = self.charge_of(node)
            if not self._costs.blocks and size > old_charge:
                # Apparent sizes: growing the file takes quota even though it is a hole.
                if not self._ledger.try_charge(size - old_charge, privileged=privileged):
                    raise self._refuse("truncate", node, None)
                os.ftruncate(fd, size)
                node.charged = size
            else:
                os.ftruncate(fd, size)
                self._settle(node, old_charge, self._costs.open_file(fd, size))
            node.size = size
            _truncated(node, ceil_div(size, self._block))
            self._reservations.release_from(node, ceil_div(size, self._block))
        finally:
            if own_fd:
                os.close(fd)

    def reverted(self, node: Node, revert: Callable[[], int]) -> int:
        """`revert()` changes the file outside any request (--crash-sim's drop_unsynced
        undoes its unsynced writes); the ledger follows what the file holds after it, as
        after a truncate. What revert() returned."""
        old_charge = self.charge_of(node)
        try:
            return revert()
        finally:  # what it changed, even if it stopped part way
            st = self._inodes.stat(node)
            self._settle(node, old_charge, self._measure(node, st))
            node.size = st.st_size
            node.filled, node.scattered = None, None  # old bytes came back anywhere
            self._reservations.release_from(node, ceil_div(st.st_size, self._block))
            handle = self._inodes.open_handle_of(node) if node.reserved else None
            if handle is not None:  # (a reservation lives only while a handle is open)
                self._reservations.release_filled(node, handle.fd)

    def _settle(self, node: Node, old_charge: int, new_charge: int) -> None:
        """The file's blocks changed on disk from `old_charge` to `new_charge` (made
        already: never refused)."""
        if new_charge < old_charge:
            self.credit(old_charge - new_charge)
        else:
            self._ledger.force_charge(new_charge - old_charge)
        node.charged = new_charge
