"""The quota: what is used, what is reserved, what is free — pure, no FUSE, no syscalls.

All byte counts are in the accounting unit chosen at mount (whole blocks in block mode,
bytes in apparent mode); the ledger does not care which. Every check-and-charge is one
method call that completes without awaiting, so within the single-threaded trio loop it
is atomic: racing writers can never push usage past the limit.

The root reserve (ext4's reserved blocks, `--reserve`): the last `root_reserve` bytes below
the limit are for privileged callers only. Every allocating method takes `privileged`:
whether the request it serves comes from one (root, for a file handle: its opener), and
`free_for()` answers for either.

Kept back (`--like-ext4` only): the last `kept_back` bytes are nobody's, root's neither,
though statfs counts them free, as ext4 keeps clusters back for delayed allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

UNLIMITED = 2**63 - 1


@dataclass
class LedgerStats:
    limit: int | None
    used: int
    reserved: int
    free: int  # what root may still allocate
    root_reserve: int
    available: int  # what everyone else may (statfs f_bavail)
    kept_back: int
    unallocated: int  # limit - used - reserved, kept back included (statfs f_bfree)
    inode_limit: int | None
    inodes_used: int
    enospc_count: int
    peak_used: int  # the highest `used` since mount (existing content included)
    allocating_writes: int  # write requests that newly allocated (counted by the daemon)


class Ledger:
    """Byte and inode budget. `used + reserved <= limit` holds after every grant.

    Credits and forced charges (existing content at mount) may leave usage above a limit
    that was lowered at runtime; that never deletes data, it only makes the next
    allocating request fail.
    """

    def __init__(self, limit: int | None = None, inode_limit: int | None = None,
                 root_reserve: int = 0, kept_back: int = 0) -> None:
        self._check_limit(limit, "limit")
        self._check_limit(inode_limit, "inode limit")
        self._check_reserve(root_reserve, limit)
        self._check_reserve(kept_back, limit)
        self.kept_back = kept_back
        self.limit = limit
        self.inode_limit = inode_limit
        self.root_reserve = root_reserve
        self.used = 0
        self.reserved = 0
        self.inodes_used = 0
        self.enospc_count = 0
        self.peak_used = 0
        # Write requests that newly allocated blocks: the write path increments it (the
        # ledger cannot tell a write's charge from another's).
        self.allocating_writes = 0

    @staticmethod
    def _check_limit(value: int | None, what: str) -> None:
        if value is not None and value < 0:
            raise ValueError(f"{what} must be >= 0, got {value}")

    @staticmethod
    def _check_reserve(reserve: int, limit: int | None) -> None:
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        if reserve and limit is None:
            raise ValueError("a reserve needs a limit (set the reserve to 0 first)")

    # -- bytes --------------------------------------------------------------------------

    def free_for(self, privileged: bool) -> int:
        """Bytes that a new allocation by such a caller may still take (never negative)."""
        limit = self.limit  # (asked by every allocating write: no call of max())
        free = (UNLIMITED if limit is None else limit - self.kept_back) - self.used - self.reserved
        if not privileged:
            free -= self.root_reserve
        return free if free > 0 else 0

    def try_charge(self, nbytes: int, *, privileged: bool) -> bool:
        """Charge `nbytes` if they fit a caller of this kind; otherwise charge nothing and
        count an ENOSPC."""
        if nbytes < 0:
            raise ValueError("charge must be >= 0")
        if nbytes > self.free_for(privileged):
            self.enospc_count += 1
            return False
        self.used = used = self.used + nbytes
        if used > self.peak_used:
            self.peak_used = used
        return True

    def force_charge(self, nbytes: int) -> None:
        """Charge without a check: content that exists already (found at mount)."""
        if nbytes < 0:
            raise ValueError("charge must be >= 0")
        self.used = used = self.used + nbytes
        if used > self.peak_used:  # the write path's one extra step: a compare
            self.peak_used = used

    def credit(self, nbytes: int) -> None:
        """Give back space (truncate, unlink, rmdir)."""
        if nbytes < 0 or nbytes > self.used:
            raise ValueError(f"credit {nbytes} outside [0, used={self.used}]")
        self.used -= nbytes

    def note_enospc(self) -> None:
        """Count an ENOSPC decided outside try_charge (a write request that does not fit
        whole)."""
        self.enospc_count += 1

    # -- reservations (ext4-faithful mmap) ----------------------------------------------

    def try_reserve(self, nbytes: int, *, privileged: bool) -> bool:
        """Hold back `nbytes` for pages that will be written through a mapping."""
        if nbytes < 0:
            raise ValueError("reservation must be >= 0")
        if nbytes > self.free_for(privileged):
            self.enospc_count += 1
            return False
        self.reserved += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """Drop a reservation that was not used (handle released, range truncated)."""
        if nbytes < 0 or nbytes > self.reserved:
            raise ValueError(f"release {nbytes} outside [0, reserved={self.reserved}]")
        self.reserved -= nbytes

    def convert(self, nbytes: int) -> None:
        """Turn a reservation into usage: the reserved pages were written."""
        self.release(nbytes)
        self.used += nbytes
        if self.used > self.peak_used:
            self.peak_used = self.used

    # -- inodes -------------------------------------------------------------------------

    def try_add_inode(self) -> bool:
        if self.inode_limit is not None and self.inodes_used >= self.inode_limit:
            self.enospc_count += 1
            return False
        self.inodes_used += 1
        return True

    def force_add_inodes(self, count: int) -> None:
        self.inodes_used += count

    def remove_inode(self) -> None:
        if self.inodes_used <= 0:
            raise ValueError("no inode to remove")
        self.inodes_used -= 1

    def recount(self, used: int, inodes: int) -> None:
        """After a power cut (daemon/crashsim.py): usage and inodes are a fresh scan's,
        and nothing is reserved (every handle that held a reservation is dead)."""
        if used < 0 or inodes < 0:
            raise ValueError("a recount cannot be negative")
        self.used, self.inodes_used, self.reserved = used, inodes, 0

    # -- runtime control ----------------------------------------------------------------

    def set_limit(self, limit: int | None, root_reserve: int | None = None) -> None:
        """Change the limit and (unless None) the root reserve together, or neither. The
        reserve may exceed a lowered limit (as usage may): then only root gets anything."""
        reserve = self.root_reserve if root_reserve is None else root_reserve
        self._check_limit(limit, "limit")
        self._check_reserve(reserve, limit)
        self.limit, self.root_reserve = limit, reserve
        if limit is None:
            self.kept_back = 0  # part of a limit (--like-ext4's): no limit, nothing kept

    def set_inode_limit(self, inode_limit: int | None) -> None:
        self._check_limit(inode_limit, "inode limit")
        self.inode_limit = inode_limit

    def stats(self) -> LedgerStats:
        return LedgerStats(
            limit=self.limit,
            used=self.used,
            reserved=self.reserved,
            free=self.free_for(True),
            root_reserve=self.root_reserve,
            available=self.free_for(False),
            kept_back=self.kept_back,
            unallocated=self.free_for(True) if self.limit is None else max(
                0, self.limit - self.used - self.reserved),
            inode_limit=self.inode_limit,
            inodes_used=self.inodes_used,
            enospc_count=self.enospc_count,
            peak_used=self.peak_used,
            allocating_writes=self.allocating_writes,
        )
