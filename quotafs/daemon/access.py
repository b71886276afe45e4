"""Whose rights a request's syscalls use, and a non-root daemon's checks of other users.

Requests that look up, open, create, change or remove backing inodes run their syscalls
with the caller's filesystem uid, gid and groups (when those are not the daemon's own),
so that the backing filesystem applies the caller's rights to fresh attributes, never
root's; the handlers of those requests enter `as_caller(ctx)`. Not getattr, readlink,
statfs: an O_PATH descriptor's fstat/readlink needs none.

A root daemon switches identity (syscalls.Identity). A daemon that is not root cannot: it
checks the caller's rights itself, against fresh attributes, before the request's
syscalls (the `check_*` methods, which do nothing unless such a check is in force), with
permissions.py's rules.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager

import pyfuse3

from quotafs.daemon import permissions, syscalls
from quotafs.daemon.inodes import Handle, InodeTable, Node
from quotafs.daemon.kernel import Kernel

_DAEMONS_OWN = contextlib.nullcontext()  # reusable: no state


class Access:
    def __init__(self, identity: syscalls.Identity, inodes: InodeTable, kernel: Kernel,
                 is_root: bool) -> None:
        self._identity = identity
        self._inodes = inodes
        self._kernel = kernel
        self._is_root = is_root
        self._checking: permissions.Caller | None = None  # non-root daemon, other caller

    @property
    def acting(self) -> bool:
        """Are syscalls running with a caller's identity (root daemon) right now?"""
        return self._identity.acting is not None

    def as_daemon(self) -> AbstractContextManager[None]:
        """The daemon's own rights for bookkeeping (measuring, reopening descriptors)."""
        return self._identity.daemon()

    def as_caller(self, ctx: pyfuse3.RequestContext) -> AbstractContextManager[None]:
        """A context that runs a request's syscalls with the caller's rights: its identity
        (root daemon), or the daemon's with the caller's checks in force (non-root)."""
        identity = self._identity
        if ctx.uid == identity.uid and ctx.gid == identity.gid:
            return _DAEMONS_OWN  # the common case (every request on a mount without allow_other)
        try:
            groups = self._kernel.sup_groups(ctx.pid)
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

    # -- a non-root daemon's checks (no-ops unless _checking) -----------------------------

    def _may(self, node: Node, mask: int) -> bool:
        caller = self._checking
        assert caller is not None
        st = self._inodes.stat(node)
        return permissions.allowed(st, caller, mask, self._has_acl(node, st, caller))

    def _has_acl(self, node: Node, st: os.stat_result, caller: permissions.Caller) -> bool:
        if st.st_uid == caller.uid or stat.S_ISLNK(st.st_mode):
            return False  # the owner's bits decide, ACL or not
        try:
            os.getxattr(self._inodes.proc(node), permissions.ACL_XATTR)
        except OSError:
            return False
        return True

    def check_search(self, directory: Node) -> None:
        """lookup: search permission on the directory."""
        if self._checking is not None:
            permissions.require(self._may(directory, permissions.X))

    def check_add(self, directory: Node) -> None:
        """mknod, mkdir, symlink, create: write and search permission on the directory."""
        if self._checking is not None:
            permissions.require(self._may(directory, permissions.W | permissions.X))

    def check_list(self, directory: Node) -> None:
        """opendir: read permission on the directory."""
        if self._checking is not None:
            permissions.require(self._may(directory, permissions.R))

    def check_open(self, node: Node, flags: int) -> None:
        """open (and create's race, which opens what is there): the access mode's rights."""
        if self._checking is not None:
            permissions.require(self._may(node, permissions.open_mask(flags)))

    def check_link(self, node: Node, directory: Node) -> None:
        caller = self._checking
        if caller is None:
            return
        st = self._inodes.stat(node)
        permissions.require(self._may(directory, permissions.W | permissions.X))
        permissions.require(permissions.owns(st, caller)
                            or self._may(node, permissions.R | permissions.W), errno.EPERM)

    def check_remove(self, directory: Node, name: bytes) -> None:
        """unlink, rmdir: removing directory/name."""
        if self._checking is not None:
            self._check_delete(self._checking, directory, name, required=True)

    def check_rename(self, old_dir: Node, old_name: bytes, new_dir: Node,
                     new_name: bytes) -> None:
        caller = self._checking
        if caller is None:
            return
        self._check_delete(caller, old_dir, old_name, required=True)
        if not self._check_delete(caller, new_dir, new_name, required=False):
            permissions.require(self._may(new_dir, permissions.W | permissions.X))

    def check_xattr(self, node: Node, name: bytes, write: bool) -> None:
        """getxattr (write=False), setxattr, removexattr."""
        caller = self._checking
        if caller is None:
            return
        if name.startswith(b"user."):
            permissions.require(self._may(node, permissions.W if write else permissions.R))
        elif write and name.startswith(b"system.posix_acl"):
            permissions.require(permissions.owns(self._inodes.stat(node), caller), errno.EPERM)

    def check_setattr(self, node: Node, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, handle: Handle | None) -> None:
        caller = self._checking
        if caller is None:
            return
        require, st = permissions.require, self._inodes.stat(node)
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
            victim = os.stat(name, dir_fd=self._inodes.fd(parent), follow_symlinks=False)
        except FileNotFoundError:
            if required:
                raise
            return False
        parent_st = self._inodes.stat(parent)
        permissions.require(self._may(parent, permissions.W | permissions.X))
        permissions.require(permissions.may_delete(parent_st, victim, caller), errno.EPERM)
        return True

    # -- the access request (no default_permissions) ---------------------------------------

    def access(self, node: Node, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """May the caller have `mode` (R_OK|W_OK|X_OK) on the node, by its mode bits?"""
        st = self._inodes.stat(node)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        if st.st_uid == ctx.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in self._kernel.sup_groups(ctx.pid):
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return (bits & mode) == mode
