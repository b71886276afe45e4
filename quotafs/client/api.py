"""Python API: mount a quotafs for the duration of a `with` block.

    with quotafs.mounted(limit="10M") as m:
        run_my_program(m.path)
        assert m.usage().used <= 10 * 2**20

Results are frozen dataclasses (quotafs.protocol's Status, Usage, Event, RuleStatus, Limits;
Ext4Status here), also readable as mappings of their JSON keys as 0.1.0's dicts were.

The daemon runs in a child process (never in the caller's process: blocking syscalls on
the mount would wait on the loop that must answer them) and dies with the caller, even
if the caller is killed, so a crashed test run leaves no mount behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from quotafs import reap
from quotafs.client import control, lifecycle
from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import signals_deferred
from quotafs.model.faults import spec_from_args
from quotafs.mountinfo import find_mount
from quotafs.options import MountOptions, check_settings, check_size
from quotafs.protocol import CrashReport, Event, Limits, RuleStatus, Status, Usage
from quotafs.reference import loopext4, tmpfs
from quotafs.reference.loopext4 import Ext4Loop
from quotafs.reference.tmpfs import TmpfsReference
from quotafs.units import format_size
from quotafs.unmounting import BUSY_TRIES, unmount_retrying

T = TypeVar("T")

SizeLike = int | str | None


def _bytes(value: SizeLike, name: str = "limit") -> int | None:
    return check_size(name, value, allow_none=True)


@dataclass
class QuotaMount:
    """A live mount: its path and the controls of its daemon.

    `mounted()` and `open_quota_mount()` make one for a `with` block; `QuotaMount.start()`
    makes one that lives until its `close()` (what the pytest plugin's fixtures do)."""

    path: str
    backing: str
    pid: int
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _own_mountpoint: bool = field(default=False, repr=False)  # made by start(): removed
    _own_backing: bool = field(default=False, repr=False)
    _closed: bool = field(default=False, repr=False)

    # -- lifecycle --

    @classmethod
    def start(cls, limit: SizeLike = None, backing: str | None = None,
              mountpoint: str | None = None, **options: Any) -> QuotaMount:
        """Mount quotafs, as `mounted()` does, and return the live mount; `close()` undoes
        it all. Every option is checked before the first directory is made."""
        return cls.start_with(_options(limit, backing, options), mountpoint)

    @classmethod
    def start_with(cls, options: MountOptions, mountpoint: str | None = None) -> QuotaMount:
        """`start` for options already built (MountOptions.from_values, or the CLI's flags)."""
        resolved = options.resolve()  # like_ext4 and "5%" settled before anything is made
        own_mountpoint = mountpoint is None
        path = tempfile.mkdtemp(prefix="quotafs-mnt-") if mountpoint is None else mountpoint
        made_backing: str | None = None
        try:
            path = lifecycle.check_mountpoint(path)
            lifecycle.check_fuse()
            with signals_deferred():  # no interrupt between mkdtemp and `made_backing =`
                backing_dir, private = lifecycle.prepare_backing(options.backing)
                made_backing = backing_dir if private else None
            daemon = _start_daemon(resolved.placed(path, backing_dir, private,
                                                   die_with_parent=True))
        except BaseException:
            # No daemon runs now (start_daemon stops one it started before it raises): the
            # private backing it would have removed at exit is ours to remove (an interrupt
            # between making it and starting the daemon left it behind).
            if made_backing is not None:
                shutil.rmtree(made_backing, ignore_errors=True)
            if own_mountpoint:
                os.rmdir(path)
            raise
        return cls(path, backing_dir, daemon.pid, daemon.process,
                   _own_mountpoint=own_mountpoint,
                   _own_backing=options.backing is None and not options.keep_backing)

    def unmount(self, lazy: bool = True) -> str | None:
        """Unmount, retrying for about a second while the mount is busy (right after a
        process in it exited), then, with `lazy`, detach it lazily; a dead daemon's mount
        is detached lazily at once. Returns None once nothing is mounted here, else why it
        still is ("target is busy"). The daemon exits once its mount is gone."""
        alive = self.is_alive()
        return unmount_retrying(self.path, lifecycle.unmount, tries=BUSY_TRIES if alive else 0,
                                          lazy=lazy or not alive)

    def terminate(self, timeout: float = 10.0) -> None:
        """Stop the daemon (SIGTERM; SIGKILL after `timeout` seconds): it detaches its
        mount lazily as it exits, busy or not. Only for a daemon this process started."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            reap(process, timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the daemon to exit (after an unmount, a kill); its exit status, or None
        for a daemon this process did not start. subprocess.TimeoutExpired after `timeout`."""
        return None if self._process is None else self._process.wait(timeout)

    @property
    def closed(self) -> bool:
        """Whether close() has finished: unmounted, and what start() made removed."""
        return self._closed

    @property
    def returncode(self) -> int | None:
        """The daemon's exit status (negative: killed by that signal); None while it runs."""
        return None if self._process is None else self._process.poll()

    def close(self) -> None:
        """Unmount (lazily if busy), reap the daemon (SIGKILL if it lingers), and remove the
        mount point and backing directory start() made. Safe to call again: what an error
        left (still mounted) is retried, nothing else is done twice."""
        if self._closed:
            return
        try:
            self.unmount(lazy=True)
            if self._process is not None:
                reap(self._process, 30)  # it exits once unmounted
                # One killed (SIGKILL) could not remove its control socket.
                control.remove_stale_socket(self.path, os.geteuid())
        finally:
            # Held: a Ctrl-C or SIGTERM (say, one that made this close run) landing between
            # the two removals, or inside rmtree, left an empty backing directory behind.
            with signals_deferred():
                self._remove_what_start_made()

    def _remove_what_start_made(self) -> None:
        if find_mount(self.path) is not None:
            with contextlib.suppress(Exception):
                lifecycle.unmount(self.path, lazy=True)
        if find_mount(self.path) is None:  # never remove below a live mount
            self._closed = True
            if self._own_mountpoint:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)
            if self._own_backing:
                shutil.rmtree(self.backing, ignore_errors=True)

    # -- controls --

    def status(self) -> Status:
        return control.read_status(self.path)

    def usage(self) -> Usage:
        """used / reserved / free / limit / inodes, in bytes and counts."""
        return self.status().usage()

    def set_limit(self, limit: SizeLike) -> Limits:
        """Change the limit; returns the limits in effect after it."""
        return control.set_limits(self.path, **check_settings({"limit": limit}))

    def set_inode_limit(self, inodes: int | None) -> Limits:
        return control.set_limits(self.path, **check_settings({"inodes": inodes}))

    def set_reserve(self, reserve: int | str) -> Limits:
        """Root's reserve: "5%" of the current limit, a size ("6M", bytes), or 0."""
        return control.set_limits(self.path, **check_settings({"reserve": reserve}))

    def events(self, after: int = 0) -> list[Event]:
        """Quota ENOSPCs and fired faults (seq > after), oldest first."""
        return control.read_events(self.path, after)

    def add_fault(self, op: str | list[str], **trigger_and_effect: Any) -> str:
        """Add a fault rule, e.g. add_fault("fsync", errno="EIO", times=1); returns its id.

        Keywords as `quotafs fault add`: path, errno, delay, short_write, corrupt_read,
        crash (with crash_model "posix"|"ext4", crash_torn, crash_keep_fraction),
        drop_unsynced (with errno, op "fsync"), allocating, probability, seed,
        after_bytes, nth, from_nth, times. A crash or drop_unsynced rule on a mount
        without crash_sim=True: QuotafsError (ExitCode.USAGE).
        """
        return control.add_rule(self.path, spec_from_args(op, **trigger_and_effect)).id

    def faults(self) -> list[RuleStatus]:
        """The rules with their counters (matched, fired, retired, ...)."""
        return list(control.list_rules(self.path).rules)

    def clear_faults(self, rule_id: str | None = None) -> int:
        return control.clear_rules(self.path, rule_id)

    def crash(self, model: str = "posix", torn: bool = False, keep_fraction: float = 0.0,
              seed: int | None = None) -> CrashReport:
        """A power cut (a mount started with crash_sim=True; docs/crash.md): everything
        `model` ("posix" or "ext4") does not keep is lost, open files answer EIO."""
        return control.crash(self.path, model, torn, keep_fraction, seed)

    def revive(self) -> bool:
        """After a --crash rule's cut the device stays down (every request answers EIO,
        docs/crash.md): bring it back; True if it was down."""
        return control.revive(self.path)

    def last_crash(self) -> CrashReport | None:
        """The last power cut's report, a --crash fault rule's too; None before any."""
        return control.last_crash(self.path)

    def is_alive(self) -> bool:
        return self._process is None or self._process.poll() is None

    @property
    def trio(self) -> TrioControls:
        """The same controls as coroutines, for trio code: `await m.trio.set_limit("5M")`."""
        return TrioControls(self)


class TrioControls:
    """QuotaMount's controls run in a worker thread, so the trio loop never blocks on the
    daemon's answer."""

    def __init__(self, mount: QuotaMount) -> None:
        self._mount = mount

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        import trio  # here: trio's import costs about 90 ms, which only trio callers pay

        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def status(self) -> Status:
        return await self._call(self._mount.status)

    async def usage(self) -> Usage:
        return await self._call(self._mount.usage)

    async def set_limit(self, limit: SizeLike) -> Limits:
        return await self._call(self._mount.set_limit, limit)

    async def set_inode_limit(self, inodes: int | None) -> Limits:
        return await self._call(self._mount.set_inode_limit, inodes)

    async def set_reserve(self, reserve: int | str) -> Limits:
        return await self._call(self._mount.set_reserve, reserve)

    async def add_fault(self, op: str | list[str], **trigger_and_effect: Any) -> str:
        return await self._call(self._mount.add_fault, op, **trigger_and_effect)

    async def faults(self) -> list[RuleStatus]:
        return await self._call(self._mount.faults)

    async def clear_faults(self, rule_id: str | None = None) -> int:
        return await self._call(self._mount.clear_faults, rule_id)

    async def events(self, after: int = 0) -> list[Event]:
        return await self._call(self._mount.events, after)

    async def crash(self, model: str = "posix", torn: bool = False,
                    keep_fraction: float = 0.0, seed: int | None = None) -> CrashReport:
        return await self._call(self._mount.crash, model, torn, keep_fraction, seed)

    async def revive(self) -> bool:
        return await self._call(self._mount.revive)


# The daemon dies with "its parent" (PR_SET_PDEATHSIG), and for the kernel the parent is
# the *thread* that started it, not the process. A mount started from a short-lived thread
# (trio.to_thread's workers retire after 10 s idle) would be unmounted under the caller when
# that thread ends. So daemons wanted off the main thread are started from daemon threads
# that never end (not even at interpreter shutdown, as a ThreadPoolExecutor's do), as many
# as there are concurrent starts.
class _Spawner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[lifecycle.Daemon],
                                            MountOptions]] = queue.SimpleQueue()

    def start(self, config: MountOptions) -> lifecycle.Daemon:
        future: concurrent.futures.Future[lifecycle.Daemon] = concurrent.futures.Future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._serve, name="quotafs-spawner",
                                 daemon=True).start()
        self._jobs.put((future, config))
        return future.result()

    def _serve(self) -> None:
        while True:
            future, config = self._jobs.get()
            try:
                future.set_result(lifecycle.start_daemon(config, detach=False))
            except BaseException as exc:
                future.set_exception(exc)
            with self._lock:
                self._idle += 1


_spawner = _Spawner()


def _start_daemon(config: MountOptions) -> lifecycle.Daemon:
    if threading.current_thread() is threading.main_thread():
        return lifecycle.start_daemon(config, detach=False)
    return _spawner.start(config)


def _options(limit: SizeLike, backing: str | None, values: dict[str, Any]) -> MountOptions:
    return MountOptions.from_values({**values, "limit": limit, "backing": backing})


def check_fuse() -> None:
    """Raise QuotafsError (ExitCode.NO_FUSE) saying why quotafs cannot mount here: no
    /dev/fuse, one that does not open, or no fusermount3 for a regular user."""
    lifecycle.check_fuse()


def check_ext4_loop() -> None:
    """Raise QuotafsError saying why ext4_loop() cannot build its reference here: not root,
    no loop devices, or a missing tool (naming its package)."""
    if os.geteuid() != 0:
        raise QuotafsError("the ext4 reference needs root (it attaches a loop device and "
                           "mounts ext4)", ExitCode.PERMISSION)
    if not os.path.exists("/dev/loop-control"):
        raise QuotafsError("no loop devices here (/dev/loop-control is missing)",
                           ExitCode.LOOP)
    loopext4.check_tools()


def format_event(event: Event) -> str:
    """One event of QuotaMount.events() as a line, as `quotafs events` prints it."""
    return control.event_line(event)


@contextlib.contextmanager
def mounted(limit: SizeLike = None, backing: str | None = None,
            mountpoint: str | None = None, **options: Any) -> Iterator[QuotaMount]:
    """Mount quotafs (a fresh temp mount point unless given) and unmount on exit.

    Options are those of `quotafs mount`, as keywords: inodes, reserve ("5%" or a size
    that only root may use; default 0), like_ext4 (a size: a default mkfs.ext4's room
    for that image), accounting, block_size,
    mmap_sigbus, allow_other, no_cache, keep_backing, fsname, debug, xattrs (False: as
    --xattrs off), crash_sim (True: QuotaMount.crash cuts the power), seed, rules (a
    list of rule dicts as in a rules file), rules_file; and
    log_file, a file the daemon appends
    its log to (warnings and errors; everything with debug) instead of the caller's stderr.
    They are checked (quotafs.options.MountOptions) before anything is made: a bad one
    raises QuotafsError with the message `quotafs mount` prints.
    """
    with mounted_with(_options(limit, backing, options), mountpoint) as mount:
        yield mount


@contextlib.contextmanager
def mounted_with(options: MountOptions, mountpoint: str | None = None) -> Iterator[QuotaMount]:
    """`mounted` for options already built (MountOptions.from_values, or the CLI's flags)."""
    mount = QuotaMount.start_with(options, mountpoint)
    try:
        yield mount
    finally:
        mount.close()


@contextlib.asynccontextmanager
async def open_quota_mount(limit: SizeLike = None, backing: str | None = None,
                           mountpoint: str | None = None,
                           **options: Any) -> AsyncIterator[QuotaMount]:
    """Trio flavour of `mounted`: start and stop run in a worker thread."""
    import trio  # here: trio's import costs about 90 ms, which only trio callers pay

    checked = _options(limit, backing, options)
    mount = await trio.to_thread.run_sync(lambda: QuotaMount.start_with(checked, mountpoint))
    try:
        yield mount
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mount.close)


# -- the loop-ext4 reference, as a handle shaped like QuotaMount ---------------------------

_EXT4_CANNOT = ("{what}: the ext4 reference is a real filesystem of fixed size without fault "
                "injection; use quotafs.mounted() (or the quota_mount fixture) for that")


@dataclass(frozen=True, eq=False)
class Ext4Status(Usage):
    """Ext4Mount.status(): its usage() and what the reference is made of."""

    filesystem: str  # "ext4"
    mountpoint: str
    device: str  # the loop device
    image: str
    image_size: int
    block_size: int
    avail: int  # statvfs f_bavail * f_frsize, as df's Avail
    reserved_clusters_bytes: int  # held back by ext4 from everyone, root included
    write_capacity_hint: int  # about what write(2) can store as root
    pid: None = None  # no daemon
    backing: None = None  # no backing directory


@dataclass
class Ext4Mount:
    """A mounted loop-ext4 (see loopext4.py): `.path` is its mount point, `.usage()` comes
    from statvfs. It has no daemon (`.pid` is None) and no backing directory (`.backing` is
    None); what cannot be done to a real ext4 (set_limit, add_fault) raises QuotafsError."""

    MIN_FREE: ClassVar[int] = loopext4.MIN_FREE  # the least free space ext4_loop builds

    path: str
    loop: Ext4Loop
    backing: None = None
    pid: None = None
    _free_at_start: int = field(default=0, repr=False)
    _ffree_at_start: int = field(default=0, repr=False)

    @property
    def free_bytes(self) -> int:
        """Free space for root when it was built (statvfs f_bfree), about what was asked."""
        return self.loop.free_bytes

    @property
    def write_capacity_hint(self) -> int:
        """About what write(2) can store as root: free space minus ext4's reserved
        clusters. Other users get root_reserve_bytes less."""
        return self.loop.write_capacity_hint

    @property
    def root_reserve_bytes(self) -> int:
        """ext4's reserved blocks, which only root may use (5% of a default mkfs)."""
        return self.loop.root_reserve_bytes

    def quotafs_options(self) -> dict[str, int]:
        """limit and reserve for quotafs.mounted(**...): the same room as this ext4 for
        root and for every other user."""
        return self.loop.quotafs_options()

    def usage(self) -> Usage:
        """The fields of QuotaMount.usage(), from statvfs: limit is the free space at mkfs,
        used what has gone since, free what is left for root (f_bfree), available what is
        left for everyone else (f_bavail); inode_limit and inodes_used likewise. ext4
        neither counts its ENOSPCs nor reserves pages for mmap: enospc_count and reserved
        are None."""
        st = os.statvfs(self.path)
        free = st.f_bfree * st.f_frsize
        return Usage(limit=self._free_at_start, used=self._free_at_start - free,
                     reserved=None, free=free, root_reserve=self.loop.root_reserve_bytes,
                     available=st.f_bavail * st.f_frsize, inode_limit=self._ffree_at_start,
                     inodes_used=self._ffree_at_start - st.f_ffree, enospc_count=None)

    def status(self) -> Ext4Status:
        """usage() plus what the reference is made of (device, image, sizes)."""
        st = os.statvfs(self.path)
        loop = self.loop
        return Ext4Status(**vars(self.usage()), filesystem="ext4", mountpoint=self.path,
                          device=loop.device, image=loop.image, image_size=loop.image_size,
                          block_size=loop.block_size, avail=st.f_bavail * st.f_frsize,
                          reserved_clusters_bytes=loop.reserved_clusters_bytes,
                          write_capacity_hint=loop.write_capacity_hint)

    def set_limit(self, limit: SizeLike) -> None:
        raise QuotafsError(_EXT4_CANNOT.format(what="set_limit"), ExitCode.USAGE)

    def set_inode_limit(self, inodes: int | None) -> None:
        raise QuotafsError(_EXT4_CANNOT.format(what="set_inode_limit"), ExitCode.USAGE)

    def add_fault(self, op: str | list[str], **trigger_and_effect: Any) -> str:
        raise QuotafsError(_EXT4_CANNOT.format(what="add_fault"), ExitCode.USAGE)

    def faults(self) -> list[RuleStatus]:
        return []  # none can be added

    def clear_faults(self, rule_id: str | None = None) -> int:
        return 0

    def events(self, after: int = 0) -> list[Event]:
        return []  # ext4 records nothing; a quotafs mount records its ENOSPCs and faults

    def is_alive(self) -> bool:
        return os.path.ismount(self.path)

    def power_cut(self) -> None:
        """A real power cut: ext4's shutdown ioctl without a log flush, then unmount and
        mount again, so `.path` shows what survived (the reference of QuotaMount.crash;
        see docs/crash.md). Close every descriptor on it first."""
        self.loop.power_cut()


@contextlib.contextmanager
def ext4_loop(free: int | str | None, workdir: str | None = None,
              keep: bool = False, image_size: SizeLike = None) -> Iterator[Ext4Mount]:
    """The real thing, for comparison: a loop-mounted ext4 with `free` bytes free (for root;
    "120M" and the like work too), torn down on exit whatever happens (keep=True leaves it
    and notes the commands that remove it). Root only; builds in /var/tmp unless `workdir`.

        with quotafs.ext4_loop(free="16M") as ref, quotafs.mounted(
                **ref.quotafs_options()) as q:
            ...  # the same program on both, as root or as any other user

    With `image_size` (and free=None) the image is that size, as `truncate -s SIZE;
    mkfs.ext4` makes it: the reference of `quotafs.mounted(like_ext4=SIZE)`.
    """
    image = _bytes(image_size, "image_size")
    size = _bytes(free, "free") if image is None else image
    if size is None:
        raise QuotafsError("ext4_loop needs a size: free='16M', for example", ExitCode.USAGE)
    if os.geteuid() != 0:
        raise QuotafsError(
            f"ext4_loop needs root: it attaches a loop device and mounts ext4 "
            f"({format_size(size)} requested); quotafs.mounted() needs no root",
            ExitCode.PERMISSION)
    with loopext4.open_ext4_loop(loopext4.MIN_FREE if image else size, workdir=workdir,
                                 keep=keep, image_size=image) as loop:
        st = os.statvfs(loop.mountpoint)
        yield Ext4Mount(loop.mountpoint, loop, _free_at_start=st.f_bfree * st.f_frsize,
                        _ffree_at_start=st.f_ffree)


# -- the tmpfs reference (no root needed), as a handle shaped like Ext4Mount ---------------

_TMPFS_CANNOT = ("{what}: the tmpfs reference is a real filesystem of fixed size without "
                 "fault injection; use quotafs.mounted() (or the quota_mount fixture) for that")


@dataclass
class TmpfsMount:
    """A size-limited tmpfs in a private mount namespace (reference/tmpfs.py), made without
    root where user namespaces are allowed. `.path` is where this process reaches it
    (/proc/HOLDER/root/DIR): open, write, mmap, ENOSPC and SIGBUS work there as on any
    mount. A program that needs getcwd() (SQLite, most build tools) must run *inside* the
    namespace: start it with `launch_prefix()` in front of its argv and its cwd below
    `.path`; it sees the mount as `.inside_path`, and runs as the caller's own uid.
    No daemon (`.pid` None), no backing directory; set_limit and add_fault raise."""

    path: str
    reference: TmpfsReference
    backing: None = None
    pid: None = None
    _ffree_at_start: int = field(default=0, repr=False)

    @property
    def inside_path(self) -> str:
        """The mount point as programs started with launch_prefix() see it."""
        return self.reference.inside_path

    @property
    def size(self) -> int:
        """tmpfs size=: the room every writer has (root too: no reserve)."""
        return self.reference.size

    @property
    def holder_pid(self) -> int:
        """The process that keeps the namespace alive; it dies with this one."""
        return self.reference.holder.pid

    def launch_prefix(self, user: str | None = None) -> list[str]:
        """argv to put in front of a program so that it runs inside the namespace (as
        `user`: root only; default the caller). Start it with its cwd below `.path`."""
        return list(self.reference.launch(user).prefix)

    def quotafs_options(self) -> dict[str, int]:
        """limit and reserve for quotafs.mounted(**...): the same room as this tmpfs."""
        return {"limit": self.reference.quotafs_limit,
                "reserve": self.reference.quotafs_reserve}

    def usage(self) -> Usage:
        """The fields of QuotaMount.usage(), from statvfs: limit is the size, free and
        available the same (no root reserve); the inode limit is tmpfs's nr_inodes.
        tmpfs counts no ENOSPCs and reserves no pages: enospc_count and reserved are None."""
        st = os.statvfs(self.path)
        free = st.f_bfree * st.f_frsize
        return Usage(limit=self.size, used=self.size - free, reserved=None, free=free,
                     root_reserve=0, available=st.f_bavail * st.f_frsize,
                     inode_limit=st.f_files, inodes_used=self._ffree_at_start - st.f_ffree,
                     enospc_count=None)

    def describe(self) -> dict[str, object]:
        """What compare's report says of it, known differences from ext4 included."""
        return self.reference.describe()

    def set_limit(self, limit: SizeLike) -> None:
        raise QuotafsError(_TMPFS_CANNOT.format(what="set_limit"), ExitCode.USAGE)

    def add_fault(self, op: str | list[str], **trigger_and_effect: Any) -> str:
        raise QuotafsError(_TMPFS_CANNOT.format(what="add_fault"), ExitCode.USAGE)

    def faults(self) -> list[RuleStatus]:
        return []

    def events(self, after: int = 0) -> list[Event]:
        return []  # tmpfs records nothing

    def is_alive(self) -> bool:
        return self.reference.holder.alive()


def check_tmpfs_reference() -> None:
    """Raise QuotafsError saying why tmpfs_reference() cannot be made here: a missing
    tool, or (without root) user namespaces that are not allowed."""
    tmpfs.check_usable()


@contextlib.contextmanager
def tmpfs_reference(size: int | str, workdir: str | None = None,
                    keep: bool = False) -> Iterator[TmpfsMount]:
    """A real kernel filesystem of `size` bytes ("16M" works too) that needs no root: a
    tmpfs in a private mount (and user) namespace, torn down on exit whatever happens,
    and even if this process is killed. Its room is its size, for root and everyone else.

        with quotafs.tmpfs_reference("16M") as ref, quotafs.mounted(
                **ref.quotafs_options()) as q:
            ...  # the same program on ref.path and q.path
    """
    room = _bytes(size, "size")
    if room is None:
        raise QuotafsError("tmpfs_reference needs a size: '16M', for example", ExitCode.USAGE)
    with tmpfs.open_tmpfs(room, workdir=workdir, keep=keep) as ref:
        st = os.statvfs(ref.outside_path)
        yield TmpfsMount(ref.outside_path, ref, _ffree_at_start=st.f_ffree)
