"""Crash differential machinery: short sequences of operations on a few names, run for real
in a directory (a loop-ext4's, a quotafs mount's), a record of what the standards say each
one makes durable (the Oracle), and the comparison of post-crash trees.

    ops = [Write("a", 0, 100, seed=1), Fsync("a"), Rename("a", "b"), FsyncDir("")]
    oracle = Oracle()
    for op in ops:
        oracle.apply(op, run_op(root, op))      # the errno (or None) it got for real
    ... cut power ...
    after = read_tree(root)
    oracle.guaranteed()                          # what fsync(2)/rename(2)/POSIX promise
    compare(kept=model_tree, real=after, oracle) # what the real cut lost that `kept` has

What the standards promise (docs/crash.md, "Against real ext4"): a file's data and size
as of its last fsync or fdatasync; a directory's entries as of its last fsync (fsync(2):
"Calling fsync() does not necessarily ensure that the entry in the directory containing
the file has also reached disk. For that an explicit fsync() on a file descriptor for
the directory is also needed."). Nothing else.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

# The operations that are the same in both harnesses are machinery's; Write (always
# O_CREAT) and Fsync (also fdatasync) are this harness's own, FsyncDir is only here.
from tests.differential.machinery import Link, Mkdir, Rename, Truncate, Unlink, pattern

FILES = ("a", "b", "d/a", "d/b")
DIRS = ("d",)
SECTOR = 512  # writeback and a torn write are sector-granular at the finest


# -- operations --------------------------------------------------------------------------

@dataclass(frozen=True)
class Write:
    """open(path, O_WRONLY|O_CREAT [|O_APPEND]), one write of pattern bytes, close:
    create+write, overwrite, or (offset None) append."""

    path: str
    offset: int | None
    length: int
    seed: int = 0

    def __str__(self) -> str:
        at = "append" if self.offset is None else self.offset
        return f"write({self.path!r}, at={at}, len={self.length})"


@dataclass(frozen=True)
class Fsync:
    path: str
    data_only: bool = False  # fdatasync

    def __str__(self) -> str:
        return f"{'fdatasync' if self.data_only else 'fsync'}({self.path!r})"


@dataclass(frozen=True)
class FsyncDir:
    path: str  # "" is the run's own directory

    def __str__(self) -> str:
        return f"fsync(dir {self.path or '.'!r})"


Op = Write | Truncate | Fsync | FsyncDir | Rename | Unlink | Mkdir | Link


def run_op(root: str, op: Op) -> str | None:
    """Run `op` in `root` for real; the errno name it failed with, or None."""
    def at(path: str) -> str:
        return os.path.join(root, path)

    try:
        match op:
            case Write(path, offset, length, seed):
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if offset is None else 0)
                fd = os.open(at(path), flags, 0o644)
                try:
                    start = os.fstat(fd).st_size if offset is None else offset
                    data = pattern(seed, start, length)
                    done = os.write(fd, data) if offset is None else os.pwrite(fd, data, start)
                    assert done == length, f"{op}: short write of {done}"
                finally:
                    os.close(fd)
            case Truncate(path, size):
                os.truncate(at(path), size)
            case Fsync(path, data_only):
                fd = os.open(at(path), os.O_RDONLY)
                try:
                    (os.fdatasync if data_only else os.fsync)(fd)
                finally:
                    os.close(fd)
            case FsyncDir(path):
                fd = os.open(at(path) if path else root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            case Rename(src, dst):
                os.rename(at(src), at(dst))
            case Unlink(path):
                os.unlink(at(path))
            case Mkdir(path):
                os.mkdir(at(path), 0o755)
            case Link(src, dst):
                os.link(at(src), at(dst))
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return None


# -- the trees ---------------------------------------------------------------------------

DIR = "dir"  # a tree's value for a directory
Tree = dict[str, "bytes | str"]  # path -> the file's bytes, or DIR


def read_tree(root: str) -> Tree:
    """Every name below `root` (relative paths) with its contents."""
    tree: Tree = {}
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        prefix = "" if rel == "." else rel + "/"
        for name in dirs:
            tree[prefix + name] = DIR
        for name in files:
            with open(os.path.join(top, name), "rb") as f:
                tree[prefix + name] = f.read()
    return tree


def describe(value: bytes | str | None) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str):
        return value
    return f"{len(value)} B"


# -- what the standards promise, and what each file ever held ----------------------------

@dataclass
class Inode:
    versions: list[bytes] = field(default_factory=lambda: [b""])  # every content it had
    synced: int | None = None  # index of the version its last fsync/fdatasync made durable

    @property
    def current(self) -> bytes:
        return self.versions[-1]

    def change(self, content: bytes) -> None:
        self.versions.append(content)

    def since_sync(self) -> list[bytes]:
        """The versions a crash may leave: from the last synced one on (all of them for a
        file never synced: ext4 may write any of them back before the cut)."""
        return self.versions[self.synced or 0:]


@dataclass
class Oracle:
    """The operations that succeeded, replayed on names and inodes: every version of every
    file and the entries of each directory as of its last fsync."""

    inodes: list[Inode] = field(default_factory=list)
    entries: dict[str, dict[str, int | None]] = field(default_factory=lambda: {"": {}})
    durable: dict[str, dict[str, int | None]] = field(default_factory=lambda: {"": {}})
    ever: dict[str, set[int]] = field(default_factory=dict)  # path -> inodes it named
    clock: int = 0  # operations that succeeded
    touched: dict[str, set[str]] = field(default_factory=dict)  # names changed since fsync
    dir_synced_at: dict[str, int] = field(default_factory=dict)
    # path -> (when, from which directory) of a rename across directories that bound it
    moved_from: dict[str, tuple[int, str]] = field(default_factory=dict)

    def apply(self, op: Op, failed: str | None) -> None:
        if failed is not None:
            return
        self.clock += 1
        match op:
            case Write(path, offset, length, seed):
                node = self._inode(path, create=True)
                old = node.current
                start = len(old) if offset is None else offset
                new = old.ljust(start, b"\0")[:start] + pattern(seed, start, length)
                node.change(new + old[start + length:])
            case Truncate(path, size):
                node = self._inode(path)
                node.change(node.current[:size].ljust(size, b"\0"))
            case Fsync(path):
                node = self._inode(path)
                node.synced = len(node.versions) - 1
            case FsyncDir(path):
                self.durable[path] = dict(self.entries[path])
                self.dir_synced_at[path] = self.clock
                self.touched.pop(path, None)
            case Rename(src, dst) if self._lookup(src) != self._lookup(dst):
                number = self._lookup(src)
                self._unbind(dst)
                self._unbind(src)
                self._bind(dst, number)
                if self._split(src)[0] != self._split(dst)[0]:
                    self.moved_from[dst] = (self.clock, self._split(src)[0])
            case Unlink(path):
                self._unbind(path)
            case Mkdir(path):
                self.entries[path] = {}
                self.durable[path] = {}
                self._bind(path, None)
            case Link(src, dst):
                self._bind(dst, self._lookup(src))

    def _split(self, path: str) -> tuple[str, str]:
        parent, _, name = path.rpartition("/")
        return parent, name

    def _lookup(self, path: str) -> int | None:
        parent, name = self._split(path)
        return self.entries[parent].get(name)

    def _inode(self, path: str, create: bool = False) -> Inode:
        parent, name = self._split(path)
        if name not in self.entries[parent] and create:
            self.inodes.append(Inode())
            self._bind(path, len(self.inodes) - 1)
        number = self.entries[parent][name]
        assert number is not None, f"{path} is a directory"
        return self.inodes[number]

    def _bind(self, path: str, number: int | None) -> None:
        parent, name = self._split(path)
        self.entries[parent][name] = number
        self.touched.setdefault(parent, set()).add(name)
        self.moved_from.pop(path, None)
        if number is not None:
            self.ever.setdefault(path, set()).add(number)

    def _unbind(self, path: str) -> None:
        parent, name = self._split(path)
        self.entries[parent].pop(name, None)
        self.touched.setdefault(parent, set()).add(name)

    def guaranteed(self) -> dict[str, Inode | str | None]:
        """What no crash may lose: the names of each directory's last fsynced entries that
        still name the same thing (a change since may or may not have reached the disk),
        below a directory whose own name is durable so; for a file synced at least once,
        its inode (contents: its last synced version or a later one), else None (any).
        A rename across directories counts as durable once both were fsynced after it:
        one operation, made durable as a whole (what the posix model keeps; fsync(2)
        speaks only of "the entry in the directory", so this reading is the stricter)."""
        out: dict[str, Inode | str | None] = {}

        def walk(directory: str) -> None:
            for name, number in self.durable[directory].items():
                path = f"{directory}/{name}" if directory else name
                if not self.stable(path):
                    continue
                when, source = self.moved_from.get(path, (0, directory))
                if self.dir_synced_at.get(source, 0) <= when:
                    continue
                if number is None:
                    out[path] = DIR
                    walk(path)
                else:
                    node = self.inodes[number]
                    out[path] = None if node.synced is None else node
        walk("")
        return out

    def stable(self, path: str) -> bool:
        """`path` names what its directory's last fsync made durable, untouched since
        (not even unbound and bound again)."""
        parent, name = self._split(path)
        return (name in self.durable.get(parent, {}) and name in self.entries[parent]
                and name not in self.touched.get(parent, set())
                and self.entries[parent][name] == self.durable[parent][name])

    def later_versions(self, path: str) -> list[bytes]:
        """Every version since its last sync of every file that was ever at `path`: what
        writeback (or auto_da_alloc) may have made durable without being asked."""
        return [v for n in sorted(self.ever.get(path, ())) for v in
                self.inodes[n].since_sync()]


def mixes(content: bytes, versions: Iterable[bytes]) -> bool:
    """True when `content` is one of `versions`' sizes and each of its sectors is the same
    sector of one of them (zeros past a version's end): a writeback of some pages of later
    versions and not others."""
    candidates = list(versions)
    if not any(len(v) == len(content) for v in candidates):
        return False
    for start in range(0, len(content), SECTOR):
        sector = content[start:start + SECTOR]
        if not any(v[start:start + len(sector)].ljust(len(sector), b"\0") == sector
                   for v in candidates):
            return False
    return True


@dataclass
class Comparison:
    """What a post-crash tree `kept` (a model's) has that the real one lost (`missing`,
    the failures), and what the real one kept beyond it (counted, allowed)."""

    missing: list[str] = field(default_factory=list)
    matched: int = 0
    more_data: int = 0  # real ext4 kept later writes of a file (writeback, auto_da_alloc)
    more_names: int = 0  # real ext4 kept a name the model dropped (a journal commit)
    restored: int = 0  # a name gone before the cut that the model brought back (posix)


def compare(kept: Tree, real: Tree, oracle: Oracle, restores: bool = False) -> Comparison:
    """Everything `kept` keeps must be in `real`: each name, of the same kind, and each
    file with the same contents — or with later contents of it (allowed, counted).
    `restores`: a name the model kept or brought back though it changed since its
    directory's fsync (an unlink, rename or link the model undid) may differ in `real`,
    whose journal may have committed the change (the posix model undoes more than ext4
    does); counted."""
    out = Comparison()
    for path, value in sorted(kept.items()):
        got = real.get(path)
        if restores and not oracle.stable(path) and got != value:
            out.restored += 1
        elif got == value:
            out.matched += 1
        elif (isinstance(value, bytes) and isinstance(got, bytes)
              and mixes(got, [value, *oracle.later_versions(path)])):
            out.more_data += 1
        else:
            out.missing.append(f"{path}: kept {describe(value)}, real ext4 has "
                               f"{describe(got)}")
    out.more_names = len(set(real) - set(kept))
    return out


def check_guaranteed(tree: Tree, oracle: Oracle, who: str) -> list[str]:
    """What `tree` lost of what the standards promise (empty: nothing)."""
    problems = []
    for path, want in sorted(oracle.guaranteed().items()):
        got = tree.get(path)
        if want == DIR:
            ok = got == DIR
        elif want is None:
            ok = isinstance(got, bytes)
        else:
            assert isinstance(want, Inode)
            ok = isinstance(got, bytes) and mixes(got, want.since_sync())
        if not ok:
            expected = ("a directory" if want == DIR else "a file" if want is None
                        else f"{describe(want.versions[want.synced or 0])} or later")
            problems.append(f"{who} lost {path}: the standards keep {expected}, it has "
                            f"{describe(got)}")
    return problems
