"""--crash-sim: what is not durable yet is recorded, and a power cut reverts it.

One `CrashSim` per mount (None without --crash-sim: the handlers test `is None` and pay
nothing more). It keeps only what a revert needs, in issue order:

- before a write or truncate that is not durable at once (O_SYNC/O_DSYNC handles are),
  the file's old size and the old contents of the range it replaces, saved to a journal
  file (an unnamed O_TMPFILE in the backing directory: never in memory, never in the
  tree); appends save nothing but the size;
- namespace changes (create, mknod, mkdir, symlink, link, unlink, rmdir, rename) with
  what undoing them takes: a removed or replaced inode is moved into the stash directory
  (STASH in the backing root, which lookup, readdir, the ledger and scans never see), or,
  if other names keep it, held by an O_PATH descriptor, so that a cut can give it back.

fsync/fdatasync drop a file's recorded data (durable), fsyncdir the namespace changes
posix keeps (model/durability.posix_kept: their stashed inodes are deleted for real), and
both mark an ext4 journal commit. Past JOURNAL_MAX_BYTES saved or JOURNAL_MAX_ENTRIES
changes, everything becomes durable at once (a forced sync, as writeback and ext4's
5-second commits would have done; counted in the status).

`cut()` asks model/durability.decide what survives, reverts the rest newest first in the
backing directory, kills every open handle (EIO to all but release), recounts the ledger
from a fresh scan and leaves the kernel's caches to be dropped by `settle()`, which the
caller awaits off the handler (pyfuse3's invalidations may wait for requests).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import random
import resource
import stat
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pyfuse3
import trio

from quotafs.daemon import syscalls
from quotafs.daemon.charging import Charging
from quotafs.daemon.inodes import Handle, InodeTable, Key, Node
from quotafs.daemon.kernel import Kernel
from quotafs.daemon.paths import Paths
from quotafs.errors import ExitCode, QuotafsError
from quotafs.model.costs import Costs, scan_backing
from quotafs.model.durability import Change, Decision, Syncs, decide
from quotafs.model.ledger import Ledger
from quotafs.protocol import CrashReport, LostItem

log = logging.getLogger(__name__)

STASH = b".quotafs-crash-stash"
# The mark of a stash quotafs made (a file in it, owned by the daemon): only a marked stash
# is ever removed; a user's tree of that name makes the --crash-sim mount refuse.
STASH_MARK = b".quotafs-stash-mark"
JOURNAL_MAX_BYTES = 256 << 20
# A data record is ~400 B with its Change (tracemalloc, docs/crash.md): ~100 MiB at most;
# consecutive appends share one record, so a workload reaches it only with many changes.
JOURNAL_MAX_ENTRIES = 1 << 18
_CHUNK = 1 << 20


@dataclass(slots=True)
class _File:
    """A file with recorded data changes: a descriptor to revert them through, and its
    records in issue order (an fsync costs what the file recorded, not the whole log)."""

    fd: int
    path: str
    seqs: collections.deque[int] = field(default_factory=collections.deque)


@dataclass(slots=True)  # slots: there may be JOURNAL_MAX_ENTRIES of them
class _Record:
    """One recorded change: `change` for the decisions, the rest for its undo."""

    change: Change
    path: str
    # data: the file's size before it, and its old bytes [offset, offset+saved) at
    # journal offset `at`
    old_size: int = 0
    saved: int = 0
    at: int = 0
    # namespace: (directory key, name) pairs; what it removed, stashed or held
    names: tuple[tuple[Key, bytes], ...] = ()
    stashed: bytes | None = None  # a name in STASH
    held: int = -1  # an O_PATH descriptor of an inode other names keep
    stash_bytes: int = 0  # the stashed inode's blocks (in the journal's bound)
    # appends merged into this one: [seq, end, seq, end, ...] of each (the first's too)
    pieces: array[int] | None = None
    is_dir: bool = False
    exchange: bool = False


@dataclass
class _Pending:
    """What the kernel must drop after a cut: node inode numbers, (parent, name) entries."""

    inodes: list[int] = field(default_factory=list)
    entries: list[tuple[int, bytes]] = field(default_factory=list)


class CrashSim:
    def __init__(self, backing: str, inodes: InodeTable, ledger: Ledger, costs: Costs,
                 paths: Paths, kernel: Kernel, seed: int,
                 on_cut: Callable[[CrashReport], None], charging: Charging,
                 as_daemon: Callable[[], Any]) -> None:
        self._backing = backing
        self._inodes = inodes
        self._ledger = ledger
        self._costs = costs
        self._paths = paths
        self._kernel = kernel
        self._seeds = random.Random(seed)
        self._on_cut = on_cut
        self._charging = charging  # the handlers' own books (charges, reservations)
        self._as_daemon = as_daemon
        self._stash_dir = _make_stash(inodes.fd(inodes.root))  # kept: used for every stash op
        self._seq = 0
        self._log: dict[int, _Record] = {}
        self._files: dict[Key, _File] = {}
        self._dirs: dict[Key, list[int]] = {}  # key -> [O_PATH fd, references]
        self._dir_synced: dict[Key, int] = {}
        self._committed = 0
        # Inodes and directories with a journalled change (a size, a name) since the last
        # commit: ext4's fsync of a regular file commits only for one of them (measured:
        # docs/crash.md).
        self._uncommitted: set[Key] = set()
        self._journal = _journal_file(backing)
        self._journal_end = 0
        self.journal_bytes = 0
        self.stash_bytes = 0  # blocks of the stashed inodes, counted in the bound
        self.unrecorded = 0  # changes made durable at once: a descriptor could not be had
        self.durability_ops = 0
        self.crashes = 0
        self.forced_syncs = 0
        self._pending: _Pending | None = None
        self._merge = (0, 0)  # the record the last write grew, and its length before
        self._replaced_bytes = 0  # stash_replaced -> renamed: the replaced inode's blocks
        self._replaced_key: Key = (0, 0)  # stash_replaced -> unstash: the stashed inode
        self._rename_durable = False  # stash_replaced -> renamed: too big to keep
        self._settled: trio.Event | None = None
        # Removed inodes whose one name is now in the stash: for the kernel they have none.
        self._stashed: set[Key] = set()

    # -- status ---------------------------------------------------------------------------

    def statistics(self) -> dict[str, int | bool]:
        return {"crash_sim": True, "durability_ops": self.durability_ops,
                "crashes": self.crashes, "crash_journal_bytes": self.journal_bytes,
                "crash_journal_entries": len(self._log),
                "crash_forced_syncs": self.forced_syncs,
                "crash_stash_bytes": self.stash_bytes, "crash_unrecorded": self.unrecorded}

    def close(self) -> None:
        """At unmount everything is durable: the stash goes, the journal with it."""
        try:
            self.checkpoint()
            with self._as_daemon():
                _drop_stash(self._inodes.fd(self._inodes.root), self._stash_dir)
        except OSError as exc:  # the next --crash-sim mount removes what is left
            log.warning("crash-sim: the stash of %s was not removed: %s", self._backing, exc)
        finally:
            os.close(self._stash_dir)
            os.close(self._journal)

    @staticmethod
    def clear_stash(backing: str) -> None:
        """A stash a killed daemon left (before the mount's scan). Nothing is reverted:
        the removals it holds become permanent (its inodes are deleted) and the data
        written since the last sync stays, as after an unmount. Only a stash quotafs
        marked goes; any other entry of that name refuses the mount (exit 4)."""
        root = os.open(backing, os.O_PATH | os.O_DIRECTORY)
        try:
            try:
                fd = os.open(STASH, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
            except FileNotFoundError:
                return
            except OSError:  # a symlink (ELOOP), a file (ENOTDIR): not ours
                fd = -1
            try:
                if fd < 0 or not _is_marked(fd):
                    raise QuotafsError(
                        f"--crash-sim: {os.path.join(backing, os.fsdecode(STASH))} is not a "
                        f"stash quotafs made: move it away (a --crash-sim mount keeps that "
                        f"name)", ExitCode.BACKING)
                _drop_stash(root, fd)
            finally:
                if fd >= 0:
                    os.close(fd)
        finally:
            os.close(root)

    # -- recording: data ------------------------------------------------------------------

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _file(self, node: Node) -> _File | None:
        entry = self._files.get(node.key)
        if entry is None:
            self._bound_descriptors()
            try:
                with self._as_daemon():
                    fd = os.open(self._inodes.proc(node), os.O_RDWR)
            except OSError as exc:  # cannot revert it: its changes count as durable
                log.debug("crash-sim: %s not recorded: %s", self._paths.of(node), exc)
                self.unrecorded += 1
                return None
            entry = self._files[node.key] = _File(fd, self._paths.of(node))
        return entry

    def _room(self, nbytes: int) -> bool:
        """Room in the journal for `nbytes` more (after a forced sync if need be). The
        stash's blocks count: a removed file's data stays on the backing until durable."""
        if (self._journal_end + self.stash_bytes + nbytes > JOURNAL_MAX_BYTES
                or len(self._log) >= JOURNAL_MAX_ENTRIES):
            self._forced_sync()
        return self._journal_end + self.stash_bytes + nbytes <= JOURNAL_MAX_BYTES

    def _forced_sync(self) -> None:
        self.checkpoint()  # as the daemon (the stash is its own), whoever asked
        self.forced_syncs += 1

    def _bound_descriptors(self) -> None:
        """Before one more descriptor (a file's, a directory's): past an eighth of
        RLIMIT_NOFILE (the inode table has 3/4), a forced sync closes them all, so that
        the mount's own opens never meet EMFILE because of the recording."""
        limit = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8)
        if len(self._files) + len(self._dirs) >= limit:
            self._forced_sync()

    def before_write(self, handle: Handle, off: int, size: int) -> int:
        """Record a write of `size` bytes at `off` about to be made; its seq (0: none)."""
        node = handle.node
        if handle.sync:  # O_SYNC/O_DSYNC: this range durable as it is written (a commit)
            self._synced_range(node, off, off + size)
            return 0
        return self._save(node, "write", off, size, node.size)

    def _synced_range(self, node: Node, start: int, end: int) -> None:
        """An O_SYNC/O_DSYNC write of [start, end): Linux syncs only that range
        (vfs_fsync_range), so the file's other unsynced writes stay undoable. Earlier
        records whose undo would overwrite the range (their saved bytes overlap it, or a
        size below its end) become durable with it."""
        if end > node.size or node.key in self._uncommitted:
            self.commit()
        entry = self._files.get(node.key)
        if entry is None:
            return
        for seq in list(entry.seqs):
            record = self._log[seq]
            off = record.change.offset
            if record.old_size < end or (off < end and start < off + record.saved):
                self._forget(self._log.pop(seq))

    def before_truncate(self, node: Node, size: int) -> None:
        old = os.fstat(self._inodes.fd(node)).st_size  # a closed file's node may be stale
        if size != old:
            self._save(node, "truncate", min(size, old), max(0, old - size), old)

    def _save(self, node: Node, kind: str, off: int, size: int, old_size: int) -> int:
        keep = max(0, min(off + size, old_size) - off)  # old bytes it replaces
        if not self._room(keep):
            return 0
        entry = self._file(node)
        if entry is None:
            return 0
        if not keep and kind == "write" and self._merged(node, entry, off, size):
            return self._merge[0]
        at = self._journal_end
        _copy(entry.fd, off, keep, self._journal, at)
        self._journal_end += keep
        self.journal_bytes += keep
        if kind == "truncate" or off + size > old_size:
            self._uncommitted.add(node.key)
        seq = self._next()
        self._log[seq] = _Record(Change(seq, kind, file=node.key, offset=off,
                                        length=size if kind == "write" else 0),
                                 entry.path, old_size=old_size, saved=keep, at=at)
        entry.seqs.append(seq)
        return seq

    def _merged(self, node: Node, entry: _File, off: int, size: int) -> bool:
        """An append right after the file's last record, itself an append: one record
        grows (its undo needs only the oldest size), so a file written sequentially
        between two fsyncs costs one record."""
        if not entry.seqs:
            return False
        seq = entry.seqs[-1]
        record = self._log[seq]
        change = record.change
        if change.kind != "write" or record.saved or change.offset + change.length != off:
            return False
        if record.pieces is None:
            record.pieces = array("q", (seq, off))
        record.pieces.extend((self._next(), off + size))  # its own seq: for keep_fraction
        record.change = replace(change, length=change.length + size)
        self._merge = (seq, change.length)
        self._uncommitted.add(node.key)
        return True

    def cancel(self, seq: int) -> None:
        """The recorded write was refused before any byte was written."""
        record = self._log.get(seq)
        if record is None:
            return
        if self._merge[0] == seq:  # it grew a record: shrink it back
            record.change = replace(record.change, length=self._merge[1])
            assert record.pieces is not None
            del record.pieces[-2:]
            if len(record.pieces) == 2:
                record.pieces = None
            self._merge = (0, 0)
            return
        self._forget(self._log.pop(seq))

    def synced_file(self, node: Node) -> None:
        """fsync/fdatasync of `node` succeeded: its data is durable, and ext4 commits."""
        self.durability_ops += 1
        self._synced(node)

    def _synced(self, node: Node, grows: bool = False) -> None:
        if grows or node.key in self._uncommitted:
            self.commit()
        entry = self._files.get(node.key)
        if entry is not None:
            for seq in list(entry.seqs):
                self._forget(self._log.pop(seq))

    def commit(self) -> None:
        self._committed = self._next()
        self._uncommitted.clear()

    # -- recording: names -----------------------------------------------------------------

    def _dir(self, node: Node) -> Key:
        entry = self._dirs.get(node.key)
        if entry is None:
            self._bound_descriptors()
            self._dirs[node.key] = [os.dup(self._inodes.fd(node)), 1]
        else:
            entry[1] += 1
        return node.key

    def _dir_fd(self, key: Key) -> int:
        return self._dirs[key][0]

    def before_name(self, parent: Node, name: bytes) -> None:
        """Before a create, mknod, mkdir, symlink, link or rename makes `name`: the stash's
        name at the root is refused (it is the daemon's), and the log has room for the
        change (a forced sync now, before the change, never after it)."""
        if name == STASH and parent is self._inodes.root:
            raise OSError(errno.EPERM, "the name of --crash-sim's stash")
        self._room(0)

    def _record_names(self, kind: str, path: str, names: list[tuple[Node, bytes]],
                      subjects: tuple[Key, ...], **undo: Any) -> None:
        pairs: list[tuple[Key, bytes]] = []
        try:
            for parent, name in names:
                pairs.append((self._dir(parent), name))
        except OSError as exc:  # the change happened: durable at once, never an error
            log.debug("crash-sim: %s %s not recorded: %s", kind, path, exc)
            self.unrecorded += 1
            record = _Record(Change(0, kind, subjects=subjects), path, names=tuple(pairs),
                             **undo)
            self._remove_stashed(record)
            self._forget(record)
            return
        seq = self._next()
        dirs = tuple(dict.fromkeys(key for key, _ in pairs))
        self._uncommitted.update(dirs, subjects)
        self._log[seq] = _Record(Change(seq, kind, dirs=dirs, subjects=subjects), path,
                                 names=tuple(pairs), **undo)

    def created(self, parent: Node, name: bytes, st: os.stat_result) -> None:
        """A create, mknod, mkdir or symlink made `name`."""
        self._record_names("create", self._paths.of_entry(parent, name), [(parent, name)],
                           ((st.st_dev, st.st_ino),), is_dir=stat.S_ISDIR(st.st_mode))

    def linked(self, parent: Node, name: bytes, st: os.stat_result) -> None:
        self._record_names("link", self._paths.of_entry(parent, name), [(parent, name)],
                           ((st.st_dev, st.st_ino),))

    def remove(self, parent: Node, name: bytes, st: os.stat_result,
               remove: Callable[..., None]) -> None:
        """unlink or rmdir `name` (the inode of `st`) so that a cut can undo it."""
        fd = self._inodes.fd(parent)
        is_dir = stat.S_ISDIR(st.st_mode)
        rmdir = remove is os.rmdir
        if rmdir != is_dir:  # as the syscall would answer
            code = errno.ENOTDIR if rmdir else errno.EISDIR
            raise OSError(code, os.strerror(code))
        if is_dir and _has_entries(fd, name, self._as_daemon):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
        self._room(0)  # before the removal: a forced sync cannot fail it once made
        path = self._paths.of_entry(parent, name)
        key = (st.st_dev, st.st_ino)
        if not is_dir and st.st_nlink > 1:  # other names keep the inode: hold it
            held = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            try:
                remove(name, dir_fd=fd)
            except BaseException:
                os.close(held)
                raise
            self._record_names("remove", path, [(parent, name)], (key,), held=held)
            return
        kept = st.st_blocks * 512
        if not self._room(kept):  # larger than the bound by itself: durable at once
            remove(name, dir_fd=fd)
            self.unrecorded += 1
            return
        stashed = self._stash(fd, name, key)
        self.stash_bytes += kept
        self._record_names("remove", path, [(parent, name)], (key,), stashed=stashed,
                           is_dir=is_dir, stash_bytes=kept)

    def _stash(self, dir_fd: int, name: bytes, key: Key) -> bytes:
        stashed = str(self._seq + 1).encode() + b"-" + os.urandom(4).hex().encode()
        with self._as_daemon():
            os.rename(name, stashed, src_dir_fd=dir_fd, dst_dir_fd=self._stash_dir)
        self._stashed.add(key)
        return stashed

    def links(self, key: Key, nlink: int) -> int:
        """The link count to report for the inode `key` (`nlink` on the backing): 0 for a
        removed one the stash keeps, as after a real unlink. With its stash name counted,
        the kernel would let linkat(AT_EMPTY_PATH) of an open descriptor give it a name
        again, which no filesystem allows."""
        return 0 if key in self._stashed else nlink

    def before_link(self, node: Node, parent: Node, name: bytes) -> None:
        """Before a link of `node` as `name`: a removed inode has no name to link from
        (ENOENT, vfs_link's answer for an unlinked inode)."""
        if node.key in self._stashed:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        self.before_name(parent, name)

    def stash_replaced(self, parent: Node, name: bytes, moved: os.stat_result,
                       replaced: os.stat_result) -> tuple[bytes | None, int]:
        """Before a rename over `name`: keep the inode it replaces for a cut. (a name in
        the stash it was moved to, or -1; or None and an O_PATH descriptor of it)."""
        fd = self._inodes.fd(parent)
        if stat.S_ISDIR(replaced.st_mode):
            if not stat.S_ISDIR(moved.st_mode) or _has_entries(fd, name, self._as_daemon):
                return None, -1  # the rename fails (ENOTDIR, ENOTEMPTY) as it would
        elif stat.S_ISDIR(moved.st_mode):
            return None, -1  # EISDIR from the rename itself
        elif replaced.st_nlink > 1:
            return None, os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
        kept = replaced.st_blocks * 512
        if not self._room(kept):
            # Larger than the bound by itself (the forced sync made all before durable):
            # the rename is durable at once, as remove() does for such a file.
            self._rename_durable = True
            return None, -1
        self._replaced_bytes = kept  # for renamed()'s record
        self._replaced_key = (replaced.st_dev, replaced.st_ino)  # for unstash()
        return self._stash(fd, name, self._replaced_key), -1

    def unstash(self, parent: Node, name: bytes, kept: tuple[bytes | None, int]) -> None:
        """The rename failed after stash_replaced: put the replaced inode back."""
        stashed, held = kept
        self._replaced_bytes, self._rename_durable = 0, False
        if held >= 0:
            os.close(held)
        if stashed is not None:
            with self._as_daemon():
                os.rename(stashed, name, src_dir_fd=self._stash_dir,
                          dst_dir_fd=self._inodes.fd(parent))
            self._stashed.discard(self._replaced_key)

    def renamed(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
                subjects: tuple[Key, ...], kept: tuple[bytes | None, int],
                exchange: bool) -> None:
        self.durability_ops += 1
        path = (f"{self._paths.of_entry(new_parent, new_name)} -> "
                f"{self._paths.of_entry(old_parent, old_name)}")
        if self._rename_durable:  # see stash_replaced: nothing to record
            self._rename_durable = False
            self.unrecorded += 1
            return
        kept_bytes, self._replaced_bytes = self._replaced_bytes, 0
        if kept[0] is not None:
            self.stash_bytes += kept_bytes
        self._record_names("rename", path, [(old_parent, old_name), (new_parent, new_name)],
                           subjects, stashed=kept[0], held=kept[1], exchange=exchange,
                           stash_bytes=kept_bytes if kept[0] is not None else 0)

    def synced_dir(self, node: Node) -> None:
        """fsyncdir of `node` succeeded: posix keeps the changes of its entries (and all
        they build on); ext4 commits."""
        self.durability_ops += 1
        self._dir_synced[node.key] = self._next()
        # ext4 forces a full commit for the fsync of anything but a regular file, clean
        # or not (ext4_fsync_journal; measured: docs/crash.md).
        self._committed = self._seq
        self._uncommitted.clear()
        durable = decide_posix_names(self._log, self._dir_synced)
        freed: list[Key] = []
        for seq in durable:
            record = self._log[seq]
            if record.stashed is not None:  # its last name is gone for good: the removed
                freed.append(record.change.subjects[-1])  # inode, or the one replaced
            self._make_durable(seq)
        for key in freed:  # nothing can bring their data back: let the inodes go
            entry = self._files.get(key)
            for seq in list(entry.seqs) if entry is not None else ():
                self._forget(self._log.pop(seq))

    def checkpoint(self) -> None:
        """Everything recorded becomes durable."""
        for seq in list(self._log):
            self._make_durable(seq)
        self._dir_synced.clear()
        self.commit()

    def _make_durable(self, seq: int) -> None:
        """The change `seq` is durable: a removal is made real (as the daemon: the stash is
        its own), and only then does the record leave the log (kept if that fails)."""
        self._remove_stashed(self._log[seq])
        self._forget(self._log.pop(seq))

    def _remove_stashed(self, record: _Record) -> None:
        """Remove for real the inode a durable removal stashed (as the daemon)."""
        if record.stashed is not None:
            with self._as_daemon(), contextlib.suppress(FileNotFoundError):  # gone already
                _remove_at(self._stash_dir, record.stashed)
            record.stashed = None
            self._stashed.discard(record.change.subjects[-1])

    def _forget(self, record: _Record) -> None:
        """A record leaves the log: its references go (a removal it stashed stays)."""
        change = record.change
        self.stash_bytes -= record.stash_bytes
        if change.is_data and change.file is not None:
            self.journal_bytes -= record.saved
            entry = self._files[change.file]
            _drop(entry.seqs, change.seq)
            if not entry.seqs:
                os.close(entry.fd)
                del self._files[change.file]
        for key, _ in record.names:
            ref = self._dirs[key]
            ref[1] -= 1
            if not ref[1]:
                os.close(ref[0])
                del self._dirs[key]
        if record.held >= 0:
            os.close(record.held)
        if not self._log:
            self.journal_bytes = self._journal_end = 0
            os.ftruncate(self._journal, 0)
            self._dir_synced.clear()

    # -- drop_unsynced (fault rules: a failed writeback) ----------------------------------

    def has_unsynced(self, node: Node) -> bool:
        """Does `node` have recorded writes not yet durable (what writeback would write)?"""
        return node.key in self._files

    def drop_unsynced(self, node: Node) -> int:
        """Revert `node`'s unsynced writes to its last sync, as ext4 does after a failed
        writeback; the bytes dropped. The kernel's page cache may still hold them, as it
        does on ext4 (the pages are clean). The ledger gives back what the revert freed."""
        entry = self._files.get(node.key)
        if entry is None:
            return 0
        return self._charging.reverted(node, lambda: self._undo_file(entry))

    def _undo_file(self, entry: _File) -> int:
        """Undo the records of `entry`'s file, newest first; the bytes they wrote."""
        dropped = 0
        for seq in list(reversed(entry.seqs)):
            record = self._log.pop(seq)
            dropped += record.change.length
            self._undo_data(record)
            self._forget(record)
        return dropped

    # -- the cut --------------------------------------------------------------------------

    def cut(self, model: str, torn: bool, keep_fraction: float,
            seed: int | None) -> CrashReport:
        """A power cut: revert what `model` does not keep (synchronously: atomic with
        respect to every request), kill every handle, recount."""
        seed = self._seeds.getrandbits(32) if seed is None else seed
        records = self._log
        decision = decide([c for r in records.values() for c in _changes(r)],
                          Syncs(self._dir_synced, self._committed), model, torn=torn,
                          keep_fraction=keep_fraction, rng=random.Random(seed))
        decision, kept_prefix, tear_at = _split_merged(records, decision)
        lost: list[LostItem] = []
        pending = _Pending()
        reverted: dict[Key, int] = {}
        kept_bytes: dict[Key, int] = {}
        tears: list[tuple[Key, int, bytes]] = []
        gone: set[Key] = set()
        sizes = {key: os.fstat(f.fd).st_size for key, f in self._files.items()}
        for seq in reversed(list(records)):
            record = records[seq]
            change = record.change
            if seq in decision.kept:
                if change.is_data and change.file is not None:
                    kept_bytes[change.file] = kept_bytes.get(change.file, 0) + change.length
                elif record.stashed is not None:  # its last name stays gone: so does it
                    gone.add(change.subjects[-1])
                continue
            if change.is_data:
                assert change.file is not None
                if seq in kept_prefix:
                    kept_bytes[change.file] = (kept_bytes.get(change.file, 0)
                                               + kept_prefix[seq])
                if seq in decision.torn:
                    at = tear_at.get(seq, change.offset)
                    data = os.pread(self._files[change.file].fd, decision.torn[seq], at)
                    tears.append((change.file, at, data))
                reverted[change.file] = reverted.get(change.file, 0) + change.length
                self._undo_data(record)
            else:
                item = self._undo_name(record, pending)
                if item is not None:
                    lost.append(item)
                if change.kind == "create":
                    gone.update(change.subjects)
        for file, offset, data in tears:
            os.pwrite(self._files[file].fd, data, offset)
        lost = self._data_items(sizes, reverted, kept_bytes, tears, gone) + lost
        self._clear_after_cut(records, decision.kept)
        self._reset_books(pending)
        self.crashes += 1
        report = CrashReport(model, torn, keep_fraction, seed, tuple(lost),
                             lost_bytes=sum(i.bytes for i in lost if i.kind == "data"),
                             lost_names=sum(1 for i in lost
                                            if i.kind in ("created", "removed", "renamed")),
                             crashes=self.crashes)
        # A second cut before the first one's settle() ran: one invalidation for both, and
        # the opens waiting on the first cut's Event are woken by it.
        if self._pending is not None:
            pending.inodes += self._pending.inodes
            pending.entries += self._pending.entries
        self._pending = pending
        if self._settled is None and _in_trio():
            self._settled = trio.Event()
        self._on_cut(report)
        return report

    def _data_items(self, sizes: dict[Key, int], reverted: dict[Key, int],
                    kept: dict[Key, int], tears: list[tuple[Key, int, bytes]],
                    gone: set[Key]) -> list[LostItem]:
        torn = {file: len(data) for file, _, data in tears}
        items: list[LostItem] = []
        for key, entry in self._files.items():
            if key in gone:
                continue
            if key in kept:
                items.append(LostItem(entry.path, "kept", kept[key]))
            if key in torn:
                items.append(LostItem(entry.path, "torn", torn[key]))
            if key in reverted:
                items.append(LostItem(entry.path, "data",
                                      max(0, reverted[key] - torn.get(key, 0))))
            size = os.fstat(entry.fd).st_size
            if size != sizes[key]:
                items.append(LostItem(entry.path, "size", abs(sizes[key] - size)))
        return items

    def _undo_data(self, record: _Record) -> None:
        change = record.change
        assert change.file is not None
        fd = self._files[change.file].fd
        if record.saved:
            _copy(self._journal, record.at, record.saved, fd, change.offset)
        os.ftruncate(fd, record.old_size)

    def _undo_name(self, record: _Record, pending: _Pending) -> LostItem | None:
        """Undo one namespace change; what was lost (None: nothing could be undone)."""
        change = record.change
        for key, name in record.names:
            known = self._inodes.by_key.get(key)
            if known is not None:
                pending.entries.append((known.inode, name))
        (dir_key, name), *rest = record.names
        fd = self._dir_fd(dir_key)
        try:
            with self._as_daemon():
                if change.kind in ("create", "link"):
                    if _names(fd, name, change.subjects[0]):
                        (_remove_entry if not record.is_dir else _remove_dir)(fd, name)
                    return LostItem(record.path, "created", 0)
                if change.kind == "remove":
                    self._restore(fd, name, record)
                    return LostItem(record.path, "removed", 0)
                new_key, new_name = rest[0]
                new_fd = self._dir_fd(new_key)
                if record.exchange:
                    syscalls.renameat2(new_fd, new_name, fd, name, _RENAME_EXCHANGE)
                else:
                    os.rename(new_name, name, src_dir_fd=new_fd, dst_dir_fd=fd)
                    self._restore(new_fd, new_name, record)
                return LostItem(record.path, "renamed", 0)
        except OSError as exc:  # a state no model allows would follow: say so, go on
            log.warning("crash: could not undo %s of %s: %s", change.kind, record.path, exc)
            return None

    def _restore(self, dir_fd: int, name: bytes, record: _Record) -> None:
        """Give back the inode a removal or a rename-over took from `name`."""
        if record.held >= 0:
            os.link(f"/proc/self/fd/{record.held}", name, dst_dir_fd=dir_fd,
                    follow_symlinks=True)
        elif record.stashed is not None:
            os.rename(record.stashed, name, src_dir_fd=self._stash_dir, dst_dir_fd=dir_fd)
            record.stashed = None
            self._stashed.discard(record.change.subjects[-1])

    def _clear_after_cut(self, records: dict[int, _Record], kept: frozenset[int]) -> None:
        for seq in list(records):
            self._forget(records.pop(seq))
        self._dir_synced.clear()
        self._committed = 0
        self._uncommitted.clear()  # all on disk now
        with self._as_daemon():
            _clear_stash(self._stash_dir)  # what is left: removals the model kept
        self._stashed.clear()

    def _reset_books(self, pending: _Pending) -> None:
        """Every handle dies; the nodes forget what they knew; the ledger is a fresh scan."""
        inodes = self._inodes
        inodes.kill_handles()
        for node in list(inodes.nodes.values()):
            pending.inodes.append(node.inode)
            node.reserved.clear()
            node.orphaned = False
            node.filled, node.scattered = None, None
            try:
                st = inodes.stat(node)
            except (OSError, pyfuse3.FUSEError):  # gone, its descriptor closed
                node.charged = None
                continue
            alive = st.st_nlink > 0 or node is inodes.root
            node.charged = None if alive else 0
            if node.kind == stat.S_IFREG:
                node.size = st.st_size
            if alive and node.key not in inodes.by_key:
                inodes.by_key[node.key] = node  # a removal undone: its inode is named again
            elif not alive:
                inodes.freed(node)
        inodes.renamed()
        self._charging.forget_kept()
        used, count = scan_backing(self._backing, self._costs)
        stashed, stashed_count = scan_backing(f"/proc/self/fd/{self._stash_dir}", self._costs)
        # the stash (its mark now) is the daemon's, unseen as at the mount's scan
        self._ledger.recount(used - stashed - self._costs.directory(),
                             count - stashed_count - 1)

    async def settle(self) -> None:
        """Drop from the kernel's caches what the last cut reverted: attributes, pages and
        names. Off the trio thread, while the loop answers what the kernel asks meanwhile
        (writeback of dirty mmap pages through dead handles: EIO)."""
        pending, self._pending = self._pending, None
        settled, self._settled = self._settled, None
        try:
            if pending is not None:
                await trio.to_thread.run_sync(self._kernel.invalidate, pending.inodes,
                                              pending.entries)
        finally:
            if settled is not None:
                settled.set()

    def settle_soon(self) -> None:
        """settle() in a task of its own: for a cut made inside a request (a fault
        rule's), whose own pages the kernel may hold locked until it is answered."""
        if self._pending is not None:
            trio.lowlevel.spawn_system_task(self.settle)

    async def wait_settled(self) -> None:
        """Opens wait for the last cut's invalidation: a new handle would otherwise carry
        the writeback of pre-cut dirty pages. (Not creates: the kernel holds the
        directory's lock over one, which invalidating an entry in it needs; and a new
        inode has no pre-cut pages.)"""
        settled = self._settled
        if settled is not None:
            await settled.wait()


_RENAME_EXCHANGE = 2  # linux/fs.h


def decide_posix_names(log_: dict[int, _Record], dir_synced: dict[Key, int]) -> list[int]:
    """The recorded namespace changes posix keeps now (durable for every model)."""
    from quotafs.model.durability import posix_kept

    return sorted(posix_kept([r.change for r in log_.values()], Syncs(dir_synced, 0)))


def _changes(record: _Record) -> list[Change]:
    """What the decisions see of a record: a merged one's appends one by one."""
    change, pieces = record.change, record.pieces
    if pieces is None:
        return [change]
    out, start = [], change.offset
    for i in range(0, len(pieces), 2):
        out.append(replace(change, seq=pieces[i], offset=start, length=pieces[i + 1] - start))
        start = pieces[i + 1]
    return out


def _split_merged(records: dict[int, _Record], decision: Decision
                  ) -> tuple[Decision, dict[int, int], dict[int, int]]:
    """A merged record whose appends a cut keeps in part (--keep-fraction: a prefix in
    issue order) becomes a record of the rest, whose undo truncates to the end of the
    kept ones; its seq is kept only if all are. Also: seq -> bytes kept that way, and
    seq -> the file offset its torn write (--torn: its last append) starts at."""
    kept, torn = set(decision.kept), dict(decision.torn)
    kept_prefix: dict[int, int] = {}
    tear_at: dict[int, int] = {}
    for seq, record in records.items():
        if record.pieces is None:
            continue
        pieces = _changes(record)
        n = next((i for i, c in enumerate(pieces) if c.seq not in kept), len(pieces))
        kept.difference_update(c.seq for c in pieces)
        if n == len(pieces):
            kept.add(seq)
            continue
        rest = pieces[n]
        if n:
            record.old_size = rest.offset
            kept_prefix[seq] = rest.offset - record.change.offset
        end = record.change.offset + record.change.length
        record.change = replace(record.change, offset=rest.offset, length=end - rest.offset)
        for piece in pieces[n:]:
            if piece.seq in torn:
                torn[seq] = torn.pop(piece.seq)
                tear_at[seq] = piece.offset
    return Decision(frozenset(kept), torn), kept_prefix, tear_at


def _drop(seqs: collections.deque[int], seq: int) -> None:
    """A file's record leaves: nearly always its oldest (a sync, a checkpoint) or its
    newest (a cancel, drop_unsynced): O(1) then."""
    if seqs[0] == seq:
        seqs.popleft()
    elif seqs[-1] == seq:
        seqs.pop()
    else:
        seqs.remove(seq)


def _journal_file(backing: str) -> int:
    """An unnamed file on the backing filesystem: O_TMPFILE, or one made and unlinked at
    once where the filesystem has no O_TMPFILE (before any request: nothing sees it)."""
    try:
        return os.open(backing, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        pass
    try:
        fd, path = tempfile.mkstemp(prefix=".quotafs-crash-journal-", dir=backing)
        os.unlink(path)
        return fd
    except OSError as exc:
        raise QuotafsError(f"--crash-sim: cannot make its journal in {backing}: "
                           f"{exc.strerror}", ExitCode.BACKING) from None


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _copy(src: int, src_off: int, size: int, dst: int, dst_off: int) -> None:
    done = 0
    while done < size:
        chunk = os.pread(src, min(_CHUNK, size - done), src_off + done)
        if not chunk:  # the source is shorter (a hole at its end reads as nothing)
            chunk = bytes(min(_CHUNK, size - done))
        os.pwrite(dst, chunk, dst_off + done)
        done += len(chunk)


def _names(dir_fd: int, name: bytes, key: Key) -> bool:
    """Does `name` in the directory still name the inode `key`?"""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == key


def _has_entries(dir_fd: int, name: bytes, as_daemon: Callable[[], Any]) -> bool:
    with as_daemon():
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return bool(os.listdir(fd))
    finally:
        os.close(fd)


def _remove_entry(dir_fd: int, name: bytes) -> None:
    os.unlink(name, dir_fd=dir_fd)


def _remove_dir(dir_fd: int, name: bytes) -> None:
    """A directory whose creation is undone: what is left in it was made after it (and
    kept by no model without it), so it goes too."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for entry in _entries(fd):
            if entry.is_dir(follow_symlinks=False):
                _remove_dir(fd, os.fsencode(entry.name))
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _entries(fd: int) -> Iterator[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        yield from list(it)


def _remove_at(dir_fd: int, name: bytes) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    (_remove_dir if stat.S_ISDIR(st.st_mode) else _remove_entry)(dir_fd, name)


# -- the stash: made once per mount, by the daemon, and marked as its own ----------------

def _make_stash(root: int) -> int:
    """The stash, made at the mount's root (0700, the daemon's, marked): a descriptor of it
    that every stash operation goes through, never its name. (clear_stash ran first.)"""
    try:
        os.mkdir(STASH, 0o700, dir_fd=root)
        fd = os.open(STASH, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    except OSError as exc:
        raise QuotafsError(f"--crash-sim: cannot make its stash {os.fsdecode(STASH)} in the "
                           f"backing directory: {exc.strerror}", ExitCode.BACKING) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():  # swapped between the mkdir and the open
            raise QuotafsError(f"--crash-sim: {os.fsdecode(STASH)} in the backing directory "
                               f"is not the daemon's", ExitCode.BACKING)
        os.fchmod(fd, 0o700)
        os.close(os.open(STASH_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600, dir_fd=fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_marked(fd: int) -> bool:
    """Is the directory `fd` a stash quotafs made: the daemon's, 0700, with its mark?"""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
        return False
    try:
        mark = os.stat(STASH_MARK, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(mark.st_mode) and mark.st_uid == os.geteuid()


def _clear_stash(fd: int) -> None:
    """Everything in the stash `fd` goes but its mark."""
    for entry in _entries(fd):
        name = os.fsencode(entry.name)
        if name != STASH_MARK:
            _remove_at(fd, name)


def _drop_stash(root: int, fd: int) -> None:
    """The stash `fd` is emptied and leaves the root, if the name there is still it."""
    here = os.stat(STASH, dir_fd=root, follow_symlinks=False)
    st = os.fstat(fd)
    if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        return
    _clear_stash(fd)
    os.unlink(STASH_MARK, dir_fd=fd)
    os.rmdir(STASH, dir_fd=root)
