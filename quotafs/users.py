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
