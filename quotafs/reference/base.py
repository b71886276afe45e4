"""What `quotafs compare -- CMD` needs of a reference filesystem, whichever it is.

Two kinds: "ext4" (a loop-mounted ext4, needs real root: reference/loopext4.py) and
"tmpfs" (a size-limited tmpfs in a private mount namespace, which an unprivileged user
can make in a user namespace: reference/tmpfs.py). The program on the reference may run
in another mount namespace than quotafs's own process; so a reference has two names for
its directory: where the program sees it, and where quotafs reaches it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

KINDS = ("ext4", "tmpfs")


@dataclass(frozen=True)
class Launch:
    """How a program is started. `user`: root switches to this user (uid, gid, groups)
    before exec. `prefix`: argv put in front, e.g. a nested `unshare -U --map-user=UID`
    that runs the program as a non-root uid inside a user namespace."""

    user: str | None = None
    prefix: tuple[str, ...] = ()


AS_CALLER = Launch()  # as the caller, in quotafs's own namespaces


class Reference(Protocol):
    """A mounted reference filesystem, ready for programs to run on."""

    @property
    def kind(self) -> str:
        """"ext4" or "tmpfs"."""

    @property
    def inside_path(self) -> str:
        """The mount point as a program launched by `launch()` sees it."""

    @property
    def outside_path(self) -> str:
        """The same directory as quotafs's own process reaches it (stat, walk, statvfs,
        mkdir, chown), e.g. /proc/PID/root/... for a mount in another namespace."""

    @property
    def quotafs_limit(self) -> int:
        """The room a writer really has here: the limit of the quotafs to compare with."""

    @property
    def quotafs_reserve(self) -> int:
        """The part of that room only root may use (ext4's reserved blocks; 0 on tmpfs)."""

    def launch(self, user: str | None) -> Launch:
        """How to start a program so that it runs on this reference, as `user` (None:
        as the caller). Start it with its cwd on the *outside* path: the chdir happens in
        quotafs's namespace, and the prefix takes that directory in (tmpfs: nsenter
        --wd=.); its arguments and environment name the *inside* path."""

    def used_bytes(self) -> int:
        """Space in use now (statvfs), for "bytes used at the end"."""

    def describe(self) -> dict[str, object]:
        """The report's "reference" section: kind, sizes, and "known_differences" (a list of
        sentences: how this reference differs from ext4)."""
