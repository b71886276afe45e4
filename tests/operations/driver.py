"""An in-process driver of QuotaFS: its pyfuse3 handlers called directly, as the kernel calls
them, on a backing directory and without /dev/fuse (as s3ql's tests/t3_fs_api.py drives its
Operations).

`InProcessFS` speaks paths where the handlers speak inodes: it looks every component up
from the root, as the kernel's path walk does, counts the lookups each reply gives the
"kernel" (lookup, create, mkdir, mknod, symlink, link, readdirplus entries) and forgets
them on `forget_all()` and `close()`. A FUSEError comes back as the OSError a program
would see, with the same errno.

What a handler would ask of a live FUSE session (readdir_reply, get_sup_groups,
invalidate_entry_async) is answered by `SessionStandIns`, installed by one fixture in
tests/operations/conftest.py.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from stat import S_IFDIR, S_IFIFO, S_IFREG
from typing import Any, NoReturn, TypeVar

import pyfuse3
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from quotafs import protocol as control
from quotafs.daemon.crashsim import STASH
from quotafs.daemon.kernel import Kernel
from quotafs.model.costs import Costs, Mode, scan_backing

T = TypeVar("T")
Books = tuple[int, int, int]  # used bytes, inodes used, bytes reserved


class Ctx(pyfuse3.RequestContext):
    """A request's context as the kernel sends it. pyfuse3's own has read-only fields that
    only a live session fills in; this subclass answers them from its own."""

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0o022) -> None:
        self._fields = (uid, gid, pid, umask)

    uid = property(lambda self: self._fields[0])
    gid = property(lambda self: self._fields[1])
    pid = property(lambda self: self._fields[2])
    umask = property(lambda self: self._fields[3])

    @classmethod
    def of_this_process(cls, umask: int = 0o022) -> Ctx:
        """A caller with the daemon's own uid and gid (every request of a mount without
        allow_other), so the handlers switch no identity."""
        return cls(os.geteuid(), os.getegid(), os.getpid(), umask)


class Fields(pyfuse3.SetattrFields):
    """Which attributes a setattr changes (pyfuse3's own are read-only outside a session)."""

    def __init__(self, **changed: bool) -> None:
        unknown = set(changed) - set(SETATTR_FIELDS)
        if unknown:
            raise TypeError(f"no such setattr fields: {sorted(unknown)}")
        self._changed = changed


SETATTR_FIELDS = ("update_atime", "update_mtime", "update_ctime", "update_mode",
                  "update_uid", "update_gid", "update_size")
for _name in SETATTR_FIELDS:
    setattr(Fields, _name, property(lambda self, n=_name: self._changed.get(n, False)))


@dataclass
class Token:
    """Stands in for pyfuse3.ReaddirToken: the entries one readdir request replied, and how
    many fit in the reply buffer (the kernel's is a page or so)."""

    capacity: int
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = field(default_factory=list)


@dataclass
class SessionStandIns(Kernel):
    """What QuotaFS asks of the FUSE session (quotafs/daemon/kernel.py), answered without
    one: handed to `build_filesystem(options, kernel=...)`."""

    def __init__(self) -> None:
        self.groups: set[int] = set()  # every caller's supplementary groups
        self.invalidated: list[tuple[int, bytes]] = []
        self.invalidated_inodes: list[int] = []  # a power cut's (crashsim.py)

    def readdir_reply(self, token: Token, name: bytes,  # type: ignore[override]
                      attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(token.entries) >= token.capacity:
            return False
        token.entries.append((bytes(name), attrs, next_id))
        return True

    def invalidate_entries(self, entries: Iterable[tuple[int, bytes]]) -> int:
        before = len(self.invalidated)
        self.invalidated += [(parent, bytes(name)) for parent, name in entries]
        return len(self.invalidated) - before

    def invalidate(self, inodes: Sequence[int], entries: Sequence[tuple[int, bytes]]) -> None:
        self.invalidated_inodes += list(inodes)
        self.invalidated += [(parent, bytes(name)) for parent, name in entries]

    def sup_groups(self, pid: int) -> set[int]:
        return set(self.groups)

    @staticmethod
    def no_session(*args: Any, **kwargs: Any) -> NoReturn:
        """pyfuse3.init and pyfuse3.main: the in-process layer never mounts."""
        raise AssertionError("an in-process test tried to start a FUSE session")


@dataclass(frozen=True)
class OpenFile:
    """An open file as the kernel holds it: the daemon's handle and the inode."""

    fh: int
    inode: int
    path: str


def _parts(path: str) -> list[bytes]:
    return [os.fsencode(p) for p in path.split("/") if p]


class InProcessFS:
    """A QuotaFS (any pyfuse3.Operations with its handlers) driven by paths, in-process."""

    def __init__(self, ops: pyfuse3.Operations, backing: str, ctx: Ctx | None = None) -> None:
        self.ops: Any = ops  # its handlers; typed by pyfuse3.Operations
        self.backing = backing
        self.ctx = ctx or Ctx.of_this_process()
        self._lookups: collections.Counter[int] = collections.Counter()
        self._open: dict[int, OpenFile] = {}
        self._readdir_capacity = 3  # small: listings take several readdir requests
        self.closed = False

    # -- the request boundary --------------------------------------------------------------

    @staticmethod
    async def _call(request: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await request(*args)
        except pyfuse3.FUSEError as exc:
            raise OSError(exc.errno, os.strerror(exc.errno)) from None

    def _looked_up(self, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        self._lookups[attrs.st_ino] += 1
        return attrs

    async def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        attrs = await self._call(self.ops.lookup, InodeT(parent), FileNameT(name), self.ctx)
        if attrs.st_ino == 0:  # a negative entry: the kernel's ENOENT, nothing to forget
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return self._looked_up(attrs)

    async def inode(self, path: str) -> int:
        """The inode `path` names, looked up component by component from the root."""
        inode = pyfuse3.ROOT_INODE
        for part in _parts(path):
            inode = (await self._lookup(inode, part)).st_ino
        return inode

    async def _entry(self, path: str) -> tuple[int, bytes]:
        """(the parent directory's inode, the last component) of `path`."""
        parts = _parts(path)
        if not parts:
            raise OSError(errno.EBUSY, "the root has no parent entry")
        parent = await self.inode("/".join(os.fsdecode(p) for p in parts[:-1]))
        return parent, parts[-1]

    # -- attributes -------------------------------------------------------------------------

    async def stat(self, path: str) -> pyfuse3.EntryAttributes:
        return await self._call(self.ops.getattr, InodeT(await self.inode(path)), self.ctx)

    async def truncate(self, target: str | OpenFile, size: int) -> pyfuse3.EntryAttributes:
        """truncate(2) of a path, or ftruncate(2) of an open file."""
        if isinstance(target, OpenFile):
            inode, fh = target.inode, FileHandleT(target.fh)
        else:
            inode, fh = await self.inode(target), None
        attrs = pyfuse3.EntryAttributes()
        attrs.st_size = size
        return await self._call(self.ops.setattr, InodeT(inode), attrs,
                                Fields(update_size=True), fh, self.ctx)

    async def chmod(self, path: str, mode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_mode = ModeT(mode)
        return await self._call(self.ops.setattr, InodeT(await self.inode(path)), attrs,
                                Fields(update_mode=True), None, self.ctx)

    # -- names ------------------------------------------------------------------------------

    async def mkdir(self, path: str, mode: int = 0o755) -> pyfuse3.EntryAttributes:
        parent, name = await self._entry(path)
        return self._looked_up(await self._call(
            self.ops.mkdir, InodeT(parent), FileNameT(name), ModeT(S_IFDIR | mode),
            self.ctx))

    async def _victim(self, path: str, must_exist: bool = True) -> tuple[int, bytes]:
        """The entry a removal or rename names, its last component looked up too: the
        kernel's path walk does, so the daemon always knows the inode that goes."""
        parent, name = await self._entry(path)
        try:
            await self._lookup(parent, name)
        except FileNotFoundError:
            if must_exist:
                raise
        return parent, name

    async def rmdir(self, path: str) -> None:
        parent, name = await self._victim(path)
        await self._call(self.ops.rmdir, InodeT(parent), FileNameT(name), self.ctx)

    async def unlink(self, path: str) -> None:
        parent, name = await self._victim(path)
        await self._call(self.ops.unlink, InodeT(parent), FileNameT(name), self.ctx)

    async def symlink(self, target: str, path: str) -> pyfuse3.EntryAttributes:
        parent, name = await self._entry(path)
        return self._looked_up(await self._call(
            self.ops.symlink, InodeT(parent), FileNameT(name), FileNameT(os.fsencode(target)),
            self.ctx))

    async def mknod(self, path: str, mode: int = S_IFIFO | 0o644,
                    rdev: int = 0) -> pyfuse3.EntryAttributes:
        parent, name = await self._entry(path)
        return self._looked_up(await self._call(
            self.ops.mknod, InodeT(parent), FileNameT(name), ModeT(mode), rdev, self.ctx))

    async def link(self, existing: str, new: str) -> pyfuse3.EntryAttributes:
        return await self._link(await self.inode(existing), new)

    async def link_open(self, f: OpenFile, new: str) -> pyfuse3.EntryAttributes:
        """linkat(fd, "", AT_EMPTY_PATH) of an open file: the kernel sends LINK of its
        inode only if the attributes the daemon gave it count a link (ENOENT itself)."""
        attrs = await self._call(self.ops.getattr, InodeT(f.inode), self.ctx)
        if attrs.st_nlink == 0:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return await self._link(f.inode, new)

    async def _link(self, inode: int, new: str) -> pyfuse3.EntryAttributes:
        parent, name = await self._entry(new)
        return self._looked_up(await self._call(
            self.ops.link, InodeT(inode), InodeT(parent), FileNameT(name), self.ctx))

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        old_parent, old_name = await self._victim(old)
        new_parent, new_name = await self._victim(new, must_exist=False)
        await self._call(self.ops.rename, InodeT(old_parent), FileNameT(old_name),
                         InodeT(new_parent), FileNameT(new_name), FlagT(flags), self.ctx)

    async def fsyncdir(self, path: str = "/") -> None:
        """fsync(2) of a directory: opendir, fsyncdir, releasedir."""
        fh = await self._call(self.ops.opendir, InodeT(await self.inode(path)), self.ctx)
        try:
            await self._call(self.ops.fsyncdir, FileHandleT(fh), False)
        finally:
            await self._call(self.ops.releasedir, FileHandleT(fh))

    async def listdir(self, path: str = "/") -> list[str]:
        """The names in a directory (without . and ..), by readdirplus requests as the
        kernel sends them: each continues at the offset the previous reply ended with."""
        inode = await self.inode(path)
        fh = await self._call(self.ops.opendir, InodeT(inode), self.ctx)
        names: list[str] = []
        try:
            offset = 0
            while True:
                token = Token(self._readdir_capacity)
                await self._call(self.ops.readdir, FileHandleT(fh), offset, token)
                for name, attrs, next_id in token.entries:
                    if name not in (b".", b".."):  # readdirplus takes no lookup of these
                        self._looked_up(attrs)
                        names.append(os.fsdecode(name))
                    offset = next_id
                if len(token.entries) < token.capacity:
                    return names
        finally:
            await self._call(self.ops.releasedir, FileHandleT(fh))

    # -- files ------------------------------------------------------------------------------

    async def create(self, path: str, mode: int = 0o644,
                     flags: int = os.O_RDWR) -> OpenFile:
        parent, name = await self._entry(path)
        info, attrs = await self._call(self.ops.create, InodeT(parent), FileNameT(name),
                                       ModeT(S_IFREG | mode), FlagT(flags | os.O_CREAT),
                                       self.ctx)
        self._looked_up(attrs)
        return self._opened(OpenFile(info.fh, attrs.st_ino, path))

    async def open(self, path: str, flags: int = os.O_RDWR) -> OpenFile:
        inode = await self.inode(path)
        info = await self._call(self.ops.open, InodeT(inode), FlagT(flags), self.ctx)
        return self._opened(OpenFile(info.fh, inode, path))

    def _opened(self, f: OpenFile) -> OpenFile:
        self._open[f.fh] = f
        return f

    async def write(self, f: OpenFile, offset: int, data: bytes) -> int:
        return await self._call(self.ops.write, FileHandleT(f.fh), offset, data)

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        return await self._call(self.ops.read, FileHandleT(f.fh), offset, size)

    async def fsync(self, f: OpenFile, datasync: bool = False) -> None:
        await self._call(self.ops.fsync, FileHandleT(f.fh), datasync)

    async def release(self, f: OpenFile) -> None:
        """close(2): a flush, then the release (which the kernel sends even if flush failed)."""
        del self._open[f.fh]
        try:
            await self._call(self.ops.flush, FileHandleT(f.fh))
        finally:
            await self._call(self.ops.release, FileHandleT(f.fh))

    async def write_file(self, path: str, data: bytes, offset: int = 0) -> int:
        """Create (or open) `path`, write `data` at `offset`, close it."""
        try:
            f = await self.create(path)
        except FileExistsError:
            f = await self.open(path)
        try:
            return await self.write(f, offset, data)
        finally:
            await self.release(f)

    async def read_file(self, path: str) -> bytes:
        f = await self.open(path, os.O_RDONLY)
        try:
            return await self.read(f, 0, (await self.stat(path)).st_size)
        finally:
            await self.release(f)

    # -- the filesystem ---------------------------------------------------------------------

    async def statfs(self) -> pyfuse3.StatvfsData:
        return await self._call(self.ops.statfs, self.ctx)

    async def getxattr(self, path: str, name: bytes) -> bytes:
        return await self._call(self.ops.getxattr, InodeT(await self.inode(path)),
                                XAttrNameT(name), self.ctx)

    async def setxattr(self, path: str, name: bytes, value: bytes) -> None:
        await self._call(self.ops.setxattr, InodeT(await self.inode(path)), XAttrNameT(name),
                         value, self.ctx)

    async def listxattr(self, path: str) -> list[bytes]:
        return list(await self._call(self.ops.listxattr, InodeT(await self.inode(path)),
                                     self.ctx))

    async def removexattr(self, path: str, name: bytes) -> None:
        await self._call(self.ops.removexattr, InodeT(await self.inode(path)),
                         XAttrNameT(name), self.ctx)

    # -- the control channel: its service called directly, as the socket would ----------

    async def status(self) -> dict[str, Any]:
        return await self.control(control.STATUS, {})

    async def control(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """A control request from the caller's uid and its outcome: the result document,
        or OSError of the refusal's errno (its reason in `result["error"]`)."""
        reply = json.loads(self.ops.control.answer(control.request_line(name, request),
                                                   self.ctx.uid))
        if "error" in reply:
            exc = OSError(getattr(errno, reply["errno"]), reply["error"])
            exc.result = reply  # type: ignore[attr-defined]
            raise exc
        result: dict[str, Any] = reply["result"]
        return result

    async def set_limits(self, **settings: Any) -> dict[str, Any]:
        """`quotafs set`: limit=, inodes=, reserve= (None: no limit)."""
        return await self.control(control.SET, settings)

    async def add_fault(self, **rule: Any) -> dict[str, Any]:
        return await self.control(control.FAULT_ADD, rule)

    async def books(self, held: int = 0) -> tuple[Books, Books]:
        """(used, inodes used, reserved) as the ledger holds them, and as a fresh scan of
        the backing directory says they should be (the scan the mount does); `held`: the
        bytes of files unlinked while open, which are on no name the scan could find."""
        status = await self.status()
        costs = Costs(Mode(status["accounting"]), status["block_size"])
        used, inodes = scan_backing(self.backing, costs)
        stash = os.path.join(self.backing, os.fsdecode(STASH))
        if os.path.isdir(stash):  # --crash-sim's removals that a cut may undo: unseen
            stashed, stashed_inodes = scan_backing(stash, costs)
            used -= stashed + costs.directory()
            inodes -= stashed_inodes + 1
        return ((status["used"], status["inodes_used"], status["reserved"]),
                (used + held, inodes, 0))

    async def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await self.control(control.EVENTS, {}))["events"]
        return events

    # -- the kernel letting go ---------------------------------------------------------------

    async def forget_all(self) -> None:
        """FORGET every inode the kernel holds, as under memory pressure."""
        held = [(InodeT(inode), count) for inode, count in self._lookups.items()]
        self._lookups.clear()
        if held:
            await self.ops.forget(held)

    async def close(self) -> None:
        """As an unmount: every file still open is released, every inode forgotten, and
        what the daemon still holds below the backing (its root's descriptor) closed, as
        its exit would."""
        if self.closed:
            return
        for f in list(self._open.values()):
            with contextlib.suppress(OSError):  # a fault rule on release: gone all the same
                await self.release(f)
        await self.forget_all()
        close_descriptors_below(self.backing)
        self.closed = True


def close_descriptors_below(directory: str) -> None:
    """Close this process's descriptors of `directory` and of what lies below it."""
    real = os.path.realpath(directory)
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}").removesuffix(" (deleted)")
            if target == real or target.startswith(real + "/"):
                os.close(int(name))


def run_now(request: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a request to its end without an event loop, as trio would run one that never
    waits (no delay rule): ten times cheaper than a trio.run, for the state machine's
    thousands of requests. A request that does wait is an error here."""
    coroutine = request(*args)
    try:
        coroutine.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()  # type: ignore[attr-defined]
    raise AssertionError(f"{request} waited: drive it with trio.run instead")


FsFactory = Callable[..., InProcessFS]  # the make_fs fixture: make(limit, **options)


def backing_names(fs: InProcessFS, stashed: bool = False) -> list[str]:
    """tests.conftest.backing_names of the in-process mount's backing directory."""
    from tests.conftest import backing_names as names

    return names(fs.backing, stashed)
