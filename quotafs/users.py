"""Users by name or uid, for the tools that run programs as another user (compare's
writers and programs, the tmpfs reference's launch prefix)."""

from __future__ import annotations

import pwd

from quotafs.errors import ExitCode, QuotafsError


def passwd_entry(user: str) -> pwd.struct_passwd:
    """A user by name or uid; QuotafsError(USAGE) if there is none."""
    try:
        return pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise QuotafsError(f"no such user {user!r}", ExitCode.USAGE) from None


INITIAL_ID_MAP = "0 0 4294967295"  # /proc/self/uid_map of the initial user namespace


def in_initial_user_namespace(uid_map: str = "/proc/self/uid_map") -> bool:
    """Whether uids here are the machine's own: not inside a user namespace (a rootless
    container, `unshare -U`), where uid 0 is some other user and /run is not its own."""
    try:
        with open(uid_map) as f:
            return " ".join(f.read().split()) == INITIAL_ID_MAP
    except OSError:
        return True  # a kernel without user namespaces
