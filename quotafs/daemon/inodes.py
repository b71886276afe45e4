"""The inode and handle tables: which backing inodes the kernel knows, under which FUSE
inode numbers, and the O_PATH descriptor that reaches each of them.

Every known inode holds an O_PATH descriptor of its backing inode, so every operation is
an *at() call relative to a descriptor: no path is ever built, whatever the depth below
the mount or the length of the backing directory's own path. Beyond a budget the least
recently used descriptors are closed and opened again by name when next needed, so the
number of inodes the kernel may keep looked up is not bounded by RLIMIT_NOFILE; pinned
nodes (the root, hard links, unlinked inodes) keep theirs.
"""

from __future__ import annotations

import collections
import errno
import os
import resource
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

Key = tuple[int, int]  # (st_dev, st_ino) of the backing inode

# Inode numbers for backing inodes whose own st_ino cannot be the FUSE inode number (another
# device below the backing directory, or a number taken already) come from here: far above
# what filesystems hand out, so they do not take numbers the backing inodes will want.
_SPARE_INODES_START = 1 << 62


def default_path_fd_budget() -> int:
    """Open O_PATH descriptors of unpinned nodes kept at most: 3/4 of RLIMIT_NOFILE. (A
    floor above the limit itself, as 1024 was, ran a daemon with a low hard limit out of
    descriptors: its control socket's accept and users' opens met EMFILE.)"""
    return max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 3 // 4)


@dataclass(eq=False, slots=True)  # slots: the write path reads several fields
class Node:
    """A backing inode the kernel knows (lookup count > 0) or that is still open.

    One flat record, for speed (the write path reads several fields); each group of
    fields is written by one part only, named in its comment.
    """

    # -- the table's (inodes.py) ---------------------------------------------------------
    inode: int
    key: Key
    kind: int  # S_IFMT bits
    # Where the inode's name is, to open it again once its descriptor was closed to stay
    # within RLIMIT_NOFILE (None for the root); the latest name it was seen under.
    parent: Node | None
    name: bytes
    path_fd: int = -1  # O_PATH | O_NOFOLLOW, or -1 while closed; use InodeTable.fd()
    # Kept open: the root, and inodes whose name cannot be trusted to reach them again
    # (hard links, whose remembered name may be the one removed; unlinked inodes).
    pinned: bool = False
    lookups: int = 0
    open_count: int = 0
    size: int = 0  # regular files: st_size, kept current by our own writes/truncates
    # -- charging.py's -------------------------------------------------------------------
    charged: int | None = None  # what the ledger holds for this inode; None: not measured
    orphaned: bool = False  # unlinked while open: its charge is credited at last release
    # Regular files, block mode: blocks [0, filled) are known to hold data, so a write
    # inside them allocates nothing and needs no SEEK_DATA. None: not asked since the
    # first open (the backing may have changed while the file was closed).
    filled: int | None = None
    # The blocks from `filled` on that hold data, when known exactly (a file this daemon
    # made or emptied, or one opened again, learnt at its first write inside it, up to
    # LAYOUT_EXTENTS_MAX extents): then no write asks the backing where its holes are.
    # None: not known, SEEK_DATA tells. Both are forgotten at the last release.
    scattered: set[int] | None = None
    # -- reservations.py's ---------------------------------------------------------------
    reserved: dict[int, int] = field(default_factory=dict)  # block -> fh that reserved it
    # -- operations.py's (getxattr) ------------------------------------------------------
    # The kernel asks for security.capability before every write(2) (FUSE clears SB_NOSEC);
    # as the only writer we may remember that the file has none.
    no_capability: bool = False
    # -- paths.py's: the path below the mount, valid while path_gen is the names generation
    path: str = ""
    path_gen: int = -1
    # -- faultgate.py's: can no fault rule match a request on this node / on an entry
    # below this directory? Valid while the (rules, names) generations are the recorded.
    quiet: tuple[int, int, bool] = (-1, -1, False)
    quiet_below: tuple[int, int, bool] = (-1, -1, False)


@dataclass(eq=False, slots=True)
class Handle:
    node: Node
    fd: int
    writable: bool
    entries: list[bytes] | None = None  # directory handles: the listing snapshot
    # May the root reserve be used for this handle's writes and reads? write() and read()
    # get no RequestContext, so the opener decides (root, uid 0, as ext4's default resuid;
    # mmap writeback: the newest mapping's handle).
    privileged: bool = True
    sync: bool = False  # opened O_SYNC/O_DSYNC: every write durable (crashsim.py)


@dataclass(frozen=True)
class TableStats:
    known_inodes: int
    open_handles: int
    reserved_blocks: int


class InodeTable:
    """Nodes by FUSE inode number and by backing key, handles by number, descriptors.

    `as_daemon` gives the daemon's own identity back (for reopening a descriptor inside
    a request served with the caller's: the caller reached the node already).
    """

    def __init__(self, backing: str, path_fd_budget: int,
                 as_daemon: Callable[[], AbstractContextManager[Any]]) -> None:
        self._as_daemon = as_daemon
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[Key, Node] = {}
        self.handles: dict[int, Handle] = {}
        # Handles opened before a power cut (--crash-sim): EIO until released.
        self.dead: dict[int, Handle] = {}
        self._next_inode = _SPARE_INODES_START
        self._next_fh = 1
        # Bumped whenever a known node's name or parent changes (rename, a name seen
        # again elsewhere): every cached Node.path is then stale at once.
        self.names_gen = 0
        # Open O_PATH descriptors of unpinned nodes, least recently used first.
        self._open_paths: collections.OrderedDict[Node, None] = collections.OrderedDict()
        self._path_fd_budget = path_fd_budget
        root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(root_fd)
        root = Node(pyfuse3.ROOT_INODE, (st.st_dev, st.st_ino), stat.S_IFDIR, None, b"",
                    path_fd=root_fd, pinned=True, lookups=1)
        self.nodes[root.inode] = root
        self.by_key[root.key] = root
        self.root = root

    # -- lookups by number ----------------------------------------------------------------

    def node(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            dead = fh in self.dead  # only here: the live path pays nothing for it
            raise pyfuse3.FUSEError(errno.EIO if dead else errno.EBADF) from None

    def node_of_handle(self, fh: int) -> Node | None:
        handle = self.handles.get(fh)
        return handle.node if handle is not None else None

    def open_handle_of(self, node: Node) -> Handle | None:
        """One open handle of the node, if any."""
        if not node.open_count:
            return None
        return next((h for h in self.handles.values() if h.node is node), None)

    # -- nodes ----------------------------------------------------------------------------

    def remember(self, parent: Node, name: bytes, st: os.stat_result,
                 charged: Callable[[Key], int | None]) -> Node:
        """The node for a backing entry, created if new (`charged(key)`: what the ledger
        holds for it, None to measure when needed); does NOT count a lookup."""
        key = (st.st_dev, st.st_ino)
        node = self.by_key.get(key)
        if node is not None:
            if stat.S_ISREG(st.st_mode) and node.open_count == 0:
                node.size = st.st_size
            if node.parent is not parent or node.name != name:
                node.parent, node.name = parent, name
                self.names_gen += 1
        else:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self.fd(parent))
            node = Node(self._inode_number(st), key, stat.S_IFMT(st.st_mode), parent, name,
                        size=st.st_size, charged=charged(key))
            self.nodes[node.inode] = node
            self.by_key[key] = node
            self._adopt(node, fd)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            self.pin(node)
        return node

    def moved(self, node: Node | None, parent: Node, name: bytes) -> None:
        """A rename gave the inode behind `node` (if known) this name."""
        if node is not None:
            node.parent, node.name = parent, name

    def renamed(self) -> None:
        """After a rename: the paths of everything below a moved directory changed."""
        self.names_gen += 1

    def unused(self, node: Node) -> bool:
        return node.lookups <= 0 and node.open_count <= 0 and node is not self.root

    def drop(self, node: Node) -> None:
        """Forget an unused node (the caller settled its charge and reservations)."""
        del self.nodes[node.inode]
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        self._close_path(node)

    def freed(self, node: Node) -> None:
        """The node's inode lost its last name: once it is freed its number may come back."""
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]

    def is_current(self, node: Node) -> bool:
        """Is the node still the one its backing key names (not freed)?"""
        return self.by_key.get(node.key) is node

    def _inode_number(self, st: os.stat_result) -> int:
        """The FUSE inode number (which is also st_ino) for a backing inode new to the table.

        The backing st_ino where it can be, so that st_ino stays what it is across forgets,
        lookups and remounts, as on the backing filesystem (tar, rsync -H and find compare
        them). It cannot be reused for another inode while the node lives: the node's O_PATH
        descriptor keeps the backing inode, and so its number, allocated.
        """
        if (st.st_dev == self.root.key[0] and st.st_ino != pyfuse3.ROOT_INODE
                and st.st_ino not in self.nodes):
            return st.st_ino
        while self._next_inode in self.nodes:
            self._next_inode += 1
        self._next_inode += 1
        return self._next_inode - 1

    def named_entries(self) -> list[tuple[int, bytes]]:
        """(parent inode, name) of every known node but the root (to make the kernel forget
        them)."""
        return [(n.parent.inode, n.name) for n in self.nodes.values() if n.parent is not None]

    # -- handles --------------------------------------------------------------------------

    def new_handle(self, node: Node, fd: int, flags: int, privileged: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.handles[fh] = Handle(node, fd, writable, privileged=privileged,
                                  sync=bool(flags & os.O_DSYNC))
        node.open_count += 1
        return fh

    def pop_handle(self, fh: int) -> Handle:
        handle = self.handles.pop(fh, None) or self.dead.pop(fh)
        handle.node.open_count -= 1
        return handle

    def kill_handles(self) -> None:
        """A power cut: every open handle is dead (EIO) until it is released."""
        self.dead.update(self.handles)
        self.handles.clear()

    # -- O_PATH descriptors ---------------------------------------------------------------

    def fd(self, node: Node) -> int:
        """The node's O_PATH descriptor, opened again by name if it was closed."""
        fd = node.path_fd
        if fd >= 0:
            if not node.pinned:
                self._open_paths.move_to_end(node)
            return fd
        if node.parent is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        parent_fd = self.fd(node.parent)
        try:
            # Bookkeeping, not the caller's path walk: the caller reached this node already.
            with self._as_daemon():
                fd = os.open(node.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent_fd)
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != node.key:  # the name now holds another inode
            os.close(fd)
            raise pyfuse3.FUSEError(errno.ESTALE)
        self._adopt(node, fd)
        return fd

    def proc(self, node: Node) -> str:
        """A path that reaches the node's inode whatever its names: the magic link of its
        descriptor (not followed any further, symlinks included)."""
        return f"/proc/self/fd/{self.fd(node)}"

    def stat(self, node: Node) -> os.stat_result:
        return os.fstat(self.fd(node))  # fstat works on O_PATH descriptors, symlinks included

    def _adopt(self, node: Node, fd: int) -> None:
        node.path_fd = fd
        if node.pinned:
            return
        self._open_paths[node] = None
        while len(self._open_paths) > self._path_fd_budget:
            victim, _ = self._open_paths.popitem(last=False)
            os.close(victim.path_fd)
            victim.path_fd = -1

    def pin(self, node: Node) -> None:
        """Keep the node's descriptor open until it is forgotten (its name may go)."""
        if not node.pinned:
            self.fd(node)
            node.pinned = True
            self._open_paths.pop(node, None)

    def _close_path(self, node: Node) -> None:
        self._open_paths.pop(node, None)
        if node.path_fd >= 0:
            os.close(node.path_fd)
            node.path_fd = -1

    # -- introspection --------------------------------------------------------------------

    def statistics(self) -> TableStats:
        return TableStats(known_inodes=len(self.nodes), open_handles=len(self.handles),
                          reserved_blocks=sum(len(n.reserved) for n in self.nodes.values()))
