"""A Hypothesis state machine over the in-process QuotaFS: any sequence of requests a
program could make (names that do and do not exist, files and directories mixed up, open
files unlinked or renamed over, limits lowered below usage, the kernel forgetting inodes,
remounts; with --crash-sim, directory fsyncs and power cuts of both models), in both
accountings, with after EVERY step:

- the ledger's used bytes and inodes equal a fresh scan of the backing directory
  (scan_backing, the mount scan itself and the scan `assert_healthy` compares a live
  mount's ledger with), plus the blocks of unlinked files that are still open;
- used never grows past the limit (a limit lowered below usage, or removals a cut
  undid, only stop growth);
- statfs says what the ledger says; no request is answered EIO (an unexpected error).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import pyfuse3
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from quotafs.daemon.crashsim import STASH
from quotafs.model.costs import Costs, Mode
from tests.operations.driver import FsFactory, InProcessFS, OpenFile, run_now

T = TypeVar("T")

K = 1024
BLOCK = 4096
MAX_OPEN = 4

# Few names, so that requests keep meeting each other's results.
PATHS = st.sampled_from(["/a", "/b", "/c", "/d", "/d/a", "/d/b", "/d/e", "/d/e/a", "/f"])
OFFSETS = st.one_of(st.integers(0, 3 * BLOCK),
                    st.sampled_from([BLOCK - 1, 64 * K - 1, 300 * K, 1024 * K - 1, 3000 * K]))
SIZES = st.one_of(st.integers(0, 2 * BLOCK + 1), st.sampled_from([64 * K, 200 * K]))
TRUNCATE_TO = st.one_of(st.integers(0, 3 * BLOCK), st.sampled_from([100 * K, 1024 * K]))
LIMITS = st.sampled_from([32 * K, 128 * K, 512 * K, 2048 * K, None])
INODE_LIMITS = st.sampled_from([3, 6, 12, None])
OPEN_FLAGS = st.sampled_from([os.O_RDWR, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND])
RENAME_FLAGS = st.sampled_from([0, 0, 0, pyfuse3.RENAME_NOREPLACE, pyfuse3.RENAME_EXCHANGE])
HANDLE = st.integers(0, MAX_OPEN - 1)

SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
MIN_STEPS = 2000


class OperationsMachine(RuleBasedStateMachine):
    make_fs: ClassVar[FsFactory]  # set by the test: the make_fs fixture
    steps: ClassVar[int] = 0
    examples: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        self.fs: InProcessFS
        self.costs: Costs
        self.config: dict[str, Any] = {}
        self.handles: list[OpenFile] = []
        # Per open file, a descriptor of its backing inode of the test's own: the blocks
        # of a file unlinked while open are on no name the scan could find.
        self.probes: dict[int, int] = {}
        self.used_before = 0
        type(self).examples += 1

    # -- running requests ----------------------------------------------------------------------

    run = staticmethod(run_now)  # no request here waits: no delay rules

    def attempt(self, request: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """The request's result, or None if it failed as a program's request may."""
        type(self).steps += 1
        try:
            return self.run(request, *args)
        except OSError as exc:
            assert exc.errno != errno.EIO, f"{request}{args}: EIO, an unexpected error"
            return None

    def backing_path(self, path: str) -> str:
        return os.path.join(self.fs.backing, path.lstrip("/"))

    def opens_as_a_file(self, path: str) -> bool:
        """Whether an open, create or truncate of `path` reaches the daemon as one of a
        regular file (or of a name that is not there): the kernel follows a symlink
        itself, opens a fifo itself, refuses a directory itself."""
        try:
            return stat.S_ISREG(os.lstat(self.backing_path(path)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return True

    def keep(self, f: OpenFile) -> None:
        if len(self.handles) >= MAX_OPEN:
            self.run(self.fs.release, f)
            return
        self.probes[f.fh] = os.open(self.backing_path(f.path), os.O_RDONLY)
        self.handles.append(f)

    def handle(self, index: int) -> OpenFile:
        return self.handles[index % len(self.handles)]

    # -- the mount -----------------------------------------------------------------------------

    @initialize(accounting=st.sampled_from(["blocks", "apparent"]), limit=LIMITS,
                inodes=INODE_LIMITS, crash_sim=st.booleans())
    def mount(self, accounting: str, limit: int | None, inodes: int | None,
              crash_sim: bool) -> None:
        self.config = {"accounting": accounting, "inodes": inodes, "crash_sim": crash_sim}
        self.costs = Costs(Mode(accounting), BLOCK)
        self.fs = self.make_fs(limit, **self.config)

    def teardown(self) -> None:
        if hasattr(self, "fs"):
            self.release_all()
            self.run(self.fs.close)

    def release_all(self) -> None:
        for f in self.handles:
            self.attempt(self.fs.release, f)
            os.close(self.probes.pop(f.fh))
        self.handles.clear()

    @rule()
    def remount(self) -> None:
        """Unmount and mount again: the mount scan must find what the ledger held."""
        self.release_all()
        limit = self.run(self.fs.status)["limit"]
        self.run(self.fs.close)
        self.fs = self.make_fs(limit, backing=self.fs.backing, **self.config)

    @precondition(lambda self: self.config.get("crash_sim"))
    @rule(model=st.sampled_from(["posix", "ext4"]), torn=st.booleans(),
          keep=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 99))
    def crash(self, model: str, torn: bool, keep: float, seed: int) -> None:
        """A power cut: then every handle answers EIO until released."""
        type(self).steps += 1
        self.run(self.fs.control, "crash",
                 {"model": model, "torn": torn, "keep_fraction": keep, "seed": seed})
        for f in self.handles:
            try:
                self.run(self.fs.release, f)
            except OSError as exc:  # the flush of a dead handle
                assert exc.errno == errno.EIO
            os.close(self.probes.pop(f.fh))
        self.handles.clear()
        # Removals undone come back whatever the limit: like a lowered limit, usage may
        # then stand above it, and only growth from there is refused.
        self.used_before = max(self.used_before, self.run(self.fs.status)["used"])

    @precondition(lambda self: self.config.get("crash_sim"))
    @rule(path=st.sampled_from(["/", "/d", "/d/e"]))
    def fsyncdir(self, path: str) -> None:
        self.attempt(self.fs.fsyncdir, path)

    @rule()
    def forget_all(self) -> None:
        """The kernel forgets every inode, as under memory pressure."""
        type(self).steps += 1
        self.run(self.fs.forget_all)

    @rule(limit=LIMITS)
    def set_limit(self, limit: int | None) -> None:
        self.attempt(functools.partial(self.fs.set_limits, limit=limit))

    @rule(inodes=INODE_LIMITS)
    def set_inode_limit(self, inodes: int | None) -> None:
        self.attempt(functools.partial(self.fs.set_limits, inodes=inodes))

    # -- names ---------------------------------------------------------------------------------

    @rule(path=PATHS, keep_open=st.booleans())
    def create(self, path: str, keep_open: bool) -> None:
        if not self.opens_as_a_file(path):
            return
        f = self.attempt(self.fs.create, path)
        if f is not None:
            if keep_open:
                self.keep(f)
            else:
                self.run(self.fs.release, f)

    @rule(path=PATHS)
    def mkdir(self, path: str) -> None:
        self.attempt(self.fs.mkdir, path)

    @rule(path=PATHS, long=st.booleans())
    def symlink(self, path: str, long: bool) -> None:
        self.attempt(self.fs.symlink, "t" * (80 if long else 8), path)

    @rule(path=PATHS)
    def mknod(self, path: str) -> None:
        self.attempt(self.fs.mknod, path)

    @rule(existing=PATHS, new=PATHS)
    def link(self, existing: str, new: str) -> None:
        self.attempt(self.fs.link, existing, new)

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        self.attempt(self.fs.unlink, path)

    @rule(path=PATHS)
    def rmdir(self, path: str) -> None:
        self.attempt(self.fs.rmdir, path)

    @rule(old=PATHS, new=PATHS, flags=RENAME_FLAGS)
    def rename(self, old: str, new: str, flags: int) -> None:
        self.attempt(self.fs.rename, old, new, flags)

    @rule(path=st.sampled_from(["/", "/d", "/d/e"]))
    def listdir(self, path: str) -> None:
        self.attempt(self.fs.listdir, path)

    # -- files ---------------------------------------------------------------------------------

    @rule(path=PATHS, offset=OFFSETS, size=SIZES)
    def write_path(self, path: str, offset: int, size: int) -> None:
        if self.opens_as_a_file(path):
            self.attempt(self.fs.write_file, path, b"w" * size, offset)

    @rule(path=PATHS, flags=OPEN_FLAGS)
    def open(self, path: str, flags: int) -> None:
        if self.opens_as_a_file(path) and (f := self.attempt(self.fs.open, path, flags)):
            self.keep(f)

    @precondition(lambda self: self.handles)
    @rule(index=HANDLE, offset=OFFSETS, size=SIZES)
    def write_open(self, index: int, offset: int, size: int) -> None:
        self.attempt(self.fs.write, self.handle(index), offset, b"o" * size)

    @precondition(lambda self: self.handles)
    @rule(index=HANDLE, size=TRUNCATE_TO)
    def ftruncate(self, index: int, size: int) -> None:
        self.attempt(self.fs.truncate, self.handle(index), size)

    @rule(path=PATHS, size=TRUNCATE_TO)
    def truncate(self, path: str, size: int) -> None:
        if self.opens_as_a_file(path):
            self.attempt(self.fs.truncate, path, size)

    @precondition(lambda self: self.handles)
    @rule(index=HANDLE, datasync=st.booleans())
    def fsync(self, index: int, datasync: bool) -> None:
        self.attempt(self.fs.fsync, self.handle(index), datasync)

    @precondition(lambda self: self.handles)
    @rule(index=HANDLE, new=PATHS)
    def link_open(self, index: int, new: str) -> None:
        self.attempt(self.fs.link_open, self.handle(index), new)

    @precondition(lambda self: self.handles and self.config.get("crash_sim"))
    @rule(index=HANDLE)
    def drop_unsynced(self, index: int) -> None:
        """A --drop-unsynced rule's failed fsync: the file's unsynced writes reverted."""
        type(self).steps += 1
        node = self.fs.ops.inodes.handle(self.handle(index).fh).node
        self.fs.ops.crash.drop_unsynced(node)
        # An undone truncate brings old bytes back whatever the limit (docs/crash.md).
        self.used_before = max(self.used_before, self.run(self.fs.status)["used"])

    @precondition(lambda self: self.handles)
    @rule(index=HANDLE)
    def release(self, index: int) -> None:
        f = self.handles.pop(index % len(self.handles))
        self.attempt(self.fs.release, f)
        os.close(self.probes.pop(f.fh))

    # -- after every step ----------------------------------------------------------------------

    def held_by_open_unlinked_files(self) -> int:
        """What the blocks of files unlinked while open cost (each inode once)."""
        seen: dict[tuple[int, int], int] = {}
        stash = os.path.join(self.fs.backing, os.fsdecode(STASH))
        stashed = ({(e.stat(follow_symlinks=False).st_dev, e.inode())
                    for e in os.scandir(stash)}
                   if os.path.isdir(stash) else set())  # --crash-sim's unlinked inodes
        for fd in self.probes.values():
            st = os.fstat(fd)
            if st.st_nlink == 0 or (st.st_dev, st.st_ino) in stashed:
                seen[(st.st_dev, st.st_ino)] = self.costs.open_file(fd, st.st_size)
        return sum(seen.values())

    @invariant()
    def ledger_equals_a_fresh_scan(self) -> None:
        ledger, scan = self.run(self.fs.books, self.held_by_open_unlinked_files())
        assert ledger == scan, "the ledger no longer matches the backing directory"
        status = self.run(self.fs.status)
        limit, now = status["limit"], status["used"]
        assert limit is None or now <= limit or now <= self.used_before, \
            f"usage grew to {now}, past the limit {limit}"
        self.used_before = now
        statfs = self.run(self.fs.statfs)
        if limit is not None:
            assert (statfs.f_blocks, statfs.f_bfree) == (
                limit // BLOCK, max(0, limit - now) // BLOCK)
        if status["inode_limit"] is not None:
            assert statfs.f_ffree == max(0, status["inode_limit"] - status["inodes_used"])


def test_operations_state_machine(make_fs: FsFactory,
                                  terminal_summary: Callable[[str], None]) -> None:
    class Machine(OperationsMachine):
        pass

    Machine.make_fs = staticmethod(make_fs)  # type: ignore[assignment]
    start = time.monotonic()
    run_state_machine_as_test(Machine, settings=SETTINGS)
    seconds = time.monotonic() - start
    terminal_summary(f"in-process state machine: {Machine.steps} requests in "
                     f"{Machine.examples} runs, the books checked after each step "
                     f"({seconds:.1f} s)")
    assert Machine.steps >= MIN_STEPS, "too few steps to stand for thousands of operations"
