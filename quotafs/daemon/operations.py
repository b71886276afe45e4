"""The pyfuse3 Operations: a passthrough over a backing directory that enforces the ledger.

QuotaFS keeps no state of its own: each handler composes the parts, in this order —

    boundary.py      the error boundary around every handler (OSError -> errno, bug -> EIO)
    faultgate.py     `await self.gate.check(Op.X, ...)` first, while fault rules are live
    access.py        `with self.rights.as_caller(ctx):` for requests that touch inodes as
                     the caller, and a non-root daemon's `check_*` of other users
    inodes.py        nodes, handles, inode numbers, the O_PATH descriptors
    charging.py      the ledger's charges, credits and rollbacks (model/ledger, model/costs)
    reservations.py  --mmap-sigbus read reservations
    paths.py         paths below the mount, for fault rules and events
    kernel.py        the FUSE session calls (readdir_reply, invalidate, groups): the seam an
                     in-process test layer replaces

Every handler body after the gate runs without awaiting, so check-and-charge sequences in
it are atomic with respect to every other request.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from quotafs.daemon import syscalls
from quotafs.daemon.access import Access
from quotafs.daemon.boundary import answer, boundary
from quotafs.daemon.charging import Charging
from quotafs.daemon.control import ControlChannel
from quotafs.daemon.crashsim import STASH, CrashSim
from quotafs.daemon.faultgate import FaultGate, Op
from quotafs.daemon.inodes import Handle, InodeTable, Node
from quotafs.daemon.kernel import Kernel
from quotafs.daemon.paths import Paths
from quotafs.daemon.reservations import Reservations
from quotafs.model.costs import Costs
from quotafs.model.faults import FaultEngine
from quotafs.model.ledger import Ledger

log = logging.getLogger(__name__)

# Flags the daemon must not pass to the backing open: creation and truncation are separate
# requests, O_APPEND would make pwrite ignore the offset the kernel computed, O_NOFOLLOW
# would refuse the /proc/self/fd magic link itself (the kernel has resolved the name
# already), and O_DIRECT would hold the daemon's own unaligned buffers to the backing
# filesystem's alignment rules (the kernel already bypasses its cache for the caller).
_STRIP_OPEN_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND
                     | os.O_NOFOLLOW | os.O_DIRECT)

_CAPABILITY_XATTR = b"security.capability"
_RENAME_WHITEOUT = 4  # linux/fs.h; pyfuse3 names only RENAME_EXCHANGE and RENAME_NOREPLACE

CACHE_TIMEOUT = 60.0  # seconds


@dataclass
class HandlerSettings:
    costs: Costs
    mmap_sigbus: bool = False
    # Kernel cache timeouts. quotafs is the only writer of the backing directory while
    # mounted, and the kernel drops what it cached for every change made through the
    # mount, so long timeouts stay exact; --no-cache sets 0 for shared backing dirs.
    attr_timeout: float = CACHE_TIMEOUT
    entry_timeout: float = CACHE_TIMEOUT
    keep_cache: bool = True
    xattrs: bool = True  # False: every xattr request is ENOSYS (--xattrs off)
    crash_sim: bool = False  # record what is durable for power cuts (crashsim.py)


class QuotaFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False  # write(2) itself must return ENOSPC
    enable_acl = True

    def __init__(self, inodes: InodeTable, ledger: Ledger, options: HandlerSettings,
                 control: ControlChannel, faults: FaultEngine, kernel: Kernel,
                 identity: syscalls.Identity, paths: Paths) -> None:
        """The parts shared with the control channel come in built (serve.build_filesystem);
        the ones only the handlers use are built here."""
        super().__init__()
        self.inodes = inodes
        self.ledger = ledger
        self.options = options
        self.costs = options.costs
        self.block = options.costs.block_size
        self.control = control
        self.faults = faults
        self.xattrs = options.xattrs
        self.enable_acl = options.xattrs  # ACLs are xattrs: no FUSE_POSIX_ACL without them
        self.getxattr_requests = 0  # a figure for the status (and the bench)
        self.on_init: Callable[[], None] = lambda: None  # serve.py: when INIT is answered
        self.paths = paths
        self.kernel = kernel
        self.rights = Access(identity, inodes, kernel, is_root=os.geteuid() == 0)
        self.reservations = Reservations(ledger, self.costs, self._quota_hit)
        self.charging = Charging(ledger, self.costs, inodes, self.reservations,
                                 self._quota_hit, self.rights.as_daemon)
        self.gate = FaultGate(faults, inodes, paths, control)
        self._write = self.charging.write
        # Apparent sizes charge holes already (up to st_size): nothing to reserve.
        self._reserve_reads = options.mmap_sigbus and self.costs.blocks
        # --crash-sim: None without it, and every handler tests only that.
        self.crash: CrashSim | None = None
        if options.crash_sim:
            self.crash = CrashSim(paths.backing, inodes, ledger, self.costs, paths, kernel,
                                  faults.seed, control.record_crash, self.charging,
                                  self.rights.as_daemon)
            self.gate.crash = self.crash  # --crash and --drop-unsynced rules act through it

    def init(self) -> None:
        """pyfuse3 calls this while it answers the kernel's INIT, before the reply is sent;
        it must not raise."""
        self.on_init()

    # -- helpers the handlers share -------------------------------------------------------

    def _quota_hit(self, op: str, node: Node, name: bytes | None = None) -> pyfuse3.FUSEError:
        """The quota's ENOSPC for a request on `node` (on `name` in it: the entry a mkdir
        or create would make), recorded as an event."""
        self.control.record_quota_hit(op, self.paths.of_entry(node, name))
        return pyfuse3.FUSEError(errno.ENOSPC)

    def _remember(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """The node for a backing entry, created if new; does NOT count a lookup."""
        return self.inodes.remember(parent, name, st, self.charging.kept)

    def _lookup_entry(self, parent: Node, name: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        st = os.stat(name, dir_fd=self.inodes.fd(parent), follow_symlinks=False)
        node = self._remember(parent, name, st)
        node.lookups += 1
        return node, self._attrs(node, st)

    def _drop_if_unused(self, node: Node) -> None:
        if self.inodes.unused(node):
            self.charging.keep_charge(node)
            self.reservations.release_all(node)
            self.inodes.drop(node)

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(node.inode)
        entry.generation = 0
        entry.entry_timeout = self.options.entry_timeout
        entry.attr_timeout = self.options.attr_timeout
        entry.st_mode = ModeT(st.st_mode)
        entry.st_nlink = (st.st_nlink if self.crash is None
                          else self.crash.links(node.key, st.st_nlink))
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

    def _node_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._attrs(node, self.inodes.stat(node))

    # -- lookups and attributes -----------------------------------------------------------

    @boundary
    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.faults.active:
            await self.gate.check(Op.LOOKUP, parent_inode, name, ctx=ctx)
        if self.crash is not None and name == STASH and parent_inode == pyfuse3.ROOT_INODE:
            return self._no_entry()  # the stash of removals a cut may undo
        with self.rights.as_caller(ctx):
            parent = self.inodes.node(parent_inode)
            self.rights.check_search(parent)
            try:
                return self._lookup_entry(parent, name)[1]
            except FileNotFoundError:
                return self._no_entry()

    def _no_entry(self) -> pyfuse3.EntryAttributes:
        """A lookup's "no such name", as an entry of inode 0: the kernel keeps it (a
        negative dentry) for the entry timeout, so a program that checks for a file again
        and again (SQLite's journal, git's checkout) asks once. Exact for the same reason as
        the positive entries: every name is made through the kernel, which drops it."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(0)
        entry.entry_timeout = self.options.entry_timeout
        return entry

    @boundary
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # pyfuse3 answers forget itself and lets nothing raised here be caught: any
        # exception, FUSEError included, would end the main loop. So none may leave.
        for inode, count in inode_list:
            node = self.inodes.nodes.get(inode)
            if node is None or node is self.inodes.root:
                continue
            node.lookups = max(0, node.lookups - count)
            try:
                self._drop_if_unused(node)
            except Exception:
                log.exception("unexpected error forgetting inode %d", inode)

    @boundary
    async def getattr(self, inode: InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.faults.active:
            await self.gate.check(Op.GETATTR, inode, ctx=ctx)
        return self._node_attrs(self.inodes.node(inode))

    @boundary
    async def setattr(self, inode: InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.faults.active:
            await self.gate.check(Op.TRUNCATE if fields.update_size else Op.SETATTR, inode,
                                  ctx=ctx)
        with self.rights.as_caller(ctx):
            node = self.inodes.node(inode)
            handle = self.inodes.handles.get(fh) if fh else None
            self.rights.check_setattr(node, attr, fields, handle)
            return self._setattr(node, attr, fields, handle, ctx.uid == 0)

    def _setattr(self, node: Node, attr: pyfuse3.EntryAttributes,
                 fields: pyfuse3.SetattrFields, handle: Handle | None,
                 privileged: bool) -> pyfuse3.EntryAttributes:
        is_link = node.kind == stat.S_IFLNK
        if fields.update_size:
            if self.crash is not None:
                self.crash.before_truncate(node, attr.st_size)
            self.charging.truncate(node, attr.st_size, handle, privileged)
        if fields.update_mode and not is_link:
            self._chmod(node, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            syscalls.fchown_path_fd(self.inodes.fd(node),
                                    attr.st_uid if fields.update_uid else -1,
                                    attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            atime = attr.st_atime_ns if fields.update_atime else None
            mtime = attr.st_mtime_ns if fields.update_mtime else None
            self._set_times(node, atime, mtime)
        if not (fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid or fields.update_atime or fields.update_mtime):
            # chown(f, -1, -1): the kernel sends a setattr that changes nothing, where the
            # backing filesystem would still have updated ctime. Do the same chown there.
            syscalls.fchown_path_fd(self.inodes.fd(node), -1, -1)
        return self._node_attrs(node)

    def _chmod(self, node: Node, mode: int) -> None:
        path = self.inodes.proc(node)
        if self.rights.acting:
            old = stat.S_IMODE(self.inodes.stat(node).st_mode)
            if mode == old & ~(stat.S_ISUID | stat.S_ISGID) and os.access(
                    path, os.W_OK, effective_ids=True):
                # Only set-id bits cleared, by a caller who may write the file: the kernel's
                # kill-priv after that caller's write or truncate, which it does with its
                # own rights. It never grants access.
                with self.rights.as_daemon():
                    os.chmod(path, mode)
                return
        os.chmod(path, mode)

    def _set_times(self, node: Node, atime: int | None, mtime: int | None) -> None:
        fd = self.inodes.fd(node)
        try:
            syscalls.utimens_path_fd(fd, atime, mtime)  # symlinks too (lutimes)
        except PermissionError:
            # pyfuse3 turns "set to now" into explicit times, which only the owner may set;
            # the kernel let a non-owner's request through, so it was "now", which needs
            # write permission: let the backing filesystem check that.
            if not self.rights.acting:
                raise
            syscalls.utimens_path_fd(fd, None if atime is None else syscalls.NOW,
                                     None if mtime is None else syscalls.NOW)

    @boundary
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        if self.faults.active:
            await self.gate.check(Op.READLINK, inode, ctx=ctx)
        node = self.inodes.node(inode)
        return FileNameT(os.readlink(b"", dir_fd=self.inodes.fd(node)))

    # -- creating and removing names ------------------------------------------------------

    @boundary
    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.faults.active:
            await self.gate.check(Op.MKNOD, parent_inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            parent = self.inodes.node(parent_inode)
            self.rights.check_add(parent)
            if self.crash is not None:
                self.crash.before_name(parent, name)
            with self.charging.new_inode("mknod", parent, ctx.uid == 0, name=name):
                os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=self.inodes.fd(parent))
            node, entry = self._lookup_entry(parent, name)
            if self.crash is not None:
                self.crash.created(parent, name, self.inodes.stat(node))
            return entry

    @boundary
    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.faults.active:
            await self.gate.check(Op.MKDIR, parent_inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            parent = self.inodes.node(parent_inode)
            self.rights.check_add(parent)
            return self._new_entry("mkdir", parent, name, self.costs.directory(), ctx,
                                   lambda fd: os.mkdir(name, mode & ~ctx.umask, dir_fd=fd))

    @boundary
    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.faults.active:
            await self.gate.check(Op.SYMLINK, parent_inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            parent = self.inodes.node(parent_inode)
            self.rights.check_add(parent)
            return self._new_entry("symlink", parent, name, self.costs.symlink(len(target)),
                                   ctx, lambda fd: os.symlink(target, name, dir_fd=fd))

    def _new_entry(self, op: str, parent: Node, name: bytes, cost: int,
                   ctx: pyfuse3.RequestContext,
                   make: Callable[[int], None]) -> pyfuse3.EntryAttributes:
        """Make `name` in `parent` (make(directory's fd)), its inode and cost charged first
        and given back if that fails."""
        if self.crash is not None:
            self.crash.before_name(parent, name)
        with self.charging.new_inode(op, parent, ctx.uid == 0, cost, name):
            make(self.inodes.fd(parent))
        node, entry = self._lookup_entry(parent, name)
        node.charged = cost
        if self.crash is not None:
            self.crash.created(parent, name, self.inodes.stat(node))
        return entry

    @boundary
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.faults.active:
            await self.gate.check(Op.LINK, inode, new_parent_inode, new_name, ctx=ctx)
        with self.rights.as_caller(ctx):
            node = self.inodes.node(inode)
            parent = self.inodes.node(new_parent_inode)
            self.rights.check_link(node, parent)
            if self.crash is not None:
                self.crash.before_link(node, parent, new_name)
            # Hard links share the inode's blocks: no charge, no new inode.
            os.link(self.inodes.proc(node), new_name, dst_dir_fd=self.inodes.fd(parent),
                    follow_symlinks=True)
            if self.crash is not None:
                self.crash.linked(parent, new_name, self.inodes.stat(node))
            return self._lookup_entry(parent, new_name)[1]

    @boundary
    async def unlink(self, parent_inode: InodeT, name: FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        if self.faults.active:
            await self.gate.check(Op.UNLINK, parent_inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            parent = self.inodes.node(parent_inode)
            self.rights.check_remove(parent, name)
            self._remove(parent, name, os.unlink)

    @boundary
    async def rmdir(self, parent_inode: InodeT, name: FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        if self.faults.active:
            await self.gate.check(Op.RMDIR, parent_inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            parent = self.inodes.node(parent_inode)
            self.rights.check_remove(parent, name)
            self._remove(parent, name, os.rmdir)

    def _remove(self, parent: Node, name: bytes, remove: Callable[..., None]) -> None:
        """unlink or rmdir `name`; a last name gives the inode's charge back."""
        st = os.stat(name, dir_fd=self.inodes.fd(parent), follow_symlinks=False)
        node, charge = self.charging.losing_name(parent, name, st)
        if self.crash is not None:
            self.crash.remove(parent, name, st, remove)  # undoable until durable
        else:
            remove(name, dir_fd=self.inodes.fd(parent))
        if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:  # rmdir only removes directories
            self.charging.forget_charge(node, st, charge)

    @boundary
    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                     ctx: pyfuse3.RequestContext) -> None:
        if self.faults.active:
            await self.gate.check(Op.RENAME, parent_inode_old, name_old, parent_inode_new,
                                  name_new, ctx=ctx)
        with self.rights.as_caller(ctx):
            old_parent = self.inodes.node(parent_inode_old)
            new_parent = self.inodes.node(parent_inode_new)
            self.rights.check_rename(old_parent, name_old, new_parent, name_new)
            self._rename(old_parent, name_old, new_parent, name_new, flags, ctx.uid == 0)

    def _rename(self, old_parent: Node, name_old: bytes, new_parent: Node, name_new: bytes,
                flags: int, privileged: bool) -> None:
        inodes = self.inodes
        if self.crash is not None:
            self.crash.before_name(new_parent, name_new)
        replaced: os.stat_result | None = None
        if not flags & pyfuse3.RENAME_EXCHANGE:
            try:
                replaced = os.stat(name_new, dir_fd=inodes.fd(new_parent),
                                   follow_symlinks=False)
            except FileNotFoundError:
                replaced = None
        replaced_node, replaced_charge = None, 0
        moved = os.stat(name_old, dir_fd=inodes.fd(old_parent), follow_symlinks=False)
        moved_node = inodes.by_key.get((moved.st_dev, moved.st_ino))
        other_node = None  # RENAME_EXCHANGE: the inode that moves the other way
        other: os.stat_result | None = None
        if flags & pyfuse3.RENAME_EXCHANGE:
            other = os.stat(name_new, dir_fd=inodes.fd(new_parent), follow_symlinks=False)
            other_node = inodes.by_key.get((other.st_dev, other.st_ino))
        if replaced is not None:
            if (moved.st_dev, moved.st_ino) == (replaced.st_dev, replaced.st_ino):
                replaced = None  # renaming a hard link onto itself removes nothing
            else:
                replaced_node, replaced_charge = self.charging.losing_name(
                    new_parent, name_new, replaced)
        crash = self.crash
        kept: tuple[bytes | None, int] = (None, -1)
        if crash is not None:
            if flags & _RENAME_WHITEOUT:
                crash.checkpoint()  # not undoable: everything before it is durable
            elif replaced is not None and not flags & pyfuse3.RENAME_NOREPLACE:
                kept = crash.stash_replaced(new_parent, name_new, moved, replaced)
        try:
            self._rename_syscall(old_parent, name_old, new_parent, name_new, flags,
                                 privileged)
        except BaseException:
            if crash is not None:
                crash.unstash(new_parent, name_new, kept)
            raise
        if crash is not None and not flags & _RENAME_WHITEOUT:
            subjects = tuple(k for k in (
                (moved.st_dev, moved.st_ino),
                (other.st_dev, other.st_ino) if other is not None else None,
                (replaced.st_dev, replaced.st_ino) if replaced is not None else None)
                if k is not None)
            crash.renamed(old_parent, name_old, new_parent, name_new, subjects, kept,
                          bool(flags & pyfuse3.RENAME_EXCHANGE))
        inodes.moved(moved_node, new_parent, name_new)
        inodes.moved(other_node, old_parent, name_old)
        inodes.renamed()
        if replaced is not None and (stat.S_ISDIR(replaced.st_mode) or replaced.st_nlink <= 1):
            self.charging.forget_charge(replaced_node, replaced, replaced_charge)

    def _rename_syscall(self, old_parent: Node, name_old: bytes, new_parent: Node,
                        name_new: bytes, flags: int, privileged: bool) -> None:
        inodes = self.inodes
        if flags & _RENAME_WHITEOUT:
            # The old name becomes a whiteout: a new inode (a 0:0 character device).
            with self.charging.new_inode("rename", old_parent, privileged, name=name_old):
                syscalls.renameat2(inodes.fd(old_parent), name_old, inodes.fd(new_parent),
                                   name_new, flags)
        elif flags:
            syscalls.renameat2(inodes.fd(old_parent), name_old, inodes.fd(new_parent),
                               name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=inodes.fd(old_parent),
                      dst_dir_fd=inodes.fd(new_parent))

    # -- files ----------------------------------------------------------------------------

    def _file_info(self, fh: int, node: Node) -> pyfuse3.FileInfo:
        # keep_cache: quotafs is the only writer of the backing directory, so pages the
        # kernel cached stay true across opens, as on a local filesystem. Off (the kernel
        # drops them at open) with --no-cache (other writers), with --mmap-sigbus (it
        # needs the page-in reads) and while a read fault rule could fire on this file
        # (its reads must reach the daemon). direct_io off: shared mmap must work.
        keep = self.options.keep_cache and not (
            self.faults.active and self.gate.may_fault_reads(node))
        return pyfuse3.FileInfo(fh=FileHandleT(fh), direct_io=False, keep_cache=keep)

    @boundary
    async def open(self, inode: InodeT, flags: FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.faults.active:
            await self.gate.check(Op.OPEN, inode, ctx=ctx)
        if self.crash is not None:
            await self.crash.wait_settled()
            if self.faults.down:  # a rule's cut came while it waited
                raise pyfuse3.FUSEError(errno.EIO)
        with self.rights.as_caller(ctx):
            return self._open_node(self.inodes.node(inode), flags, ctx.uid == 0)

    def _open_node(self, node: Node, flags: int, privileged: bool) -> pyfuse3.FileInfo:
        self.rights.check_open(node, flags)
        fd = os.open(self.inodes.proc(node), flags & ~_STRIP_OPEN_FLAGS)
        fh = self.inodes.new_handle(node, fd, flags, privileged)
        try:
            if node.open_count == 1:  # what we knew of the closed file may be stale
                node.size = os.fstat(fd).st_size
                node.filled, node.scattered = None, None
            if flags & os.O_TRUNC and node.size:
                if self.crash is not None:
                    self.crash.before_truncate(node, 0)
                self.charging.truncate(node, 0, self.inodes.handles[fh], privileged)
        except BaseException:
            self._close_handle(fh)
            raise
        return self._file_info(fh, node)

    @boundary
    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self.faults.active:
            await self.gate.check(Op.CREATE, parent_inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            parent = self.inodes.node(parent_inode)
            self.rights.check_add(parent)
            return self._create(parent, name, mode, flags, ctx)

    def _create(self, parent: Node, name: bytes, mode: int, flags: int,
                ctx: pyfuse3.RequestContext
                ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        privileged = ctx.uid == 0
        if self.crash is not None:
            self.crash.before_name(parent, name)
        self.charging.add_inode("create", parent, name)
        open_flags = (flags & ~(os.O_TRUNC | os.O_APPEND | os.O_DIRECT)) | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(name, open_flags, mode & ~ctx.umask, dir_fd=self.inodes.fd(parent))
        except FileExistsError:
            self.charging.drop_inode()
            if flags & os.O_EXCL:
                raise
            # Lost a race with another creator: open what is there, as O_CREAT would, with
            # the caller's rights (the kernel checked only the directory's).
            st = os.stat(name, dir_fd=self.inodes.fd(parent), follow_symlinks=False)
            node = self._remember(parent, name, st)
            try:
                fi = self._open_node(node, flags, privileged)
            except BaseException:
                self._drop_if_unused(node)
                raise
            node.lookups += 1
            return fi, self._node_attrs(node)
        except BaseException:
            self.charging.drop_inode()
            raise
        try:
            st = os.fstat(fd)
            node = self._remember(parent, name, st)
        except BaseException:
            os.close(fd)
            raise
        node.lookups += 1
        node.charged = 0
        node.filled, node.scattered = 0, set()  # new and empty: every block is known
        if self.crash is not None:
            self.crash.created(parent, name, st)
        fh = self.inodes.new_handle(node, fd, flags, privileged)
        return self._file_info(fh, node), self._attrs(node, st)

    @boundary
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        effect = await self.gate.check(Op.READ, fh) if self.faults.active else None
        handle = self.inodes.handle(fh)
        if self._reserve_reads and handle.writable:
            self.reservations.for_read(handle, fh, off, size)
        data = os.pread(handle.fd, size, off)
        return effect.corrupt(data) if effect is not None else data

    # write, fsync and getxattr carry the boundary inline (boundary.answer): they are
    # the requests of every small write(2), and the decorator's coroutine costs more
    # than the rest of fsync's handler.

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        try:
            faults = self.faults
            if faults.active:
                # Measured only while an allocating rule is live: the default path never pays.
                allocating = (self.charging.allocates(self.inodes.handle(fh), off, len(buf))
                              if faults.wants_allocation else None)
                effect = await self.gate.check(Op.WRITE, fh, size=len(buf),
                                               allocating=allocating)
                if effect is not None:  # a short write: store only the first bytes
                    buf = buf[:effect.value]
            handle = self.inodes.handle(fh)
            if self.crash is not None and buf:
                return self._recorded_write(handle, off, buf)
            # pwrite(2) of nothing changes nothing, so nothing is charged: the kernel never
            # sends an empty WRITE, but a short-write rule of 0 bytes and in-process callers do.
            written = self._write(handle, off, buf) if buf else 0
            if faults.active and faults.counting:  # counting rules are live rules
                self.gate.note_written(handle.node, written)
            return written
        except Exception as exc:
            raise answer("write", exc) from None

    def _recorded_write(self, handle: Handle, off: int, buf: bytes) -> int:
        """write() with --crash-sim: the old contents saved first (crashsim.py)."""
        assert self.crash is not None
        seq = self.crash.before_write(handle, off, len(buf))
        try:
            written = self._write(handle, off, buf)
        except pyfuse3.FUSEError:  # refused whole (the quota): nothing changed
            self.crash.cancel(seq)
            raise
        if self.faults.active and self.faults.counting:
            self.gate.note_written(handle.node, written)
        return written

    @boundary
    async def flush(self, fh: FileHandleT) -> None:
        if self.faults.active:
            await self.gate.check(Op.FLUSH, fh)
        # close(dup(fd)) passes the backing filesystem's close-time errors on to close(2).
        os.close(os.dup(self.inodes.handle(fh).fd))

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        try:
            if self.faults.active:
                await self.gate.check(Op.FSYNC, fh)
            handle = self.inodes.handle(fh)
            if datasync:
                os.fdatasync(handle.fd)
            else:
                os.fsync(handle.fd)
            if self.crash is not None:
                self.crash.synced_file(handle.node)
        except Exception as exc:
            raise answer("fsync", exc) from None

    def _close_handle(self, fh: int) -> None:
        handle = self.inodes.pop_handle(fh)
        try:
            os.close(handle.fd)  # an error here (NFS, a FUSE backing) is the caller's...
        finally:  # ...but the descriptor is gone all the same: the bookkeeping must follow
            self.charging.handle_closed(handle.node, fh)
            self._drop_if_unused(handle.node)

    @boundary
    async def release(self, fh: FileHandleT) -> None:
        if self.faults.active:
            await self.gate.check(Op.RELEASE, fh)
        self._close_handle(fh)

    # -- directories ----------------------------------------------------------------------

    @boundary
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        if self.faults.active:
            await self.gate.check(Op.OPENDIR, inode, ctx=ctx)
        with self.rights.as_caller(ctx):
            node = self.inodes.node(inode)
            self.rights.check_list(node)
            fd = os.open(self.inodes.proc(node), os.O_RDONLY | os.O_DIRECTORY)
            return FileHandleT(self.inodes.new_handle(node, fd, os.O_RDONLY, ctx.uid == 0))

    @boundary
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if self.faults.active:
            await self.gate.check(Op.READDIR, fh)
        handle = self.inodes.handle(fh)
        if start_id == 0 or handle.entries is None:
            # A snapshot per listing keeps offsets stable while entries come and go.
            handle.entries = [b".", b"..",
                              *sorted(os.fsencode(n) for n in os.listdir(handle.fd))]
        entries: list[bytes] = handle.entries
        parent = handle.node
        if self.crash is not None and parent is self.inodes.root and STASH in entries:
            entries.remove(STASH)
        reply = self.kernel.readdir_reply
        for index in range(start_id, len(entries)):
            name = entries[index]
            if name in (b".", b".."):
                # Listed as the backing directory lists them; readdirplus takes no lookup
                # reference on these two, so none is counted.
                if not reply(token, name, self._dot_attrs(parent, name), index + 1):
                    return
                continue
            try:
                st = os.stat(name, dir_fd=handle.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            node = self._remember(parent, name, st)
            if not reply(token, name, self._attrs(node, st), index + 1):
                self._drop_if_unused(node)
                return
            node.lookups += 1

    def _dot_attrs(self, directory: Node, name: bytes) -> pyfuse3.EntryAttributes:
        root = self.inodes.root
        if name == b"." or directory is root:  # the root is its own parent, as on disk
            return self._node_attrs(directory if name == b"." else root)
        st = os.stat(b"..", dir_fd=self.inodes.fd(directory))
        entry = self._attrs(directory, st)
        known = self.inodes.by_key.get((st.st_dev, st.st_ino))
        entry.st_ino = InodeT(known.inode if known is not None else st.st_ino)
        return entry

    @boundary
    async def releasedir(self, fh: FileHandleT) -> None:
        self._close_handle(fh)

    @boundary
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        if self.faults.active:
            await self.gate.check(Op.FSYNCDIR, fh)
        handle = self.inodes.handle(fh)
        os.fsync(handle.fd)
        if self.crash is not None:
            self.crash.synced_dir(handle.node)

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        if self.faults.active:
            await self.gate.check(Op.STATFS, ctx=ctx)
        backing = os.statvfs(self.inodes.proc(self.inodes.root))
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

    # -- extended attributes ----------------------------------------------------------------
    # With --xattrs off each answers ENOSYS, which the kernel remembers for the connection
    # (fc->no_getxattr, ...): it then fails them with EOPNOTSUPP itself and stops asking
    # for security.capability before every write(2).
    # The magic link (InodeTable.proc) resolves to the inode the O_PATH descriptor holds,
    # symlinks included (it is not followed any further), whatever the backing path's length.

    async def getxattr(self, inode: InodeT, name: XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        self.getxattr_requests += 1
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        faults = self.faults
        if name == _CAPABILITY_XATTR and not faults.active:
            # The kernel's question before every write(2). Reading security.* needs no
            # right on the inode (the VFS checks only user.* and trusted.*), so a node
            # known to have none is answered before any identity switch or check.
            node = self.inodes.nodes.get(inode)
            if node is not None and node.no_capability:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            if faults.active:
                await self.gate.check(Op.GETXATTR, inode, name, ctx=ctx)
            return self._getxattr(self.inodes.node(inode), name, ctx)
        except Exception as exc:
            raise answer("getxattr", exc) from None

    def _getxattr(self, node: Node, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with self.rights.as_caller(ctx):
            self.rights.check_xattr(node, name, write=False)
            try:
                return os.getxattr(self.inodes.proc(node), name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    node.no_capability = node.no_capability or name == _CAPABILITY_XATTR
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
                raise

    @boundary
    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if self.faults.active:
            await self.gate.check(Op.SETXATTR, inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            node = self.inodes.node(inode)
            self.rights.check_xattr(node, name, write=True)
            node.no_capability = False
            os.setxattr(self.inodes.proc(node), name, value)

    @boundary
    async def listxattr(self, inode: InodeT,
                        ctx: pyfuse3.RequestContext) -> Sequence[XAttrNameT]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if self.faults.active:
            await self.gate.check(Op.LISTXATTR, inode, ctx=ctx)
        with self.rights.as_caller(ctx):
            node = self.inodes.node(inode)
            names = [XAttrNameT(os.fsencode(n))
                     for n in os.listxattr(self.inodes.proc(node))]
            if ctx.uid != 0:  # the daemon's CAP_SYS_ADMIN lists trusted.*; the caller's not
                names = [n for n in names if not n.startswith(b"trusted.")]
            return names

    @boundary
    async def removexattr(self, inode: InodeT, name: XAttrNameT,
                          ctx: pyfuse3.RequestContext) -> None:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if self.faults.active:
            await self.gate.check(Op.REMOVEXATTR, inode, name, ctx=ctx)
        with self.rights.as_caller(ctx):
            node = self.inodes.node(inode)
            self.rights.check_xattr(node, name, write=True)
            node.no_capability = False
            try:
                os.removexattr(self.inodes.proc(node), name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
                raise

    @boundary
    async def access(self, inode: InodeT, mode: ModeT, ctx: pyfuse3.RequestContext) -> bool:
        # Only reached without default_permissions; the daemon answers for the caller.
        if self.faults.active:
            await self.gate.check(Op.ACCESS, inode, ctx=ctx)
        return self.rights.access(self.inodes.node(inode), mode, ctx)
