"""The pyfuse3 Operations: a passthrough over a backing directory that enforces the ledger.

Every known inode holds an O_PATH descriptor of its backing inode, so every operation is
an *at() call relative to a descriptor: no path is ever built, whatever the depth below
the mount or the length of the backing directory's own path. Handlers are plain
functions wrapped by `handler`, the error boundary: OSError becomes the same errno (an EIO
from the backing is logged as a warning), an unexpected exception is logged and answered
with EIO, so the daemon never dies of one.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import resource
import stat
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NoReturn, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from quotafs.daemon import permissions, syscalls
from quotafs.daemon.control import ControlChannel
from quotafs.model.allocation import ceil_div, hole_blocks
from quotafs.model.costs import Costs, data_extents, open_entry
from quotafs.model.faults import Effect, FaultEngine
from quotafs.model.ledger import Ledger
from quotafs.protocol import PREFIX as CONTROL_PREFIX

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

Key = tuple[int, int]  # (st_dev, st_ino) of the backing inode

# Flags the daemon must not pass to the backing open: creation and truncation are separate
# requests, O_APPEND would make pwrite ignore the offset the kernel computed, O_NOFOLLOW
# would refuse the /proc/self/fd magic link itself (the kernel has resolved the name
# already), and O_DIRECT would hold the daemon's own unaligned buffers to the backing
# filesystem's alignment rules (the kernel already bypasses its cache for the caller).
_STRIP_OPEN_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND
                     | os.O_NOFOLLOW | os.O_DIRECT)

_CAPABILITY_XATTR = b"security.capability"
_RENAME_WHITEOUT = 4  # linux/fs.h; pyfuse3 names only RENAME_EXCHANGE and RENAME_NOREPLACE

# Inode numbers for backing inodes whose own st_ino cannot be the FUSE inode number (another
# device below the backing directory, or a number taken already) come from here: far above
# what filesystems hand out, so they do not take numbers the backing inodes will want.
_SPARE_INODES_START = 1 << 62


# Requests that look up, open, create, change or remove backing inodes: their syscalls run
# with the caller's filesystem uid, gid and groups (when those are not the daemon's own),
# so that the backing filesystem applies the caller's rights to fresh attributes, never
# root's. Not getattr, readlink, statfs: an O_PATH descriptor's fstat/readlink needs none.
_AS_CALLER = frozenset({"lookup", "setattr", "mknod", "mkdir", "symlink", "link", "unlink",
                        "rmdir", "rename", "open", "create", "opendir", "getxattr",
                        "setxattr", "listxattr", "removexattr"})


def _pwrite_whole(fd: int, buf: bytes, off: int) -> tuple[int, OSError | None]:
    """Write all of `buf` at `off`: (bytes written, None), or the backing's error once part
    of it is written. Never a short count: writeback of mmap pages would take one for
    success and lose the rest, O_DIRECT would make it EIO. An error before any byte is
    written is raised as it is."""
    written = os.pwrite(fd, buf, off)
    view: memoryview | None = None
    while written < len(buf):
        view = view if view is not None else memoryview(buf)
        try:
            n = os.pwrite(fd, view[written:], off + written)
        except OSError as exc:
            return written, exc
        if n == 0:
            return written, OSError(errno.EIO, "the backing file took no more bytes")
        written += n
    return written, None


def handler(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Wrap a synchronous handler body as the async pyfuse3 handler with the error boundary.

    The body runs without awaiting, so check-and-charge sequences in it are atomic with
    respect to every other request.
    """

    op = fn.__name__
    as_caller = op in _AS_CALLER

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            fs = args[0] if args else None
            faults = getattr(fs, "faults", None)
            if faults is not None and faults.active:
                await fs._inject(op, args[1:])  # type: ignore[attr-defined]
            if fs is not None:
                fs._note_caller(op, args[1:])  # type: ignore[attr-defined]
            if as_caller and isinstance(fs, QuotaFS):
                identity = fs._identity_of(args[-1])  # type: ignore[arg-type]
                if identity is not None:
                    with identity:
                        if fs._checking is not None:
                            fs._check_request(op, args[1:])
                        return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno in (None, 0, errno.EIO):  # a sick backing, never the caller's fault
                log.warning("%s: %s; answering EIO", op, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(eq=False)
class Node:
    """A backing inode the kernel knows (lookup count > 0) or that is still open."""

    inode: int
    key: Key
    kind: int  # S_IFMT bits
    # Where the inode's name is, to open it again once its descriptor was closed to stay
    # within RLIMIT_NOFILE (None for the root); the latest name it was seen under.
    parent: Node | None
    name: bytes
    path_fd: int = -1  # O_PATH | O_NOFOLLOW, or -1 while closed; use QuotaFS._fd()
    # Kept open: the root, and inodes whose name cannot be trusted to reach them again
    # (hard links, whose remembered name may be the one removed; unlinked inodes).
    pinned: bool = False
    lookups: int = 0
    open_count: int = 0
    size: int = 0  # regular files: st_size, kept current by our own writes/truncates
    charged: int | None = None  # what the ledger holds for this inode; None: not measured
    orphaned: bool = False  # unlinked while open: its charge is credited at last release
    reserved: dict[int, int] = field(default_factory=dict)  # block -> fh that reserved it
    # The kernel asks for security.capability before every write(2) (FUSE clears SB_NOSEC);
    # as the only writer we may remember that the file has none.
    no_capability: bool = False
    # The path below the mount, valid while path_gen equals QuotaFS._names_gen.
    path: str = ""
    path_gen: int = -1
    # Can no fault rule match a request on this node / on an entry below this directory?
    # Valid while the (rules, names) generations are the ones recorded.
    quiet: tuple[int, int, bool] = (-1, -1, False)
    quiet_below: tuple[int, int, bool] = (-1, -1, False)


@dataclass(eq=False)
class Handle:
    node: Node
    fd: int
    writable: bool
    entries: list[bytes] | None = None  # directory handles: the listing snapshot
    # The opener's uid: write() and read() get no RequestContext, so the root reserve is
    # granted by who opened the handle (mmap writeback: the newest mapping's handle).
    uid: int = 0


# What a request names, for fault rules: (node, None) for the node itself, (directory
# node, name) for an entry of it; the node is None when the daemon does not know it.
Subject = tuple[Node | None, bytes | None]

CACHE_TIMEOUT = 60.0  # seconds


@dataclass
class Options:
    costs: Costs
    mmap_sigbus: bool = False
    # Kernel cache timeouts. quotafs is the only writer of the backing directory while
    # mounted, and the kernel drops what it cached for every change made through the
    # mount, so long timeouts stay exact; --no-cache sets 0 for shared backing dirs.
    attr_timeout: float = CACHE_TIMEOUT
    entry_timeout: float = CACHE_TIMEOUT
    keep_cache: bool = True


class QuotaFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False  # write(2) itself must return ENOSPC
    enable_acl = True

    def __init__(self, backing: str, ledger: Ledger, options: Options,
                 control: ControlChannel | None = None,
                 faults: FaultEngine | None = None) -> None:
        super().__init__()
        self.faults = faults
        self._pending: Effect | None = None  # a short-write/corrupt-read for the next body
        self.ledger = ledger
        self.options = options
        self.costs = options.costs
        self.block = options.costs.block_size
        self.control = control
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[Key, Node] = {}
        # What the ledger holds for regular files whose node was dropped (the kernel forgot
        # them) while a fresh measure would say otherwise; taken back when the inode is
        # seen again, removed when it is freed. Usually empty: the charges are exact.
        self._forgotten: dict[Key, int] = {}
        self._handles: dict[int, Handle] = {}
        self._next_inode = _SPARE_INODES_START
        self._next_fh = 1
        # Bumped whenever a known node's name or parent changes (rename, a name seen
        # again elsewhere): every cached Node.path is then stale at once.
        self._names_gen = 0
        root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(root_fd)
        root = Node(pyfuse3.ROOT_INODE, (st.st_dev, st.st_ino), stat.S_IFDIR, None, b"",
                    path_fd=root_fd, pinned=True, lookups=1)
        # Open O_PATH descriptors of unpinned nodes, least recently used first; beyond the
        # budget the oldest are closed and opened again by name when next needed, so the
        # number of inodes the kernel may keep looked up is not bounded by RLIMIT_NOFILE.
        self._open_paths: collections.OrderedDict[Node, None] = collections.OrderedDict()
        self._path_fd_budget = int(os.environ.get(
            "QUOTAFS_PATH_FD_BUDGET",  # for tests that exercise closing and reopening
            max(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 3 // 4)))
        self._nodes[root.inode] = root
        self._by_key[root.key] = root
        self.root = root
        self._is_root = os.geteuid() == 0
        self._caller_uid = 0  # of the request being served; see _note_caller
        self._identity = syscalls.Identity()
        self._checking: permissions.Caller | None = None  # non-root daemon, other caller

    # -- whose rights a request's syscalls use --------------------------------------------

    def _identity_of(self, ctx: pyfuse3.RequestContext) -> AbstractContextManager[None] | None:
        """A context that runs the body with the caller's identity; None for the daemon's."""
        identity = self._identity
        if ctx.uid == identity.uid and ctx.gid == identity.gid:
            return None  # the common case (every request on a mount without allow_other)
        try:
            groups = pyfuse3.get_sup_groups(ctx.pid)
        except (OSError, RuntimeError, ValueError):
            groups = set()  # the caller is gone or out of sight: no groups, fewer rights
        if not self._is_root:  # cannot switch: check the caller's rights instead
            return self._checking_as(permissions.Caller(ctx.uid, ctx.gid, frozenset(groups)))
        return identity.caller(ctx.uid, ctx.gid, sorted(groups))

    @contextlib.contextmanager
    def _checking_as(self, caller: permissions.Caller) -> Iterator[None]:
        self._checking = caller
        try:
            yield
        finally:
            self._checking = None

    def _may(self, node: Node, mask: int) -> bool:
        caller = self._checking
        assert caller is not None
        st = self._stat(node)
        return permissions.allowed(st, caller, mask, self._has_acl(node, st, caller))

    def _has_acl(self, node: Node, st: os.stat_result, caller: permissions.Caller) -> bool:
        if st.st_uid == caller.uid or stat.S_ISLNK(st.st_mode):
            return False  # the owner's bits decide, ACL or not
        try:
            os.getxattr(self._proc(node), permissions.ACL_XATTR)
        except OSError:
            return False
        return True

    def _check_request(self, op: str, args: tuple[Any, ...]) -> None:
        """A non-root daemon's check of another user's request against fresh attributes
        (the open itself is checked in _open_node, which the create race reaches too)."""
        caller = self._checking
        assert caller is not None
        require, W, X = permissions.require, permissions.W, permissions.X
        if op in ("lookup", "mknod", "mkdir", "symlink", "create"):
            require(self._may(self._node(args[0]), X if op == "lookup" else W | X))
        elif op == "opendir":
            require(self._may(self._node(args[0]), permissions.R))
        elif op == "setattr":
            self._check_setattr(caller, self._node(args[0]), args[1], args[2], args[3])
        elif op == "link":
            node, st = self._node(args[0]), self._stat(self._node(args[0]))
            require(self._may(self._node(args[1]), W | X))
            require(permissions.owns(st, caller)
                    or self._may(node, permissions.R | W), errno.EPERM)
        elif op in ("unlink", "rmdir"):
            self._check_delete(caller, self._node(args[0]), args[1], required=True)
        elif op == "rename":
            self._check_delete(caller, self._node(args[0]), args[1], required=True)
            if not self._check_delete(caller, self._node(args[2]), args[3], required=False):
                require(self._may(self._node(args[2]), W | X))
        elif op in ("getxattr", "setxattr", "removexattr"):
            node, name = self._node(args[0]), bytes(args[1])
            if node is self.root and name.startswith(CONTROL_PREFIX):
                return
            if name.startswith(b"user."):
                require(self._may(node, permissions.R if op == "getxattr" else W))
            elif op != "getxattr" and name.startswith(b"system.posix_acl"):
                require(permissions.owns(self._stat(node), caller), errno.EPERM)

    def _check_setattr(self, caller: permissions.Caller, node: Node,
                       attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                       fh: int | None) -> None:
        require, st = permissions.require, self._stat(node)
        handle = self._handles.get(fh) if fh else None
        if fields.update_size and not (handle is not None and handle.writable):
            require(self._may(node, permissions.W))
        if fields.update_mode or fields.update_uid:
            require(permissions.owns(st, caller)
                    and (not fields.update_uid or attr.st_uid == st.st_uid), errno.EPERM)
        if fields.update_gid:
            require(permissions.owns(st, caller) and (
                attr.st_gid in (st.st_gid, caller.gid) or attr.st_gid in caller.groups),
                errno.EPERM)
        if fields.update_atime or fields.update_mtime:
            # Explicit times are the owner's; "now" (which pyfuse3 makes explicit) also
            # whoever may write: the latter is as much as can be told apart here.
            require(permissions.owns(st, caller) or self._may(node, permissions.W))

    def _check_delete(self, caller: permissions.Caller, parent: Node, name: bytes,
                      required: bool) -> bool:
        """Check removing/replacing parent/name; False if there is no such entry."""
        try:
            victim = os.stat(name, dir_fd=self._fd(parent), follow_symlinks=False)
        except FileNotFoundError:
            if required:
                raise
            return False
        parent_st = self._stat(parent)
        permissions.require(self._may(parent, permissions.W | permissions.X))
        permissions.require(permissions.may_delete(parent_st, victim, caller), errno.EPERM)
        return True

    def _as_daemon(self) -> AbstractContextManager[None]:
        """The daemon's own rights for bookkeeping (measuring, reopening descriptors)."""
        return self._identity.daemon()

    def _note_caller(self, op: str, args: tuple[Any, ...]) -> None:
        """Before each request's synchronous body: who asks, for new handles and for the
        ledger's root reserve (only root, uid 0, may use it, as ext4's default resuid)."""
        ctx = args[-1] if args else None
        if isinstance(ctx, pyfuse3.RequestContext):
            self._caller_uid = ctx.uid
        elif self.ledger.root_reserve and op in ("read", "write"):
            handle = self._handles.get(args[0])
            self._caller_uid = handle.uid if handle is not None else -1
        self.ledger.privileged = self._caller_uid == 0

    # -- tables ---------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _remember(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """The node for a backing entry, created if new; does NOT count a lookup."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None:
            if stat.S_ISREG(st.st_mode) and node.open_count == 0:
                node.size = st.st_size
            if node.parent is not parent or node.name != name:
                node.parent, node.name = parent, name
                self._names_gen += 1
        else:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self._fd(parent))
            node = Node(self._inode_number(st), key, stat.S_IFMT(st.st_mode), parent, name,
                        size=st.st_size, charged=self._forgotten.pop(key, None))
            self._nodes[node.inode] = node
            self._by_key[key] = node
            self._adopt(node, fd)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            self._pin(node)
        return node

    # -- O_PATH descriptors ---------------------------------------------------------------

    def _fd(self, node: Node) -> int:
        """The node's O_PATH descriptor, opened again by name if it was closed."""
        fd = node.path_fd
        if fd >= 0:
            if not node.pinned:
                self._open_paths.move_to_end(node)
            return fd
        if node.parent is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        parent_fd = self._fd(node.parent)
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

    def _proc(self, node: Node) -> str:
        return f"/proc/self/fd/{self._fd(node)}"

    def _adopt(self, node: Node, fd: int) -> None:
        node.path_fd = fd
        if node.pinned:
            return
        self._open_paths[node] = None
        while len(self._open_paths) > self._path_fd_budget:
            victim, _ = self._open_paths.popitem(last=False)
            os.close(victim.path_fd)
            victim.path_fd = -1

    def _pin(self, node: Node) -> None:
        """Keep the node's descriptor open until it is forgotten (its name may go)."""
        if not node.pinned:
            self._fd(node)
            node.pinned = True
            self._open_paths.pop(node, None)

    def _close_path(self, node: Node) -> None:
        self._open_paths.pop(node, None)
        if node.path_fd >= 0:
            os.close(node.path_fd)
            node.path_fd = -1

    def _inode_number(self, st: os.stat_result) -> int:
        """The FUSE inode number (which is also st_ino) for a backing inode new to the table.

        The backing st_ino where it can be, so that st_ino stays what it is across forgets,
        lookups and remounts, as on the backing filesystem (tar, rsync -H and find compare
        them). It cannot be reused for another inode while the node lives: the node's O_PATH
        descriptor keeps the backing inode, and so its number, allocated.
        """
        if (st.st_dev == self.root.key[0] and st.st_ino != pyfuse3.ROOT_INODE
                and st.st_ino not in self._nodes):
            return st.st_ino
        while self._next_inode in self._nodes:
            self._next_inode += 1
        self._next_inode += 1
        return self._next_inode - 1

    def _drop_if_unused(self, node: Node) -> None:
        if node.lookups > 0 or node.open_count > 0 or node is self.root:
            return
        self._keep_charge(node)
        del self._nodes[node.inode]
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        self._release_all_reservations(node)
        self._close_path(node)

    def _keep_charge(self, node: Node) -> None:
        """The node is dropped: keep its charge if measuring it again would not give it."""
        if (node.charged is None or node.kind != stat.S_IFREG
                or self._by_key.get(node.key) is not node):  # unmeasured, or freed
            return
        try:
            again: int | None = self._measure(node, self._stat(node))
        except (OSError, pyfuse3.FUSEError):
            again = None
        if again != node.charged:
            self._forgotten[node.key] = node.charged

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(node.inode)
        entry.generation = 0
        entry.entry_timeout = self.options.entry_timeout
        entry.attr_timeout = self.options.attr_timeout
        entry.st_mode = ModeT(st.st_mode)
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _stat(self, node: Node) -> os.stat_result:
        return os.fstat(self._fd(node))  # fstat works on O_PATH descriptors, symlinks included

    def _lookup_entry(self, parent: Node, name: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        st = os.stat(name, dir_fd=self._fd(parent), follow_symlinks=False)
        node = self._remember(parent, name, st)
        node.lookups += 1
        return node, self._attrs(node, st)

    # -- accounting helpers ---------------------------------------------------------------

    def _charge_of(self, node: Node, st: os.stat_result | None = None) -> int:
        """What the ledger holds for `node`, measuring it the first time it is needed."""
        if node.charged is None:
            node.charged = self._measure(node, st or self._stat(node))
        return node.charged

    def _measure(self, node: Node, st: os.stat_result) -> int:
        """Costs.measure of the node: on a handle's descriptor if one is open, so that a
        file the daemon may no longer open (its mode changed) is measured all the same."""
        handle = next((h for h in self._handles.values() if h.node is node),
                      None) if node.open_count else None
        if handle is not None:
            fd = handle.fd
            return self.costs.measure(st, lambda: os.dup(fd))
        return self.costs.measure(st, lambda: self._open_to_measure(
            lambda: os.open(self._proc(node), os.O_RDONLY | os.O_NONBLOCK)))

    def _open_to_measure(self, opener: Callable[[], int]) -> int:
        # Measuring is the daemon's business, not the caller's: a caller who may unlink or
        # truncate a file may still be refused a read of it.
        with self._as_daemon():
            return opener()

    def _losing_name(self, parent: Node, name: bytes,
                     st: os.stat_result) -> tuple[Node | None, int]:
        """Before `name` (the inode behind `st`) goes: its node, pinned if this is its last
        name, and what the ledger holds for the inode."""
        node = self._by_key.get((st.st_dev, st.st_ino))
        last = stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1
        if node is not None:
            charge = self._charge_of(node, st)  # measure before the name (and extents) go
            if last:
                self._pin(node)  # no name will reach it any more
            return node, charge
        if not last:
            return None, 0
        # No node: kept when the kernel forgot it, or untouched since the mount scan,
        # which measured it as this does.
        kept = self._forgotten.get((st.st_dev, st.st_ino))
        if kept is not None:
            return None, kept
        return None, self.costs.measure(st, lambda: self._open_to_measure(
            lambda: open_entry(self._fd(parent), name)))

    def _forget_charge(self, node: Node | None, st: os.stat_result, charge: int) -> None:
        """The inode behind `st` lost its last name: give its space and inode back.
        `charge` is what _losing_name said the ledger holds for it."""
        if self.ledger.inodes_used > 0:
            self.ledger.remove_inode()
        else:
            log.warning("inode %d freed with no inode counted: accounting drifted", st.st_ino)
        self._forgotten.pop((st.st_dev, st.st_ino), None)
        if node is None:
            self._credit(charge)
            return
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]  # once the inode is freed, its number may come back
        if node.open_count > 0 and stat.S_ISREG(st.st_mode):
            # An unlinked file that is still open keeps its blocks until the last release.
            node.orphaned = True
            return
        self._credit(charge)
        node.charged = 0
        self._release_all_reservations(node)

    def _credit(self, nbytes: int) -> None:
        """Give space back for a change already made on disk. Bookkeeping never fails such
        a request: a credit beyond usage (accounting drifted) is logged and clamped."""
        if nbytes > self.ledger.used:
            log.warning("credit of %d bytes exceeds usage %d: accounting drifted",
                        nbytes, self.ledger.used)
            nbytes = self.ledger.used
        self.ledger.credit(nbytes)

    def _release_all_reservations(self, node: Node) -> None:
        if node.reserved:
            self.ledger.release(len(node.reserved) * self.block)
            node.reserved.clear()

    def _release_reservations_from(self, node: Node, start_block: int) -> None:
        dropped = [b for b in node.reserved if b >= start_block]
        for b in dropped:
            del node.reserved[b]
        if dropped:
            self.ledger.release(len(dropped) * self.block)

    def _enospc(self, op: str, node: Node) -> pyfuse3.FUSEError:
        if self.control is not None:
            self.control.record_quota_hit(op, self._path(node))
        return pyfuse3.FUSEError(errno.ENOSPC)

    def _new_inode_or_enospc(self, op: str, parent: Node) -> None:
        if not self.ledger.try_add_inode():
            raise self._enospc(op, parent)

    # -- fault injection ------------------------------------------------------------------

    _NAME_OPS = frozenset({"lookup", "mknod", "mkdir", "unlink", "rmdir", "symlink", "create"})
    _HANDLE_OPS = frozenset({"read", "write", "flush", "fsync", "release", "readdir",
                             "releasedir", "fsyncdir"})
    _XATTR_OPS = frozenset({"getxattr", "setxattr", "removexattr"})

    def _path(self, node: Node) -> str:
        """The node's path below the mount, for fault rules and events.

        Built from the remembered names and cached per node (every request of an idle
        fault rule asks), except for pinned nodes: a hard link or an unlinked inode, whose
        remembered name may be gone, so the kernel is asked where the descriptor is now.
        """
        gen = self._names_gen
        if node is self.root:
            return "/"
        if node.pinned:
            return self.control.path_of(self._fd(node)) if self.control else "?"
        # Walk up to the nearest node whose cached path is current, then fill in downward.
        chain: list[Node] = []
        walk: Node | None = node
        while walk is not None and walk.path_gen != gen:
            if walk is self.root:
                walk.path, walk.path_gen = "/", gen
                break
            if walk.pinned:  # an ancestor: cannot happen for directories, but be safe
                base = self.control.path_of(self._fd(walk)) if self.control else "?"
                return base.rstrip("/") + "".join(
                    "/" + os.fsdecode(n.name) for n in reversed(chain))
            chain.append(walk)
            walk = walk.parent
        base = walk.path if walk is not None else "?"
        for below in reversed(chain):
            base = below.path = ("" if base == "/" else base) + "/" + os.fsdecode(below.name)
            below.path_gen = gen
        return base

    def _subjects(self, op: str, args: tuple[Any, ...]) -> list[Subject]:
        """What a request names, for fault rules: a node, or an entry (a directory node and
        a name); two for rename and link (the second path a rule may match)."""
        nodes = self._nodes
        if op in self._NAME_OPS:
            return [(nodes.get(args[0]), args[1])]
        if op == "rename":
            return [(nodes.get(args[0]), args[1]), (nodes.get(args[2]), args[3])]
        if op == "link":
            return [(nodes.get(args[1]), args[2]), (nodes.get(args[0]), None)]
        if op in self._HANDLE_OPS:
            handle = self._handles.get(args[0])
            return [(handle.node if handle is not None else None, None)]
        if op == "statfs":
            return [(self.root, None)]
        return [(nodes.get(args[0]), None)]

    def _subject_path(self, node: Node | None, name: bytes | None) -> str:
        base = self._path(node) if node is not None else "?"
        return base if name is None else base.rstrip("/") + "/" + os.fsdecode(name)

    def _quiet(self, node: Node | None, below: bool) -> bool:
        """True if no live rule can match a request on the node (below=False) or on an
        entry of the directory (below=True), so the request needs no check at all.
        Cached per node; pinned nodes, whose path the kernel tells, are always checked."""
        assert self.faults is not None
        if node is None or (node.pinned and node is not self.root):
            return False
        rules, names = self.faults.generation, self._names_gen
        cached = node.quiet_below if below else node.quiet
        if cached[0] == rules and cached[1] == names:
            return cached[2]
        path = self._path(node)
        quiet = not (self.faults.may_match_below(path) if below
                     else self.faults.may_match_path(path))
        if below:
            node.quiet_below = (rules, names, quiet)
        else:
            node.quiet = (rules, names, quiet)
        return quiet

    async def _inject(self, op: str, args: tuple[Any, ...]) -> None:
        """Consult the fault rules before a request's body runs (only when rules exist)."""
        assert self.faults is not None
        if op == "setattr" and args[2].update_size:
            op = "truncate"
        if not self.faults.concerns(op) or (op in self._XATTR_OPS and args[0] == self.root.inode
                                   and bytes(args[1]).startswith(CONTROL_PREFIX)):
            return  # forget/releasedir, and the control channel itself, are never faulted
        subjects = self._subjects(op, args)
        # Nodes remember that no rule can match them: an idle rule costs a lookup here.
        if all(self._quiet(node, below=name is not None) for node, name in subjects):
            return
        path, *others = [self._subject_path(node, name) for node, name in subjects]
        path2 = others[0] if others else None
        effect = self.faults.check(op, path, path2, len(args[2]) if op == "write" else None)
        if effect is None:
            return
        ctx = args[-1] if args and isinstance(args[-1], pyfuse3.RequestContext) else None
        if self.control is not None:
            self.control.record_fault(op, path, effect, ctx.pid if ctx is not None else None)
        if effect.kind == "delay":
            await trio.sleep(effect.seconds)  # other requests are served meanwhile
        elif effect.kind == "errno":
            raise pyfuse3.FUSEError(effect.value)
        else:
            self._pending = effect  # the body runs next, without awaiting in between

    def _take_pending(self, kind: str) -> Effect | None:
        effect, self._pending = self._pending, None
        return effect if effect is not None and effect.kind == kind else None

    # -- lookups and attributes -----------------------------------------------------------

    @handler
    def lookup(self, parent_inode: InodeT, name: FileNameT,
                ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._lookup_entry(self._node(parent_inode), name)[1]

    @handler
    def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # pyfuse3 answers forget itself and lets nothing raised here be caught: any
        # exception, FUSEError included, would end the main loop. So none may leave.
        for inode, count in inode_list:
            node = self._nodes.get(inode)
            if node is None or node is self.root:
                continue
            node.lookups = max(0, node.lookups - count)
            try:
                self._drop_if_unused(node)
            except Exception:
                log.exception("unexpected error forgetting inode %d", inode)

    @handler
    def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        return self._attrs(node, self._stat(node))

    @handler
    def setattr(self, inode: InodeT, attr: pyfuse3.EntryAttributes,
                 fields: pyfuse3.SetattrFields, fh: FileHandleT | None,
                 ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        is_link = node.kind == stat.S_IFLNK
        if fields.update_size:
            self._truncate(node, attr.st_size, self._handles.get(fh) if fh else None)
        if fields.update_mode and not is_link:
            self._chmod(node, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            syscalls.fchown_path_fd(self._fd(node), attr.st_uid if fields.update_uid else -1,
                                    attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            atime = attr.st_atime_ns if fields.update_atime else None
            mtime = attr.st_mtime_ns if fields.update_mtime else None
            self._set_times(node, atime, mtime)
        if not (fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid or fields.update_atime or fields.update_mtime):
            # chown(f, -1, -1): the kernel sends a setattr that changes nothing, where the
            # backing filesystem would still have updated ctime. Do the same chown there.
            syscalls.fchown_path_fd(self._fd(node), -1, -1)
        return self._attrs(node, self._stat(node))

    def _chmod(self, node: Node, mode: int) -> None:
        path = self._proc(node)
        if self._identity.acting is not None:
            old = stat.S_IMODE(self._stat(node).st_mode)
            if mode == old & ~(stat.S_ISUID | stat.S_ISGID) and os.access(
                    path, os.W_OK, effective_ids=True):
                # Only set-id bits cleared, by a caller who may write the file: the kernel's
                # kill-priv after that caller's write or truncate, which it does with its
                # own rights. It never grants access.
                with self._as_daemon():
                    os.chmod(path, mode)
                return
        os.chmod(path, mode)

    def _set_times(self, node: Node, atime: int | None, mtime: int | None) -> None:
        try:
            syscalls.utimens_path_fd(self._fd(node), atime, mtime)  # symlinks too (lutimes)
        except PermissionError:
            # pyfuse3 turns "set to now" into explicit times, which only the owner may set;
            # the kernel let a non-owner's request through, so it was "now", which needs
            # write permission: let the backing filesystem check that.
            if self._identity.acting is None:
                raise
            syscalls.utimens_path_fd(self._fd(node), None if atime is None else syscalls.NOW,
                                     None if mtime is None else syscalls.NOW)

    def _truncate(self, node: Node, size: int, handle: Handle | None) -> None:
        if node.kind != stat.S_IFREG:
            raise pyfuse3.FUSEError(errno.EINVAL if node.kind != stat.S_IFDIR else errno.EISDIR)
        fd = handle.fd if handle is not None and handle.writable else None
        own_fd = fd is None
        if fd is None:
            fd = os.open(self._proc(node), os.O_WRONLY)
        try:
            old_charge = self._charge_of(node)
            if not self.costs.blocks and size > old_charge:
                # Apparent sizes: growing the file takes quota even though it is a hole.
                if not self.ledger.try_charge(size - old_charge):
                    raise self._enospc("truncate", node)
                os.ftruncate(fd, size)
                node.charged = size
            else:
                os.ftruncate(fd, size)
                new_charge = self.costs.open_file(fd, size)
                if new_charge < old_charge:
                    self._credit(old_charge - new_charge)
                else:
                    self.ledger.force_charge(new_charge - old_charge)
                node.charged = new_charge
            node.size = size
            self._release_reservations_from(node, ceil_div(size, self.block))
        finally:
            if own_fd:
                os.close(fd)

    @handler
    def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        node = self._node(inode)
        return FileNameT(os.readlink(b"", dir_fd=self._fd(node)))

    # -- creating and removing names ------------------------------------------------------

    @handler
    def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
               ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        self._new_inode_or_enospc("mknod", parent)
        try:
            os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=self._fd(parent))
        except BaseException:
            self.ledger.remove_inode()
            raise
        return self._lookup_entry(parent, name)[1]

    @handler
    def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
               ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        self._new_inode_or_enospc("mkdir", parent)
        cost = self.costs.directory()
        if not self.ledger.try_charge(cost):
            self.ledger.remove_inode()
            raise self._enospc("mkdir", parent)
        try:
            os.mkdir(name, mode & ~ctx.umask, dir_fd=self._fd(parent))
        except BaseException:
            self.ledger.remove_inode()
            self.ledger.credit(cost)
            raise
        node, entry = self._lookup_entry(parent, name)
        node.charged = cost
        return entry

    @handler
    def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                 ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        self._new_inode_or_enospc("symlink", parent)
        cost = self.costs.symlink(len(target))
        if not self.ledger.try_charge(cost):
            self.ledger.remove_inode()
            raise self._enospc("symlink", parent)
        try:
            os.symlink(target, name, dir_fd=self._fd(parent))
        except BaseException:
            self.ledger.remove_inode()
            self.ledger.credit(cost)
            raise
        node, entry = self._lookup_entry(parent, name)
        node.charged = cost
        return entry

    @handler
    def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        # Hard links share the inode's blocks: no charge, no new inode.
        os.link(self._proc(node), new_name, dst_dir_fd=self._fd(parent), follow_symlinks=True)
        return self._lookup_entry(parent, new_name)[1]

    @handler
    def unlink(self, parent_inode: InodeT, name: FileNameT,
                ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        st = os.stat(name, dir_fd=self._fd(parent), follow_symlinks=False)
        node, charge = self._losing_name(parent, name, st)
        os.unlink(name, dir_fd=self._fd(parent))
        if st.st_nlink <= 1:
            self._forget_charge(node, st, charge)

    @handler
    def rmdir(self, parent_inode: InodeT, name: FileNameT,
               ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        st = os.stat(name, dir_fd=self._fd(parent), follow_symlinks=False)
        node, charge = self._losing_name(parent, name, st)
        os.rmdir(name, dir_fd=self._fd(parent))
        self._forget_charge(node, st, charge)

    @handler
    def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                ctx: pyfuse3.RequestContext) -> None:
        old_parent = self._node(parent_inode_old)
        new_parent = self._node(parent_inode_new)
        replaced: os.stat_result | None = None
        if not flags & pyfuse3.RENAME_EXCHANGE:
            try:
                replaced = os.stat(name_new, dir_fd=self._fd(new_parent), follow_symlinks=False)
            except FileNotFoundError:
                replaced = None
        replaced_node, replaced_charge = None, 0
        moved = os.stat(name_old, dir_fd=self._fd(old_parent), follow_symlinks=False)
        moved_node = self._by_key.get((moved.st_dev, moved.st_ino))
        other_node = None  # RENAME_EXCHANGE: the inode that moves the other way
        if flags & pyfuse3.RENAME_EXCHANGE:
            other = os.stat(name_new, dir_fd=self._fd(new_parent), follow_symlinks=False)
            other_node = self._by_key.get((other.st_dev, other.st_ino))
        if replaced is not None:
            if (moved.st_dev, moved.st_ino) == (replaced.st_dev, replaced.st_ino):
                replaced = None  # renaming a hard link onto itself removes nothing
            else:
                replaced_node, replaced_charge = self._losing_name(new_parent, name_new,
                                                                   replaced)
        if flags & _RENAME_WHITEOUT:
            # The old name becomes a whiteout: a new inode (a 0:0 character device).
            self._new_inode_or_enospc("rename", old_parent)
            try:
                syscalls.renameat2(self._fd(old_parent), name_old, self._fd(new_parent),
                                   name_new, flags)
            except BaseException:
                self.ledger.remove_inode()
                raise
        elif flags:
            syscalls.renameat2(self._fd(old_parent), name_old, self._fd(new_parent), name_new,
                               flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=self._fd(old_parent),
                      dst_dir_fd=self._fd(new_parent))
        if moved_node is not None:
            moved_node.parent, moved_node.name = new_parent, name_new
        if other_node is not None:
            other_node.parent, other_node.name = old_parent, name_old
        self._names_gen += 1  # the paths of everything below a moved directory changed
        if replaced is not None and (stat.S_ISDIR(replaced.st_mode) or replaced.st_nlink <= 1):
            self._forget_charge(replaced_node, replaced, replaced_charge)

    # -- files ----------------------------------------------------------------------------

    def _new_handle(self, node: Node, fd: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self._handles[fh] = Handle(node, fd, writable, uid=self._caller_uid)
        node.open_count += 1
        return fh

    def _file_info(self, fh: int, node: Node) -> pyfuse3.FileInfo:
        # keep_cache: quotafs is the only writer of the backing directory, so pages the
        # kernel cached stay true across opens, as on a local filesystem. Off (the kernel
        # drops them at open) with --no-cache (other writers), with --mmap-sigbus (it
        # needs the page-in reads) and while a read fault rule could fire on this file
        # (its reads must reach the daemon). direct_io off: shared mmap must work.
        faults = self.faults
        keep = self.options.keep_cache and not (
            faults is not None and faults.concerns("read") and not self._quiet(node, False)
            and faults.could_match("read", self._path(node)))
        return pyfuse3.FileInfo(fh=FileHandleT(fh), direct_io=False, keep_cache=keep)

    @handler
    def open(self, inode: InodeT, flags: FlagT,
             ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return self._open_node(self._node(inode), flags)

    def _open_node(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        if self._checking is not None:
            permissions.require(self._may(node, permissions.open_mask(flags)))
        fd = os.open(self._proc(node), flags & ~_STRIP_OPEN_FLAGS)
        fh = self._new_handle(node, fd, flags)
        try:
            if node.open_count == 1:
                node.size = os.fstat(fd).st_size
            if flags & os.O_TRUNC and node.size:
                self._truncate(node, 0, self._handles[fh])
        except BaseException:
            self._close_handle(fh)
            raise
        return self._file_info(fh, node)

    @handler
    def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._node(parent_inode)
        self._new_inode_or_enospc("create", parent)
        open_flags = (flags & ~(os.O_TRUNC | os.O_APPEND | os.O_DIRECT)) | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(name, open_flags, mode & ~ctx.umask, dir_fd=self._fd(parent))
        except FileExistsError:
            self.ledger.remove_inode()
            if flags & os.O_EXCL:
                raise
            # Lost a race with another creator: open what is there, as O_CREAT would, with
            # the caller's rights (the kernel checked only the directory's).
            st = os.stat(name, dir_fd=self._fd(parent), follow_symlinks=False)
            node = self._remember(parent, name, st)
            try:
                fi = self._open_node(node, flags)
            except BaseException:
                self._drop_if_unused(node)
                raise
            node.lookups += 1
            return fi, self._attrs(node, self._stat(node))
        except BaseException:
            self.ledger.remove_inode()
            raise
        try:
            st = os.fstat(fd)
            node = self._remember(parent, name, st)
        except BaseException:
            os.close(fd)
            raise
        node.lookups += 1
        node.charged = 0
        fh = self._new_handle(node, fd, flags)
        return self._file_info(fh, node), self._attrs(node, st)

    @handler
    def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        corrupt = self._take_pending("corrupt_read") if self._pending else None
        # Apparent sizes charge holes already (up to st_size): nothing to reserve.
        if self.options.mmap_sigbus and handle.writable and self.costs.blocks:
            self._reserve_for_read(handle, fh, off, size)
        data = os.pread(handle.fd, size, off)
        return corrupt.corrupt(data) if corrupt is not None else data

    def _reserve_for_read(self, handle: Handle, fh: int, off: int, size: int) -> None:
        """ext4-faithful mmap: a page brought in through a writable handle may be dirtied
        through a shared mapping without the daemon hearing of it until writeback, so the
        quota for its hole blocks is reserved now; if it does not fit, the read fails and
        the kernel turns that into SIGBUS at the faulting access, as ext4's page_mkwrite
        does. The kernel retries a failed readahead one page at a time, so the signal
        lands on the first page that does not fit."""
        node = handle.node
        end = min(off + size, node.size)
        if end <= off:
            return
        start = off - off % self.block
        # Extents up to the end of the last block touched, as _write_blocks looks: data
        # past `end` in an accounting block larger than a page means it is no hole.
        extent_end = min(ceil_div(end, self.block) * self.block, node.size)
        holes = hole_blocks(start, end, data_extents(handle.fd, start, extent_end),
                            self.block)
        wanted = [b for b in holes if b not in node.reserved]
        if not wanted:
            return
        if not self.ledger.try_reserve(len(wanted) * self.block):
            raise self._enospc("read", node)
        for b in wanted:
            node.reserved[b] = fh

    @handler
    def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        node = handle.node
        short = self._take_pending("short_write") if self._pending else None
        if short is not None:
            buf = buf[:short.value]
        if self.costs.blocks:
            written = self._write_blocks(handle, off, buf)
        else:
            written = self._write_apparent(handle, off, buf)
        node.size = max(node.size, off + written)
        if self.faults is not None and self.faults.counting:
            self.faults.note_written(self._path(node), written)
        return written

    def _write_blocks(self, handle: Handle, off: int, buf: bytes) -> int:
        node, block = handle.node, self.block
        end = off + len(buf)
        charged = self._charge_of(node)
        start = off - off % block
        # Up to the end of the last block the write touches: on a backing of smaller blocks
        # (1 KiB ext4) data may lie past `end` in it. Blocks past EOF hold no data; only
        # the part inside the file needs SEEK_DATA, so a plain append costs no extra syscall.
        data_end = min(ceil_div(end, block) * block, node.size)
        extents = data_extents(handle.fd, start, data_end) if start < data_end else []
        holes = hole_blocks(off, end, extents, block)
        reserved = [b for b in holes if b in node.reserved] if node.reserved else []
        new = [b for b in holes if b not in node.reserved] if reserved else holes
        if len(new) > self.ledger.free() // block:
            self._refuse_write(node)
        written, error = _pwrite_whole(handle.fd, buf, off)
        last = ceil_div(off + written, block)
        taken = sum(1 for b in new if b < last)
        self.ledger.force_charge(taken * block)  # fits: checked against free() above
        converted = [b for b in reserved if b < last]
        for b in converted:
            del node.reserved[b]
        if converted:
            self.ledger.convert(len(converted) * block)
        node.charged = charged + (taken + len(converted)) * block
        return self._stored(node, off, written, error)

    def _refuse_write(self, node: Node) -> NoReturn:
        """A write request that does not fit whole is refused whole: a short count would
        lose data, because the kernel's writeback of mmap pages marks the pages it was not
        told about clean (msync/fsync return 0), and O_DIRECT makes it EIO."""
        self.ledger.note_enospc()
        raise self._enospc("write", node)

    def _write_apparent(self, handle: Handle, off: int, buf: bytes) -> int:
        node = handle.node
        charged = self._charge_of(node)
        growth = max(0, off + len(buf) - max(node.size, charged))
        if growth > self.ledger.free():
            self._refuse_write(node)
        written, error = _pwrite_whole(handle.fd, buf, off)
        new_size = max(node.size, off + written)
        if new_size > charged:
            self.ledger.force_charge(new_size - charged)
            node.charged = new_size
        return self._stored(node, off, written, error)

    @staticmethod
    def _stored(node: Node, off: int, written: int, error: OSError | None) -> int:
        """The answer to a write request whose data went to the backing file in part or
        whole (charged already): the count, or the backing's error if it stopped short."""
        if error is not None:
            node.size = max(node.size, off + written)
            raise error
        return written

    @handler
    def flush(self, fh: FileHandleT) -> None:
        # close(dup(fd)) passes the backing filesystem's close-time errors on to close(2).
        os.close(os.dup(self._handle(fh).fd))

    @handler
    def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        fd = self._handle(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def _close_handle(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        node = handle.node
        node.open_count -= 1
        try:
            os.close(handle.fd)  # an error here (NFS, a FUSE backing) is the caller's...
        finally:  # ...but the descriptor is gone all the same: the bookkeeping must follow
            self._forget_handle(fh, node)

    def _forget_handle(self, fh: int, node: Node) -> None:
        if node.reserved:
            mine = [b for b, owner in node.reserved.items() if owner == fh]
            for b in mine:
                del node.reserved[b]
            if mine:
                self.ledger.release(len(mine) * self.block)
        if node.open_count == 0 and node.orphaned:
            node.orphaned = False
            self._credit(node.charged or 0)
            node.charged = 0
        self._drop_if_unused(node)

    @handler
    def release(self, fh: FileHandleT) -> None:
        self._close_handle(fh)

    # -- directories ----------------------------------------------------------------------

    @handler
    def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        node = self._node(inode)
        fd = os.open(self._proc(node), os.O_RDONLY | os.O_DIRECTORY)
        return FileHandleT(self._new_handle(node, fd, os.O_RDONLY))

    @handler
    def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handle(fh)
        if start_id == 0 or handle.entries is None:
            # A snapshot per listing keeps offsets stable while entries come and go.
            handle.entries = [b".", b"..",
                              *sorted(os.fsencode(n) for n in os.listdir(handle.fd))]
        entries: list[bytes] = handle.entries
        parent = handle.node
        for index in range(start_id, len(entries)):
            name = entries[index]
            if name in (b".", b".."):
                # Listed as the backing directory lists them; readdirplus takes no lookup
                # reference on these two, so none is counted.
                if not pyfuse3.readdir_reply(token, FileNameT(name),
                                             self._dot_attrs(parent, name), index + 1):
                    return
                continue
            try:
                st = os.stat(name, dir_fd=handle.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            node = self._remember(parent, name, st)
            if not pyfuse3.readdir_reply(token, FileNameT(name), self._attrs(node, st),
                                         index + 1):
                self._drop_if_unused(node)
                return
            node.lookups += 1

    def _dot_attrs(self, directory: Node, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b"." or directory is self.root:  # the root is its own parent, as on disk
            node = directory if name == b"." else self.root
            return self._attrs(node, self._stat(node))
        st = os.stat(b"..", dir_fd=self._fd(directory))
        entry = self._attrs(directory, st)
        known = self._by_key.get((st.st_dev, st.st_ino))
        entry.st_ino = InodeT(known.inode if known is not None else st.st_ino)
        return entry

    @handler
    def releasedir(self, fh: FileHandleT) -> None:
        self._close_handle(fh)

    @handler
    def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        os.fsync(self._handle(fh).fd)

    @handler
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        backing = os.statvfs(self._proc(self.root))
        stats = self.ledger.stats()
        block = self.block
        data = pyfuse3.StatvfsData()
        data.f_bsize = block
        data.f_frsize = block
        if stats.limit is None:
            data.f_blocks = backing.f_blocks * backing.f_frsize // block
            free = min(backing.f_bavail * backing.f_frsize, stats.free) // block
        else:
            data.f_blocks = stats.limit // block
            free = stats.unallocated // block
        data.f_bfree = free
        # As ext4 answers every caller: f_bavail leaves out root's reserve (and kept back).
        data.f_bavail = stats.available // block if stats.limit is not None else free
        if stats.inode_limit is None:
            data.f_files = stats.inodes_used + backing.f_ffree
            data.f_ffree = backing.f_ffree
        else:
            data.f_files = stats.inode_limit
            data.f_ffree = max(0, stats.inode_limit - stats.inodes_used)
        data.f_favail = data.f_ffree
        data.f_namemax = 255
        return data

    # -- extended attributes (and the control channel on the root) ------------------------

    def _xattr_path(self, node: Node) -> str:
        # The magic link resolves to the inode the O_PATH descriptor holds, symlinks
        # included (it is not followed any further), whatever the backing path's length.
        return self._proc(node)

    @handler
    def getxattr(self, inode: InodeT, name: XAttrNameT,
                  ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node is self.root and self.control is not None and self.control.owns(name):
            return self.control.get(name, ctx)
        capability = name == _CAPABILITY_XATTR
        if capability and node.no_capability:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            return os.getxattr(self._xattr_path(node), name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                node.no_capability = node.no_capability or capability
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @handler
    def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes,
                  ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        if node is self.root and self.control is not None and self.control.owns(name):
            self.control.set(name, value, ctx)
            return
        node.no_capability = False
        os.setxattr(self._xattr_path(node), name, value)

    @handler
    def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> Sequence[XAttrNameT]:
        node = self._node(inode)
        names = [XAttrNameT(os.fsencode(n)) for n in os.listxattr(self._xattr_path(node))]
        if ctx.uid != 0:  # the daemon's CAP_SYS_ADMIN lists trusted.*; the caller's would not
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @handler
    def removexattr(self, inode: InodeT, name: XAttrNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        node.no_capability = False
        try:
            os.removexattr(self._xattr_path(node), name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @handler
    def access(self, inode: InodeT, mode: ModeT, ctx: pyfuse3.RequestContext) -> bool:
        # Only reached without default_permissions; the daemon answers for the caller.
        node = self._node(inode)
        st = self._stat(node)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        if st.st_uid == ctx.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return (bits & mode) == mode

    # -- introspection --------------------------------------------------------------------

    def forget_cached(self) -> int:
        """Ask the kernel to drop the entries of this mount it caches, so that it forgets
        their inodes as under memory pressure (FORGET), without touching other mounts as
        drop_caches would; for tests. Asynchronous: returns how many entries were asked."""
        entries = [(n.parent.inode, n.name) for n in self._nodes.values()
                   if n.parent is not None]
        for parent_inode, name in entries:
            pyfuse3.invalidate_entry_async(InodeT(parent_inode), FileNameT(name),
                                           ignore_enoent=True)
        return len(entries)

    def statistics(self) -> dict[str, Any]:
        return {
            "known_inodes": len(self._nodes),
            "open_handles": len(self._handles),
            "reserved_blocks": sum(len(n.reserved) for n in self._nodes.values()),
        }
