"""The caller's rights checked against fresh attributes, for a daemon that is not root.

A root daemon acts with the caller's fsuid (syscalls.Identity) and lets the backing
filesystem decide. A non-root daemon cannot; its syscalls carry the mounting user's
rights, so for another user (let in by --allow-other) it checks the caller's own
mode-bit rights first, as the kernel's generic_permission does. What it cannot evaluate,
an access ACL, it refuses unless the caller owns the inode. Pure: no FUSE.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

import pyfuse3

R, W, X = 4, 2, 1
ACL_XATTR = "system.posix_acl_access"


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    groups: frozenset[int]


def allowed(st: os.stat_result, caller: Caller, mask: int, has_acl: bool = False) -> bool:
    """May `caller` have `mask` (R|W|X bits) on an inode with these attributes?"""
    if caller.uid == 0:
        return not mask & X or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
    if st.st_uid == caller.uid:
        bits = (st.st_mode >> 6) & 7
    elif has_acl:
        return False  # ACL entries decide, and they are not evaluated here
    elif st.st_gid == caller.gid or st.st_gid in caller.groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & mask == mask


def owns(st: os.stat_result, caller: Caller) -> bool:
    return caller.uid in (0, st.st_uid)


def may_delete(directory: os.stat_result, victim: os.stat_result, caller: Caller) -> bool:
    """Removing or replacing an entry: write and search on the directory, and in a sticky
    directory only the owner of the entry or of the directory."""
    if not allowed(directory, caller, W | X):
        return False
    return not directory.st_mode & stat.S_ISVTX or owns(victim, caller) \
        or owns(directory, caller)


def open_mask(flags: int) -> int:
    access = flags & os.O_ACCMODE
    mask = {os.O_RDONLY: R, os.O_WRONLY: W}.get(access, R | W)
    return mask | (W if flags & os.O_TRUNC else 0)


def require(ok: bool, err: int = errno.EACCES) -> None:
    if not ok:
        raise pyfuse3.FUSEError(err)
