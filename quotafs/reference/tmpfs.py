"""The tmpfs reference: a size-limited tmpfs in a private mount namespace (and, for a
user without root, a private user namespace), a real kernel filesystem with real ENOSPC
and real mmap SIGBUS that needs no root.

Programs run inside the namespace (nsenter), so that getcwd() and every path work as on
any mount; quotafs's own process reaches the same files as /proc/HOLDER/root/DIR. A
program never runs as root there unless the caller is root and asks for it: a user
without root is root of its user namespace, so a nested `unshare --user --map-user=UID`
gives the program the caller's own uid back (some programs refuse to run as root, and
root changes what fills up). The figures behind `KNOWN_DIFFERENCES` are in
docs/semantics.md ("The tmpfs reference").
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import signals_deferred
from quotafs.reference.base import Launch
from quotafs.reference.namespace import Holder, start_holder
from quotafs.reference.tools import find_tool, last_line, run_tool
from quotafs.units import format_size
from quotafs.users import passwd_entry

PAGE = 4096  # tmpfs counts its size in pages; size= is rounded up to one
MIN_SIZE = PAGE

# Measured on Linux 6.18 at 16 MiB, tmpfs vs a loop-ext4 with 16 MiB free (docs/semantics.md,
# "The tmpfs reference", has the table and the commands).
KNOWN_DIFFERENCES = (
    "no metadata blocks: directories and inodes take no space on tmpfs (at 16 MiB: "
    ">= 100,000 empty directories fit, ext4 stops at 4,716), so a program that makes many "
    "directories fits more of them than on ext4",
    "page granularity: every non-empty file takes whole 4 KiB pages (16 MiB holds 4,096 "
    "1-byte files); a small ext4 has 1 KiB blocks",
    "no root reserve: root and other users have the same room (ext4 at 16 MiB: 1 MiB less "
    "for users other than root); quotafs reserve 0",
    "no delayed-allocation reservation: write(2) stores exactly the size (16 MiB of 16 MiB), "
    "where ext4 stops short by its reserved clusters (16 MiB free: 16,393,216 B writable, "
    "15 MiB stored in 1 MiB calls, as root)",
    "inodes: tmpfs allows nr_inodes files (half the RAM pages by default), ext4 about one "
    "per 4 KiB at 16 MiB (4,717); the inode limit is rarely what runs out first on tmpfs",
    "no device: data lives in the page cache (and swap), nothing is written back (no "
    "writeback error, no remount), and a fallocate beyond the room fails whole",
)


@dataclass
class TmpfsReference:
    """A mounted tmpfs in a private namespace, kept alive by `holder`."""

    holder: Holder
    workdir: str  # the temp dir holding the (host side, empty) mount point
    mountpoint: str  # the mount point inside the namespace
    size: int  # tmpfs size=, in bytes (whole pages)

    @property
    def kind(self) -> str:
        return "tmpfs"

    @property
    def inside_path(self) -> str:
        return self.mountpoint

    @property
    def outside_path(self) -> str:
        return f"/proc/{self.holder.pid}/root{self.mountpoint}"

    @property
    def quotafs_limit(self) -> int:
        return self.size  # tmpfs gives a writer exactly its size: no metadata, no reserve

    @property
    def quotafs_reserve(self) -> int:
        return 0

    @property
    def user_namespace(self) -> bool:
        return self.holder.user_namespace

    def launch(self, user: str | None) -> Launch:
        """The prefix that runs a program in the namespace as `user` (None: as the caller;
        a caller without root cannot switch users). Start the program with its working
        directory on the outside path (`outside(path)`): nsenter takes it inside."""
        enter = self.holder.enter()
        if self.user_namespace:
            me = os.geteuid()
            if user is not None and passwd_entry(user).pw_uid != me:
                raise QuotafsError(f"only root can run the program as {user}: "
                                   "drop --as-user, or run as root", ExitCode.PERMISSION)
            unshare = find_tool("unshare", "the tmpfs reference needs ")
            return Launch(None, (*enter, unshare, "--user", f"--map-user={me}",
                                 f"--map-group={os.getegid()}", "--", *_die_with_us()))
        if user is None:
            return Launch(None, (*enter, *_die_with_us()))
        entry = passwd_entry(user)
        # The switch happens after nsenter (which needs root); so the user's environment
        # is set here too, as program.py sets it for a Popen user= switch.
        return Launch(None, (*enter, *_die_with_us(f"--reuid={entry.pw_uid}",
                                                   f"--regid={entry.pw_gid}", "--init-groups"),
                             "env", f"HOME={entry.pw_dir}", f"USER={entry.pw_name}",
                             f"LOGNAME={entry.pw_name}"))

    def outside(self, inside: str) -> str:
        """Where quotafs reaches a path inside the namespace (absolute, or relative to
        the mount point)."""
        inside = os.path.join(self.mountpoint, inside)
        return f"/proc/{self.holder.pid}/root{inside}"

    def used_bytes(self) -> int:
        st = os.statvfs(self.outside_path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def inodes(self) -> tuple[int, int]:
        """(nr_inodes, free inodes) now."""
        st = os.statvfs(self.outside_path)
        return st.f_files, st.f_ffree

    def describe(self) -> dict[str, object]:
        files, _ = self.inodes()
        return {
            "kind": "tmpfs", "size": self.size, "free_bytes": self.size,
            "quotafs_limit": self.quotafs_limit, "quotafs_reserve": 0,
            "nr_inodes": files, "mountpoint": self.mountpoint,
            "outside_path": self.outside_path, "holder_pid": self.holder.pid,
            "user_namespace": self.user_namespace,
            "known_differences": list(KNOWN_DIFFERENCES),
        }

    def cleanup_commands(self) -> list[str]:
        """Shell commands that remove what keep=True left behind."""
        return [f"kill {self.holder.pid}", f"rm -rf {shlex.quote(self.workdir)}"]


def _die_with_us(*switch: str) -> tuple[str, ...]:
    """setpriv that makes the program die with the process that started it (nsenter and
    unshare exec without forking, so that is quotafs): a program left running after a
    SIGKILL of quotafs would keep the namespace, and its tmpfs, alive. `switch`: setpriv's
    uid/gid options for root's --as-user (pdeathsig is set after them, so it holds)."""
    return (find_tool("setpriv", "the tmpfs reference needs "), *switch,
            "--pdeathsig=KILL", "--")


def check_usable() -> None:
    """Raise QuotafsError saying why a tmpfs reference cannot be made here: a missing
    tool, or (without root) no unprivileged user and mount namespaces — tried for real,
    since sysctls, AppArmor and seccomp profiles of containers each can forbid them."""
    for tool in ("unshare", "nsenter", "mount", "setpriv"):
        find_tool(tool, "the tmpfs reference needs ")
    if os.geteuid() == 0:
        return
    proc = run_tool([find_tool("unshare"), "-Urm", "true"])
    if proc.returncode != 0:
        raise QuotafsError("the tmpfs reference needs unprivileged user namespaces, and "
                           f"`unshare -Urm true` failed here: {last_line(proc)}",
                           ExitCode.PERMISSION)


def tmpfs_size(free: int) -> int:
    """The tmpfs size= that gives a writer `free` bytes: tmpfs has no metadata blocks and
    no reserve, so its room is its size, rounded up to whole pages."""
    return -(-free // PAGE) * PAGE


@contextlib.contextmanager
def open_tmpfs(size: int, workdir: str | None = None,
               keep: bool = False) -> Iterator[TmpfsReference]:
    """A tmpfs with `size` bytes of room (rounded up to pages), mounted in a private mount
    namespace; yields it and tears it down (the namespace ends) on any exit. keep=True
    leaves the holder running and notes how to remove it. Needs no root where
    unprivileged user namespaces are allowed."""
    if size < MIN_SIZE:
        raise QuotafsError(f"the tmpfs reference needs at least {format_size(MIN_SIZE)}, "
                           f"got {size} bytes", ExitCode.USAGE)
    base = workdir if workdir is not None else tempfile.gettempdir()
    if not os.path.isdir(base):
        raise QuotafsError(f"work directory {base} is not a directory", ExitCode.USAGE)
    tmp: str | None = None
    holder: Holder | None = None
    ref: TmpfsReference | None = None
    try:
        try:
            with signals_deferred():  # so no interrupt lands between mkdtemp and `tmp =`
                tmp = tempfile.mkdtemp(prefix="quotafs-tmpfs-", dir=base)
            os.chmod(tmp, 0o755)  # the program's user must reach the mount point below it
            mnt = os.path.join(os.path.realpath(tmp), "mnt")
            os.mkdir(mnt)
        except OSError as exc:  # a read-only or someone else's work directory
            raise QuotafsError(f"cannot make the tmpfs reference's directory in {base}: "
                               f"{exc.strerror}", ExitCode.USAGE) from None
        room = tmpfs_size(size)
        holder = start_holder(mnt, f"size={room}")
        ref = TmpfsReference(holder, tmp, mnt, room)
        yield ref
    except BaseException as exc:
        if keep and ref is not None and ref.holder.alive():
            exc.add_note("tmpfs reference kept; remove it with: "
                         + " && ".join(ref.cleanup_commands()))
        else:
            _teardown(holder, tmp)
        raise
    else:
        if keep:
            return
        problems = _teardown(holder, tmp)
        if problems:
            raise QuotafsError("could not remove the tmpfs reference: " + "; ".join(problems),
                               ExitCode.LOOP)


def _teardown(holder: Holder | None, tmp: str | None) -> list[str]:
    """Kill the holder (the namespace and its tmpfs go with it) and remove the temp dir.
    The host side of the mount point is an empty directory: the tmpfs was never mounted
    here, so removing it cannot reach into the tmpfs."""
    problems: list[str] = []
    with signals_deferred():
        if holder is not None:
            holder.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.exists(tmp):
                problems.append(f"could not remove {tmp}")
    return problems
