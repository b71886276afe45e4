"""The fault gate: which fault rules a request meets, and what the handler must do then.

Each handler that a rule can fault calls `FaultGate.check(Op.X, *its arguments)` first
(only while some rule is live: `FaultEngine.active`), before any other work. `Op` is the
one table: for each op a rule can name (model/faults.py's OPS, in that order) the QuotaFS
handler that serves it and how the request's subjects — the paths a rule's glob is
matched against — are found from the handler's arguments. Handlers that no rule can fault
are listed in NOT_FAULT_OPS with the reason; tests/unit/test_faultgate.py fails when a
handler is in neither, or when the table and OPS (or the plausible-errno table) differ.

check() answers a delay by sleeping (other requests are served meanwhile), an errno by
raising it, and returns the effects that change a request's body (short-write,
corrupt-read) to the handler, which applies them; None otherwise. With --crash-sim
(`crash`, the mount's CrashSim) it also acts on the two durability effects: a crash cuts
the power before the request is carried out (CrashSim.cut, synchronous, so atomic with
respect to every request) and answers EIO, the device being gone; the kernel's caches
are dropped once that answer is sent (CrashSim.settle_soon), and new opens wait for it.
The cut leaves the device down (FaultEngine.down) until the control request crash.revive:
every request answers EIO but the few _refuse_down lets through, and a request that
slept in a delay rule across a cut answers EIO too, so nothing a program does after the
cut lands in the post-crash state. An
errno with drop-unsynced first reverts the file's unsynced writes (CrashSim.drop_unsynced),
as ext4 does after a failed writeback; such a rule matches only an fsync of a file that
has unsynced writes, so the next fsync, with nothing left to write back, returns 0.

Nodes remember that no live rule can match them or their entries (Node.quiet,
quiet_below, valid for a (rules, names) generation pair): an idle rule costs a lookup.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from quotafs.daemon.control import ControlChannel
from quotafs.daemon.crashsim import CrashSim
from quotafs.daemon.inodes import InodeTable, Node
from quotafs.daemon.paths import Paths
from quotafs.model.faults import Effect, FaultEngine


class Subjects(enum.Enum):
    """Where a request's subjects are in its handler's arguments."""

    NODE = "the inode (first argument)"
    ENTRY = "an entry: the directory inode and the name (first two arguments)"
    HANDLE = "the file handle's node (first argument)"
    RENAME = "two entries: old directory and name, new directory and name"
    LINK = "the new entry (new directory, new name), then the inode linked"
    ROOT = "the mount root"
    XATTR = "the inode, unless the name is the control channel's on the root"


@dataclass(frozen=True, slots=True)
class FaultOp:
    name: str  # as rules name it (model.faults.OPS)
    handler: str  # the QuotaFS method that serves it
    subjects: Subjects


class Op:
    """The table (one row per op a rule can name, in model.faults.OPS order)."""

    LOOKUP = FaultOp("lookup", "lookup", Subjects.ENTRY)
    GETATTR = FaultOp("getattr", "getattr", Subjects.NODE)
    SETATTR = FaultOp("setattr", "setattr", Subjects.NODE)
    TRUNCATE = FaultOp("truncate", "setattr", Subjects.NODE)  # a setattr of the size
    OPEN = FaultOp("open", "open", Subjects.NODE)
    CREATE = FaultOp("create", "create", Subjects.ENTRY)
    READ = FaultOp("read", "read", Subjects.HANDLE)
    WRITE = FaultOp("write", "write", Subjects.HANDLE)
    FLUSH = FaultOp("flush", "flush", Subjects.HANDLE)
    FSYNC = FaultOp("fsync", "fsync", Subjects.HANDLE)
    RELEASE = FaultOp("release", "release", Subjects.HANDLE)
    MKDIR = FaultOp("mkdir", "mkdir", Subjects.ENTRY)
    RMDIR = FaultOp("rmdir", "rmdir", Subjects.ENTRY)
    UNLINK = FaultOp("unlink", "unlink", Subjects.ENTRY)
    RENAME = FaultOp("rename", "rename", Subjects.RENAME)
    LINK = FaultOp("link", "link", Subjects.LINK)
    SYMLINK = FaultOp("symlink", "symlink", Subjects.ENTRY)
    READLINK = FaultOp("readlink", "readlink", Subjects.NODE)
    MKNOD = FaultOp("mknod", "mknod", Subjects.ENTRY)
    OPENDIR = FaultOp("opendir", "opendir", Subjects.NODE)
    READDIR = FaultOp("readdir", "readdir", Subjects.HANDLE)
    FSYNCDIR = FaultOp("fsyncdir", "fsyncdir", Subjects.HANDLE)
    STATFS = FaultOp("statfs", "statfs", Subjects.ROOT)
    GETXATTR = FaultOp("getxattr", "getxattr", Subjects.XATTR)
    SETXATTR = FaultOp("setxattr", "setxattr", Subjects.XATTR)
    LISTXATTR = FaultOp("listxattr", "listxattr", Subjects.NODE)
    REMOVEXATTR = FaultOp("removexattr", "removexattr", Subjects.XATTR)
    ACCESS = FaultOp("access", "access", Subjects.NODE)


FAULT_OPS: tuple[FaultOp, ...] = tuple(
    row for row in vars(Op).values() if isinstance(row, FaultOp))

# QuotaFS handlers no rule can fault, and why.
NOT_FAULT_OPS: dict[str, str] = {
    "forget": "pyfuse3 answers forget itself; nothing raised in it may leave the handler",
    "releasedir": "closing a directory handle cannot fail for a program (closedir)",
    "init": "the kernel's INIT at mount, no program's request; pyfuse3 forbids raising",
}

Subject = tuple[Node | None, bytes | None]  # (node, None) or (directory, name)


class FaultGate:
    def __init__(self, faults: FaultEngine, inodes: InodeTable, paths: Paths,
                 events: ControlChannel | None) -> None:
        self._faults = faults
        self._inodes = inodes
        self._paths = paths
        self._events = events
        self.crash: CrashSim | None = None  # the mount's, with --crash-sim (operations.py)

    async def check(self, op: FaultOp, *args: Any, size: int | None = None,
                    allocating: bool | None = None,
                    ctx: pyfuse3.RequestContext | None = None) -> Effect | None:
        """Consult the rules for a request of `op` with its handler's `args` (`size`: a
        write's byte count; `allocating`: whether a write newly allocates blocks, given
        while FaultEngine.wants_allocation; `ctx`: the caller, for the event). See the
        module docstring."""
        faults = self._faults
        if faults.down:
            self._refuse_down(op, args)
            return None
        if not faults.concerns(op.name):
            return None
        subjects = self._subjects(op.subjects, args)
        if subjects is None:  # the control channel itself is never faulted
            return None
        # Nodes remember that no rule can match them: an idle rule costs a lookup here.
        if all(self._quiet(node, below=name is not None) for node, name in subjects):
            return None
        path, *others = [self._paths.of_entry(node, name) for node, name in subjects]
        node = subjects[0][0] if subjects[0][1] is None else None
        unsynced = (self.crash.has_unsynced(node) if faults.wants_unsynced
                    and self.crash is not None and node is not None else None)
        effect = faults.check(op.name, path, others[0] if others else None, size, allocating,
                              unsynced)
        if effect is None:
            return None
        if self._events is not None:
            self._events.record_fault(op.name, path, effect,
                                      ctx.pid if ctx is not None else None)
        if effect.kind == "delay":
            cuts = self.crash.crashes if self.crash is not None else 0
            await trio.sleep(effect.seconds)  # other requests are served meanwhile
            if self.crash is not None and (faults.down or self.crash.crashes != cuts):
                raise pyfuse3.FUSEError(errno.EIO)  # in flight at a cut: it never landed
            return None
        if effect.kind == "errno":
            if effect.drop_unsynced and self.crash is not None and node is not None:
                self.crash.drop_unsynced(node)
            raise pyfuse3.FUSEError(effect.value)
        if effect.kind == "crash":
            self._cut(effect)
        return effect  # the handler's body applies it, without awaiting in between

    def _cut(self, effect: Effect) -> None:
        """A crash rule fired: the power cut, then EIO for this request. The caches are
        dropped once its answer is out (the kernel may hold this very inode's lock)."""
        cut = effect.cut
        if self.crash is None or cut is None:  # the control channel refuses such rules
            raise pyfuse3.FUSEError(errno.EIO)
        self.crash.cut(cut.model, cut.torn, cut.keep_fraction, cut.seed)
        self._faults.set_down(True)  # until revived: nothing after the cut may land
        self.crash.settle_soon()
        raise pyfuse3.FUSEError(errno.EIO)

    def _refuse_down(self, op: FaultOp, args: tuple[Any, ...]) -> None:
        """The device is down (a --crash rule's cut, not yet revived): EIO, except what
        keeps the mount usable for unmount and tools that look at it (the control
        channel is a socket, not a request): the root's attributes, statfs, and releasing
        handles (their table entries must go)."""
        if op is Op.RELEASE or op is Op.STATFS:
            return
        if op is Op.GETATTR and args[0] == pyfuse3.ROOT_INODE:
            return
        raise pyfuse3.FUSEError(errno.EIO)

    def _subjects(self, kind: Subjects, args: tuple[Any, ...]) -> list[Subject] | None:
        """What a request names: a node, or an entry (a directory node and a name); two for
        rename and link (the second path a rule may match). None: not to be faulted."""
        nodes = self._inodes.nodes
        if kind is Subjects.NODE:
            return [(nodes.get(args[0]), None)]
        if kind is Subjects.ENTRY:
            return [(nodes.get(args[0]), args[1])]
        if kind is Subjects.HANDLE:
            return [(self._inodes.node_of_handle(args[0]), None)]
        if kind is Subjects.XATTR:
            return [(nodes.get(args[0]), None)]
        if kind is Subjects.RENAME:
            return [(nodes.get(args[0]), args[1]), (nodes.get(args[2]), args[3])]
        if kind is Subjects.LINK:
            return [(nodes.get(args[1]), args[2]), (nodes.get(args[0]), None)]
        return [(self._inodes.root, None)]

    def _quiet(self, node: Node | None, below: bool) -> bool:
        """True if no live rule can match a request on the node (below=False) or on an
        entry of the directory (below=True), so the request needs no check at all.
        Cached per node; pinned nodes, whose path the kernel tells, are always checked."""
        if node is None or (node.pinned and node is not self._inodes.root):
            return False
        rules, names = self._faults.generation, self._inodes.names_gen
        cached = node.quiet_below if below else node.quiet
        if cached[0] == rules and cached[1] == names:
            return cached[2]
        path = self._paths.of(node)
        quiet = not (self._faults.may_match_below(path) if below
                     else self._faults.may_match_path(path))
        if below:
            node.quiet_below = (rules, names, quiet)
        else:
            node.quiet = (rules, names, quiet)
        return quiet

    def may_fault_reads(self, node: Node) -> bool:
        """Could a read rule fire on this file? Then opening it must drop the kernel's
        cached pages, so that its reads reach the daemon and the rule."""
        faults = self._faults
        return (faults.concerns("read") and not self._quiet(node, False)
                and faults.could_match("read", self._paths.of(node)))

    def note_written(self, node: Node, nbytes: int) -> None:
        """A write stored `nbytes` (for after-bytes triggers; only while one counts)."""
        self._faults.note_written(self._paths.of(node), nbytes)
