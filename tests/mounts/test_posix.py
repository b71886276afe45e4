"""POSIX faithfulness of the passthrough, on real mounts, as a differential test.

Each check runs the same operation on the mount and on a plain directory of the backing
filesystem (the reference), and compares results and errnos, collecting every difference
before failing once. Operations as another user run in a forked child after
setgroups/setresgid/setresuid, which the mount lets in with allow_other. After every test
the daemon must still be alive, the mount must answer, and the quota ledger must equal a
fresh scan of the backing directory: nothing charged or credited twice.

Differences that cannot be removed are pinned by tests named `test_difference_*`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import pickle
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import pytest

from quotafs.client.api import QuotaMount, mounted
from quotafs.daemon.boundary import boundary
from quotafs.errors import errno_name
from quotafs.model.costs import Costs, Mode, scan_backing
from tests.conftest import fuse_unusable_reason, raw_control
from tests.differential.machinery import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or fuse_unusable_reason() is not None,
    reason="needs root and /dev/fuse (other uids, chown, allow_other)")

J = os.path.join
USER = 4242  # uid and gid of an unprivileged user
OTHER = 4343  # another one
GROUP = 5000  # a group USER is not in unless told
OLD_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09, as nanoseconds
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


# -- outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Err:
    """An operation failed with this errno (by name, so that differences read well)."""

    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class _Crash:
    text: str


def attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """fn's result, or Err(errno name) if it raised OSError."""
    try:
        return fn(*args)
    except OSError as exc:
        return Err(errno_name(exc.errno))


def as_user(uid: int, gid: int | None = None, groups: Sequence[int] = (),
            umask: int = 0o022) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated function in a forked child with these credentials and umask.

    The child sends attempt(fn, *args) back through a pipe, so OSErrors become Err values;
    anything else it raises fails the test.
    """
    gid = uid if gid is None else gid

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            r, w = os.pipe()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    os.close(r)
                    try:
                        os.setgroups(list(groups))
                        os.setresgid(gid, gid, gid)
                        os.setresuid(uid, uid, uid)
                        os.umask(umask)
                        data = pickle.dumps(attempt(fn, *args))
                    except BaseException as exc:
                        data = pickle.dumps(_Crash(repr(exc)))
                    with os.fdopen(w, "wb") as f:
                        f.write(data)
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            result = pickle.loads(data)
            if isinstance(result, _Crash):
                raise AssertionError(f"child as uid {uid} raised {result.text}")
            return result

        return run

    return wrap


def root(umask: int = 0o022) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return as_user(0, 0, (), umask)


def user(umask: int = 0o022, groups: Sequence[int] = ()) -> Callable[
        [Callable[..., Any]], Callable[..., Any]]:
    return as_user(USER, USER, groups, umask)


def other() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return as_user(OTHER, OTHER)


def meta(path: str, follow: bool = False) -> tuple[Any, ...]:
    """What must be equal on the mount and the backing filesystem (not inode, dev, times)."""
    st = os.stat(path, follow_symlinks=follow)
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    return (stat.filemode(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, size, st.st_rdev)


def create(path: str, mode: int = 0o644, data: bytes = b"",
           flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> None:
    fd = os.open(path, flags, mode)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


class _Dirent(ctypes.Structure):  # glibc's struct dirent on 64-bit Linux
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


def raw_listing(path: str) -> list[tuple[bytes, int, int]]:
    """readdir(3) as is, "." and ".." included: (name, d_type, d_ino) in directory order."""
    d = _libc.opendir(os.fsencode(path))
    if not d:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    out = []
    try:
        while True:
            ent = _libc.readdir(d)
            if not ent:
                break
            out.append((ent.contents.d_name, ent.contents.d_type, ent.contents.d_ino))
    finally:
        _libc.closedir(d)
    return out


# -- the mount and the reference --------------------------------------------------------


COSTS = Costs(Mode.BLOCKS, 4096)


def assert_healthy(m: QuotaMount) -> None:
    """The daemon lives, the mount answers, and the ledger equals a scan of the backing."""
    assert m.is_alive(), "the daemon died"
    os.listdir(m.path)
    os.statvfs(m.path)
    used, inodes = scan_backing(m.backing, COSTS)
    usage = m.usage()
    assert (usage["used"], usage["inodes_used"], usage["reserved"]) == (used, inodes, 0), \
        "the ledger no longer matches the backing directory"


@dataclass
class World:
    mount: QuotaMount
    ref_root: str


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """One allow_other mount for the module, and a reference directory beside its backing.

    Both live below a directory every uid may traverse, so that other users reach them.
    """
    base = tempfile.mkdtemp(prefix="quotafs-posix-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        backing, ref = J(base, "backing"), J(base, "ref")
        for d in (backing, ref):
            os.mkdir(d)
            os.chmod(d, 0o755)
        with mounted(limit="1G", backing=backing, allow_other=True) as m:
            yield World(m, ref)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Pair:
    mnt: str  # a fresh directory on the mount
    ref: str  # and its twin on the backing filesystem, outside the mount
    mount: QuotaMount
    problems: list[str] = field(default_factory=list)

    @property
    def bases(self) -> tuple[str, str]:
        return self.mnt, self.ref

    def same(self, label: str, op: Callable[..., Any], *args: Any) -> Any:
        """Run op(base, *args) on the mount, then on the reference; record any difference."""
        got = attempt(op, self.mnt, *args)
        want = attempt(op, self.ref, *args)
        if got != want:
            self.problems.append(f"{label}: mount {got!r} != backing {want!r}")
        return got

    def each(self, op: Callable[..., Any], *args: Any) -> None:
        """Setup on both sides; must succeed."""
        for base in self.bases:
            op(base, *args)

    def check(self) -> None:
        assert not self.problems, "differences from the backing filesystem:\n" + \
            "\n".join(self.problems)


@pytest.fixture
def pair(world: World, request: pytest.FixtureRequest) -> Iterator[Pair]:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:120]
    p = Pair(J(world.mount.path, name), J(world.ref_root, name), world.mount)
    for base in p.bases:
        os.mkdir(base)
        os.chmod(base, 0o777)
    yield p
    assert_healthy(world.mount)
    for base in p.bases:
        shutil.rmtree(base)
    assert_healthy(world.mount)


# -- creation: mode, umask, owner -------------------------------------------------------


def _make_all(base: str, tag: str, mode: int) -> list[Any]:
    create(J(base, "f" + tag), mode)
    os.mkdir(J(base, "d" + tag), mode)
    os.mkfifo(J(base, "p" + tag), mode)
    os.mknod(J(base, "n" + tag), mode | stat.S_IFREG)
    os.symlink("target", J(base, "s" + tag))
    return [meta(J(base, kind + tag)) for kind in "fdpns"]


def test_create_honours_mode_umask_and_caller(pair: Pair) -> None:
    for tag, runner, mode in [
        ("r022", root(0o022), 0o777), ("r077", root(0o077), 0o777),
        ("r000", root(0o000), 0o7777), ("u002", user(0o002), 0o777),
        ("u027", user(0o027, groups=[GROUP]), 0o6777), ("u000", user(0o000), 0o7777),
    ]:
        pair.same(f"create as {tag} mode {mode:o}", runner(_make_all), tag, mode)

    def mode0_rdwr(base: str) -> Any:
        fd = os.open(J(base, "zero"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0)
        try:  # the creator gets its descriptor whatever the new mode says
            return os.write(fd, b"abc"), os.pread(fd, 3, 0), meta(J(base, "zero"))
        finally:
            os.close(fd)

    pair.same("create mode 0 O_RDWR as user", user()(mode0_rdwr))
    pair.same("reopen mode 0 as user", user()(lambda b: os.open(J(b, "zero"), os.O_RDONLY)))
    pair.check()


def test_setuid_setgid_on_create_chmod_write_chown(pair: Pair) -> None:
    for mode in (0o6755, 0o4755, 0o2755, 0o1755, 0o7777, 0o2745):
        pair.same(f"root create {mode:o}",
                  root(0o000)(lambda b, m: (create(J(b, f"c{m:o}"), m), meta(J(b, f"c{m:o}")))),
                  mode)
    pair.each(lambda b: create(J(b, "f"), 0o644))
    for mode in (0o4755, 0o2755, 0o1777, 0o7777, 0o2705, 0o644):
        pair.same(f"root chmod {mode:o}",
                  lambda b, m: (os.chmod(J(b, "f"), m), meta(J(b, "f"))), mode)

    # A user's own file: set-gid kept for the user's group, dropped for another group.
    pair.same("user create", user()(lambda b: create(J(b, "mine"), 0o644)))
    chmod_sgid = user()(lambda b: (os.chmod(J(b, "mine"), 0o2755), meta(J(b, "mine"))))
    pair.same("user chmod g+s own group", chmod_sgid)
    pair.same("root chgrp", lambda b: os.chown(J(b, "mine"), -1, GROUP))
    pair.same("user chmod g+s foreign group", chmod_sgid)
    pair.same("user in group chmod g+s",
              user(groups=[GROUP])(lambda b: (os.chmod(J(b, "mine"), 0o2755),
                                              meta(J(b, "mine")))))
    pair.same("user chmod u+s", user()(lambda b: (os.chmod(J(b, "mine"), 0o4700),
                                                  meta(J(b, "mine")))))

    # Writes and truncates by someone else kill set-uid/set-gid; root's writes do not.
    for name, how in (("w", "write"), ("t", "truncate"), ("rw", "root-write")):
        pair.each(lambda b, n: (create(J(b, n), 0o6777), os.chmod(J(b, n), 0o6777)), name)

        def change(b: str, n: str = name, h: str = how) -> Any:
            if h == "truncate":
                os.truncate(J(b, n), 10)
            else:
                fd = os.open(J(b, n), os.O_WRONLY)
                os.write(fd, b"x")
                os.close(fd)
            return meta(J(b, n))

        pair.same(how, change if how == "root-write" else other()(change))

    # chown of a regular file clears set-uid/set-gid, even by root; not on a directory.
    pair.each(lambda b: (create(J(b, "o"), 0o6755), os.chmod(J(b, "o"), 0o6755)))
    pair.same("root chown suid file",
              lambda b: (os.chown(J(b, "o"), USER, USER), meta(J(b, "o"))))
    pair.each(lambda b: (os.mkdir(J(b, "od")), os.chmod(J(b, "od"), 0o3755)))
    pair.same("root chown sgid dir",
              lambda b: (os.chown(J(b, "od"), USER, GROUP), meta(J(b, "od"))))
    pair.check()


def test_setgid_directory_inheritance(pair: Pair) -> None:
    def setup(b: str) -> None:
        os.mkdir(J(b, "g"))
        os.chown(J(b, "g"), 0, GROUP)
        os.chmod(J(b, "g"), 0o2777)

    pair.each(setup)

    def make(b: str, tag: str) -> list[Any]:
        g = J(b, "g")
        create(J(g, "f" + tag), 0o2755)
        os.mkdir(J(g, "d" + tag), 0o755)
        os.symlink("x", J(g, "s" + tag))
        os.mkfifo(J(g, "p" + tag), 0o640)
        create(J(g, "d" + tag, "nested"), 0o644)
        os.mkdir(J(g, "d" + tag, "nested-dir"), 0o700)
        names = ["f", "d", "s", "p"]
        return [meta(J(g, n + tag)) for n in names] + [
            meta(J(g, "d" + tag, "nested")), meta(J(g, "d" + tag, "nested-dir"))]

    pair.same("user outside the group", user()(make), "u")
    pair.same("user in the group", user(groups=[GROUP])(make), "ug")
    pair.same("root", root()(make), "r")
    pair.check()


# -- permissions as other users ---------------------------------------------------------


def test_permission_errors_as_other_users(pair: Pair) -> None:
    def setup(b: str) -> None:
        create(J(b, "secret"), 0o600, b"s")
        create(J(b, "pub"), 0o644, b"p")
        create(J(b, "exec"), 0o711, b"#!/bin/sh\n")
        os.mkdir(J(b, "ro"), 0o755)
        create(J(b, "ro", "in"), 0o666)
        os.mkdir(J(b, "closed"), 0o700)
        create(J(b, "closed", "in"), 0o666)
        os.mkdir(J(b, "sticky"))
        os.chmod(J(b, "sticky"), 0o1777)
        os.mkdir(J(b, "wx"), 0o733)  # writable but not listable by others

    pair.each(setup)
    pair.same("user files in sticky dir", user()(lambda b: (
        create(J(b, "sticky", "u"), 0o666), os.mkdir(J(b, "sticky", "ud"), 0o777))))
    ops: list[tuple[str, Callable[..., Any]]] = [
        ("read secret", lambda b: os.open(J(b, "secret"), os.O_RDONLY)),
        ("write pub", lambda b: os.open(J(b, "pub"), os.O_WRONLY)),
        ("read pub", lambda b: read(J(b, "pub"))),
        ("exec-only read", lambda b: os.open(J(b, "exec"), os.O_RDONLY)),
        ("create in ro", lambda b: create(J(b, "ro", "new"))),
        ("mkdir in ro", lambda b: os.mkdir(J(b, "ro", "new"))),
        ("unlink in ro", lambda b: os.unlink(J(b, "ro", "in"))),
        ("rename in ro", lambda b: os.rename(J(b, "ro", "in"), J(b, "ro", "x"))),
        ("rename out of ro", lambda b: os.rename(J(b, "ro", "in"), J(b, "sticky", "x"))),
        ("symlink in ro", lambda b: os.symlink("t", J(b, "ro", "l"))),
        ("link into ro", lambda b: os.link(J(b, "pub"), J(b, "ro", "l"))),
        ("stat in closed", lambda b: meta(J(b, "closed", "in"))),
        ("list closed", lambda b: os.listdir(J(b, "closed"))),
        ("list wx", lambda b: os.listdir(J(b, "wx"))),
        ("create in wx", lambda b: (create(J(b, "wx", "o"), 0o600), meta(J(b, "wx", "o")))),
        ("chmod pub", lambda b: os.chmod(J(b, "pub"), 0o666)),
        ("chown pub", lambda b: os.chown(J(b, "pub"), OTHER, -1)),
        ("chgrp pub", lambda b: os.chown(J(b, "pub"), -1, OTHER)),
        ("utime pub explicit", lambda b: os.utime(J(b, "pub"), ns=(OLD_NS, OLD_NS))),
        ("utime pub now", lambda b: os.utime(J(b, "pub"))),
        ("truncate pub", lambda b: os.truncate(J(b, "pub"), 0)),
        ("setxattr pub", lambda b: os.setxattr(J(b, "pub"), b"user.k", b"v")),
        ("getxattr secret", lambda b: os.getxattr(J(b, "secret"), b"user.k")),
        ("unlink sticky other", lambda b: os.unlink(J(b, "sticky", "u"))),
        ("rmdir sticky other", lambda b: os.rmdir(J(b, "sticky", "ud"))),
        ("rename sticky other", lambda b: os.rename(J(b, "sticky", "u"), J(b, "sticky", "v"))),
        ("rename onto sticky other", lambda b: (
            create(J(b, "sticky", "mine")), os.rename(J(b, "sticky", "mine"),
                                                      J(b, "sticky", "u")))),
        ("hardlink foreign file", lambda b: os.link(J(b, "secret"), J(b, "sticky", "h"))),
        ("access", lambda b: [os.access(J(b, n), m) for n in ("secret", "pub", "exec", "ro",
                                                                "closed", "wx")
                              for m in (os.R_OK, os.W_OK, os.X_OK, os.F_OK)]),
        ("chdir closed", lambda b: os.chdir(J(b, "closed"))),
        ("mknod fifo in ro", lambda b: os.mkfifo(J(b, "ro", "p"))),
    ]
    for label, op in ops:
        pair.same(label, other()(op))
    pair.same("owner unlinks in sticky", user()(lambda b: os.unlink(J(b, "sticky", "u"))))
    pair.check()


def test_access_as_root(pair: Pair) -> None:
    pair.each(lambda b: (create(J(b, "none"), 0o000), create(J(b, "x"), 0o100),
                         os.mkdir(J(b, "d"), 0o000)))
    for name in ("none", "x", "d"):
        for mode in (os.R_OK, os.W_OK, os.X_OK, os.F_OK):
            pair.same(f"access {name} {mode}", lambda b, n, m: os.access(J(b, n), m), name,
                      mode)
    pair.same("root opens mode 000", lambda b: os.close(os.open(J(b, "none"), os.O_RDWR)))
    pair.same("root lists mode 000 dir", lambda b: os.listdir(J(b, "d")))
    pair.check()


# -- errnos -----------------------------------------------------------------------------


def test_errnos_match_the_backing_filesystem(pair: Pair) -> None:
    def setup(b: str) -> None:
        create(J(b, "file"), 0o644, b"data")
        os.mkdir(J(b, "dir"))
        os.mkdir(J(b, "full"))
        create(J(b, "full", "x"))
        os.mkdir(J(b, "empty"))
        os.mkdir(J(b, "dir", "sub"))
        os.symlink("file", J(b, "link"))
        os.symlink("missing", J(b, "dangling"))
        os.symlink("loop2", J(b, "loop1"))
        os.symlink("loop1", J(b, "loop2"))

    pair.each(setup)
    long = "n" * 256
    ok = "n" * 255
    cases: list[tuple[str, Callable[..., Any]]] = [
        ("stat missing", lambda b: os.stat(J(b, "missing"))),
        ("open missing", lambda b: os.open(J(b, "missing"), os.O_RDONLY)),
        ("open in missing dir", lambda b: os.open(J(b, "nodir", "f"), os.O_CREAT | os.O_RDWR)),
        ("mkdir existing", lambda b: os.mkdir(J(b, "dir"))),
        ("mkdir over file", lambda b: os.mkdir(J(b, "file"))),
        ("excl create existing", lambda b: create(J(b, "file"))),
        ("excl create dangling", lambda b: create(J(b, "dangling"))),
        ("creat via dangling", lambda b: (create(J(b, "dangling"), 0o600,
                                                 flags=os.O_CREAT | os.O_WRONLY),
                                          meta(J(b, "missing")))),
        ("symlink existing", lambda b: os.symlink("x", J(b, "file"))),
        ("link existing", lambda b: os.link(J(b, "file"), J(b, "link"))),
        ("link missing", lambda b: os.link(J(b, "nothing"), J(b, "new"))),
        ("link dir", lambda b: os.link(J(b, "dir"), J(b, "dirlink"))),
        ("mknod existing", lambda b: os.mkfifo(J(b, "file"))),
        ("mknod dir type", lambda b: os.mknod(J(b, "nd"), stat.S_IFDIR | 0o755)),
        ("rmdir full", lambda b: os.rmdir(J(b, "full"))),
        ("rmdir file", lambda b: os.rmdir(J(b, "file"))),
        ("rmdir symlink to dir", lambda b: (os.symlink("dir", J(b, "dl")),
                                            os.rmdir(J(b, "dl")))),
        ("rmdir dot", lambda b: os.rmdir(J(b, "dir", "."))),
        ("rmdir dotdot", lambda b: os.rmdir(J(b, "dir", "sub", ".."))),
        ("rmdir missing", lambda b: os.rmdir(J(b, "missing"))),
        ("unlink dir", lambda b: os.unlink(J(b, "dir"))),
        ("unlink missing", lambda b: os.unlink(J(b, "missing"))),
        ("stat through file", lambda b: os.stat(J(b, "file", "x"))),
        ("create through file", lambda b: create(J(b, "file", "x"))),
        ("open file O_DIRECTORY", lambda b: os.open(J(b, "file"), os.O_RDONLY | os.O_DIRECTORY)),
        ("open dir O_WRONLY", lambda b: os.open(J(b, "dir"), os.O_WRONLY)),
        ("open dir O_RDWR", lambda b: os.open(J(b, "dir"), os.O_RDWR)),
        ("open dir O_CREAT", lambda b: os.open(J(b, "dir"), os.O_CREAT | os.O_RDONLY)),
        ("O_CREAT|O_DIRECTORY", lambda b: os.open(J(b, "cd"), os.O_CREAT | os.O_DIRECTORY)),
        ("O_NOFOLLOW symlink", lambda b: os.open(J(b, "link"), os.O_RDONLY | os.O_NOFOLLOW)),
        ("O_NOFOLLOW file", lambda b: os.close(os.open(J(b, "file"),
                                                       os.O_RDONLY | os.O_NOFOLLOW))),
        ("O_NOFOLLOW dir", lambda b: os.close(os.open(J(b, "dir"), os.O_RDONLY | os.O_NOFOLLOW
                                                      | os.O_DIRECTORY))),
        ("O_NOFOLLOW|O_CREAT new", lambda b: os.close(os.open(
            J(b, "nf"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))),
        ("symlink loop", lambda b: os.stat(J(b, "loop1"))),
        ("symlink loop create", lambda b: create(J(b, "loop1"), flags=os.O_CREAT | os.O_RDWR)),
        ("readlink file", lambda b: os.readlink(J(b, "file"))),
        ("readlink dir", lambda b: os.readlink(J(b, "dir"))),
        ("truncate dir", lambda b: os.truncate(J(b, "dir"), 0)),
        ("truncate negative", lambda b: os.truncate(J(b, "file"), -1)),
        ("truncate too big", lambda b: os.truncate(J(b, "file"), 2**63 - 1)),
        ("truncate symlink follows", lambda b: (os.truncate(J(b, "link"), 2),
                                                read(J(b, "file")))),
        ("truncate dangling", lambda b: os.truncate(J(b, "dangling"), 0)),
        ("write O_RDONLY fd", lambda b: _write_fd(J(b, "file"), os.O_RDONLY)),
        ("read O_WRONLY fd", lambda b: _read_fd(J(b, "file"), os.O_WRONLY)),
        ("rename missing", lambda b: os.rename(J(b, "missing"), J(b, "x"))),
        ("rename into own subdir", lambda b: os.rename(J(b, "dir"), J(b, "dir", "sub", "x"))),
        ("rename dir onto full", lambda b: os.rename(J(b, "empty"), J(b, "full"))),
        ("rename dir onto file", lambda b: os.rename(J(b, "dir"), J(b, "file"))),
        ("rename file onto dir", lambda b: os.rename(J(b, "file"), J(b, "empty"))),
        ("rename onto ancestor", lambda b: os.rename(J(b, "dir", "sub"), J(b, "dir"))),
        ("rename dot", lambda b: os.rename(J(b, "dir", "."), J(b, "x"))),
        ("rename through file", lambda b: os.rename(J(b, "file", "x"), J(b, "y"))),
        ("noreplace existing", lambda b: renameat2(J(b, "file"), J(b, "link"),
                                                   RENAME_NOREPLACE)),
        ("exchange missing", lambda b: renameat2(J(b, "file"), J(b, "nothing"),
                                                 RENAME_EXCHANGE)),
        ("both flags", lambda b: renameat2(J(b, "file"), J(b, "link"),
                                           RENAME_EXCHANGE | RENAME_NOREPLACE)),
        ("long name stat", lambda b: os.stat(J(b, long))),
        ("long name create", lambda b: create(J(b, long))),
        ("long name mkdir", lambda b: os.mkdir(J(b, long))),
        ("long name mkfifo", lambda b: os.mkfifo(J(b, long))),
        ("long name symlink", lambda b: os.symlink("x", J(b, long))),
        ("long name link", lambda b: os.link(J(b, "file"), J(b, long))),
        ("long name rename", lambda b: os.rename(J(b, "file"), J(b, long))),
        ("long name unlink", lambda b: os.unlink(J(b, long))),
        ("long name rmdir", lambda b: os.rmdir(J(b, long))),
        ("long symlink target", lambda b: os.symlink("t" * 4096, J(b, "lt"))),
        ("longest symlink target", lambda b: (os.symlink("t" * 4095, J(b, "lt2")),
                                              len(os.readlink(J(b, "lt2"))))),
        ("name of 255", lambda b: (create(J(b, ok)), meta(J(b, ok)))),
        ("component 256 midway", lambda b: os.stat(J(b, long, "x"))),
        ("path over PATH_MAX", lambda b: os.stat(J(b, *(["a" * 200] * 21)))),
        ("getxattr missing", lambda b: os.getxattr(J(b, "file"), b"user.none")),
        ("removexattr missing", lambda b: os.removexattr(J(b, "file"), b"user.none")),
        ("xattr on missing", lambda b: os.listxattr(J(b, "missing"))),
        ("xattr create twice", lambda b: (os.setxattr(J(b, "file"), b"user.a", b"1"),
                                          os.setxattr(J(b, "file"), b"user.a", b"2",
                                                      XATTR_CREATE))),
        ("xattr replace missing", lambda b: os.setxattr(J(b, "file"), b"user.b", b"1",
                                                        XATTR_REPLACE)),
        ("xattr unknown namespace", lambda b: os.setxattr(J(b, "file"), b"bogus.a", b"1")),
        ("xattr name too long", lambda b: os.setxattr(J(b, "file"), b"user." + b"n" * 251,
                                                      b"1")),
        ("xattr value small buffer", lambda b: _getxattr_size(J(b, "file"), b"user.a", 0)),
        ("user xattr on symlink", lambda b: os.setxattr(J(b, "link"), b"user.a", b"1",
                                                        follow_symlinks=False)),
        ("user xattr on fifo", lambda b: (os.mkfifo(J(b, "fifo")),
                                          os.setxattr(J(b, "fifo"), b"user.a", b"1"))),
    ]
    for label, op in cases:
        pair.same(label, op)
    pair.check()


def _write_fd(path: str, flags: int) -> int:
    fd = os.open(path, flags)
    try:
        return os.write(fd, b"x")
    finally:
        os.close(fd)


def _read_fd(path: str, flags: int) -> bytes:
    fd = os.open(path, flags)
    try:
        return os.read(fd, 10)
    finally:
        os.close(fd)


_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.getxattr.restype = ctypes.c_ssize_t


def _getxattr_size(path: str, name: bytes, size: int) -> int:
    """getxattr(2) with a buffer of `size`: the size query (0) and ERANGE."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(os.fsencode(path), name, buf if size else None, size)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(n)


# -- attributes -------------------------------------------------------------------------


def test_chmod_chown_lchown_and_fchown(pair: Pair) -> None:
    pair.each(lambda b: (create(J(b, "f"), 0o644, b"abc"), os.mkdir(J(b, "d")),
                         os.symlink("f", J(b, "s")), os.mkfifo(J(b, "p"))))
    for name in ("f", "d", "p"):
        for mode in (0o000, 0o777, 0o1750, 0o640):
            pair.same(f"chmod {name} {mode:o}",
                      lambda b, n, m: (os.chmod(J(b, n), m), meta(J(b, n))), name, mode)
    pair.same("chmod via symlink", lambda b: (os.chmod(J(b, "s"), 0o600), meta(J(b, "f")),
                                              meta(J(b, "s"))))
    pair.same("lchmod", lambda b: _lchmod(J(b, "s"), 0o600))
    for name in ("f", "d", "p"):
        pair.same(f"chown {name}",
                  lambda b, n: (os.chown(J(b, n), USER, GROUP), meta(J(b, n))), name)
        pair.same(f"chown {name} -1 -1", lambda b, n: (os.chown(J(b, n), -1, -1),
                                                       meta(J(b, n))), name)
        pair.same(f"chgrp {name}", lambda b, n: (os.chown(J(b, n), -1, OTHER), meta(J(b, n))),
                  name)
    pair.same("lchown symlink", lambda b: (os.lchown(J(b, "s"), OTHER, GROUP), meta(J(b, "s")),
                                           meta(J(b, "f"))))
    pair.same("chown follows symlink", lambda b: (os.chown(J(b, "s"), 0, 0), meta(J(b, "s")),
                                                  meta(J(b, "f"))))

    def fchown(b: str) -> Any:
        fd = os.open(J(b, "f"), os.O_RDONLY)
        try:
            os.fchown(fd, USER, USER)
            os.fchmod(fd, 0o4711)
            return meta(J(b, "f")), stat.filemode(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    pair.same("fchown and fchmod", fchown)
    # The owner may give the file to a group of theirs, and nothing else.
    pair.same("user chgrp to own group", user(groups=[GROUP])(
        lambda b: (os.chown(J(b, "f"), -1, GROUP), meta(J(b, "f")))))
    pair.same("user chgrp to foreign group", user()(lambda b: os.chown(J(b, "f"), -1, OTHER)))
    pair.same("user chown to other", user()(lambda b: os.chown(J(b, "f"), OTHER, -1)))
    pair.same("user chown -1 -1", user()(lambda b: (os.chown(J(b, "f"), -1, -1),
                                                   meta(J(b, "f")))))
    pair.check()


def _utimensat(path: str, atime: tuple[int, int] | None, mtime: tuple[int, int] | None,
               follow: bool = True) -> None:
    """utimensat(2) with raw timespecs; None is UTIME_OMIT, (0, UTIME_NOW) is now."""
    ts = (ctypes.c_long * 4)()
    for i, t in enumerate((atime, mtime)):
        ts[2 * i], ts[2 * i + 1] = t if t is not None else (0, UTIME_OMIT)
    if _libc.utimensat(-100, os.fsencode(path), ts, 0 if follow else 0x100) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def test_utimensat_explicit_now_and_omit(pair: Pair) -> None:
    pair.each(lambda b: (create(J(b, "f"), 0o644, b"x"), os.mkdir(J(b, "d")),
                         os.symlink("f", J(b, "s")), os.mkfifo(J(b, "p"))))

    def times(path: str) -> tuple[int, int]:
        st = os.stat(path, follow_symlinks=False)
        return st.st_atime_ns, st.st_mtime_ns

    for name in ("f", "d", "p"):
        pair.same(f"explicit {name}", lambda b, n: (
            _utimensat(J(b, n), (1000, 123456789), (2000, 987654321)), times(J(b, n))), name)
        pair.same(f"omit atime {name}", lambda b, n: (
            _utimensat(J(b, n), None, (3000, 1)), times(J(b, n))), name)
        pair.same(f"omit mtime {name}", lambda b, n: (
            _utimensat(J(b, n), (4000, 2), None), times(J(b, n))), name)
        pair.same(f"negative and far {name}", lambda b, n: (
            _utimensat(J(b, n), (-1, 5), (2**33, 999999999)), times(J(b, n))), name)
        pair.same(f"bad nsec {name}", lambda b, n: _utimensat(J(b, n), (1, 10**9), None), name)
    pair.same("lutimes symlink", lambda b: (
        _utimensat(J(b, "s"), (5000, 5), (6000, 6), follow=False), times(J(b, "s")),
        times(J(b, "f"))))
    pair.same("utimes follows symlink", lambda b: (  # (following it may update its atime)
        _utimensat(J(b, "s"), (7000, 7), (8000, 8)), times(J(b, "s"))[1], times(J(b, "f"))))

    # UTIME_NOW: both land between the clock readings around the call.
    for name, follow in (("f", True), ("d", True), ("s", False)):
        for where in pair.bases:
            path = J(where, name)
            _utimensat(path, (1, 0), (1, 0), follow)
            before = time.time_ns() - 20_000_000  # coarse filesystem clocks lag a tick
            _utimensat(path, (0, UTIME_NOW), None, follow)
            a1, m1 = times(path)
            _utimensat(path, None, (0, UTIME_NOW), follow)
            a2, m2 = times(path)
            after = time.time_ns() + 20_000_000
            assert before <= a1 <= after and m1 == 1_000_000_000, (where, name)
            assert a2 == a1 and before <= m2 <= after, (where, name)
    # Setting "now" needs write permission only; explicit times need ownership.
    pair.each(lambda b: os.chmod(J(b, "f"), 0o666))
    pair.same("other user now", other()(lambda b: _utimensat(J(b, "f"), (0, UTIME_NOW),
                                                             (0, UTIME_NOW))))
    pair.same("other user explicit", other()(lambda b: _utimensat(J(b, "f"), (1, 1), (1, 1))))
    pair.same("other user omit both", other()(lambda b: _utimensat(J(b, "f"), None, None)))
    pair.each(lambda b: os.chmod(J(b, "f"), 0o644))
    pair.same("other user now, read-only", other()(
        lambda b: _utimensat(J(b, "f"), (0, UTIME_NOW), (0, UTIME_NOW))))
    pair.check()


def test_timestamps_change_as_on_the_backing_filesystem(pair: Pair) -> None:
    """Which of mtime and ctime each operation changes, on the target and its directory."""
    ops: dict[str, Callable[[str], Any]] = {
        "write": lambda d: _write_fd(J(d, "t"), os.O_WRONLY),
        "trunc-open": lambda d: os.close(os.open(J(d, "t"), os.O_WRONLY | os.O_TRUNC)),
        "trunc-open-empty": lambda d: os.close(os.open(J(d, "e"), os.O_WRONLY | os.O_TRUNC)),
        "open-creat-existing": lambda d: os.close(os.open(J(d, "t"), os.O_WRONLY | os.O_CREAT)),
        "truncate-grow": lambda d: os.truncate(J(d, "t"), 10_000),
        "truncate-same": lambda d: os.truncate(J(d, "t"), 4),
        "ftruncate": lambda d: _ftruncate(J(d, "t"), 1),
        "chmod": lambda d: os.chmod(J(d, "t"), 0o600),
        "chown": lambda d: os.chown(J(d, "t"), USER, USER),
        "chown-same": lambda d: os.chown(J(d, "t"), 0, 0),
        "chown-none": lambda d: os.chown(J(d, "t"), -1, -1),
        "link": lambda d: os.link(J(d, "t"), J(d, "t2")),
        "unlink-one-of-two": lambda d: (os.link(J(d, "t"), J(d, "t2")),
                                        os.unlink(J(d, "t2"))),
        "rename-within": lambda d: os.rename(J(d, "t"), J(d, "t2")),
        "rename-over": lambda d: os.rename(J(d, "e"), J(d, "t")),
        "exchange": lambda d: renameat2(J(d, "e"), J(d, "t"), RENAME_EXCHANGE),
        "create": lambda d: create(J(d, "new")),
        "mkdir": lambda d: os.mkdir(J(d, "new")),
        "mkfifo": lambda d: os.mkfifo(J(d, "new")),
        "symlink": lambda d: os.symlink("t", J(d, "new")),
        "rmdir": lambda d: os.rmdir(J(d, "sub")),
        "setxattr": lambda d: os.setxattr(J(d, "t"), b"user.k", b"v"),
        "utime": lambda d: os.utime(J(d, "t"), ns=(OLD_NS, OLD_NS)),
        "read": lambda d: read(J(d, "t")),
        "listdir": lambda d: os.listdir(d),
        "fsync": lambda d: _fsync_path(J(d, "t")),
    }

    def prepare(base: str) -> None:
        for name in ops:
            d = J(base, name)
            os.mkdir(d)
            create(J(d, "t"), 0o644, b"data")
            create(J(d, "e"), 0o644)
            os.mkdir(J(d, "sub"))
            for path in (J(d, "t"), J(d, "e"), d):
                os.utime(path, ns=(OLD_NS, OLD_NS))

    def snapshot(base: str) -> dict[str, tuple[int, ...]]:
        out = {}
        for name in ops:
            d = J(base, name)
            for label, path in (("dir", d), ("t", J(d, "t")), ("t2", J(d, "t2"))):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(path)
                    out[f"{name}:{label}"] = (st.st_mtime_ns, st.st_ctime_ns)
        return out

    pair.each(prepare)
    before = {base: snapshot(base) for base in pair.bases}
    time.sleep(0.05)
    for base in pair.bases:
        for name, op in ops.items():
            op(J(base, name))
    changed = {}
    for base in pair.bases:
        after = snapshot(base)
        changed[base] = {key: ("m" if after[key][0] != before[base][key][0] else "") +
                              ("c" if after[key][1] != before[base][key][1] else "")
                         for key in before[base] if key in after}
    got, want = changed[pair.mnt], changed[pair.ref]
    for key in sorted(want):
        if got.get(key) != want[key]:
            pair.problems.append(f"{key}: mount changed {got.get(key)!r}, backing {want[key]!r}")
    pair.check()


_libc.fchmodat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_int]


def _lchmod(path: str, mode: int) -> None:
    if _libc.fchmodat(-100, os.fsencode(path), mode, 0x100) != 0:  # AT_SYMLINK_NOFOLLOW
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _ftruncate(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- data -------------------------------------------------------------------------------


def test_append_trunc_ftruncate_and_sync(pair: Pair) -> None:
    def append(b: str) -> Any:
        path = J(b, "a")
        create(path, 0o644, b"0123456789")
        other_fd = os.open(path, os.O_WRONLY)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"A")
            os.pwrite(other_fd, b"grown", 20)  # another handle extends the file
            os.write(fd, b"B")  # lands at the new end, not where the last one stopped
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"C")  # O_APPEND ignores the file offset
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            os.pwrite(fd, b"D", 0)  # Linux: pwrite on O_APPEND appends too
        finally:
            os.close(fd)
            os.close(other_fd)
        return read(path), pos

    pair.same("O_APPEND", append)

    def trunc(b: str) -> Any:
        path = J(b, "t")
        create(path, 0o640, b"x" * 10_000)
        os.close(os.open(path, os.O_RDONLY | os.O_TRUNC))  # Linux truncates even O_RDONLY
        size_ro = os.stat(path).st_size
        create(path, 0o640, b"y" * 10_000, flags=os.O_WRONLY)
        fd = os.open(path, os.O_RDWR | os.O_TRUNC)
        try:
            st = os.fstat(fd)
            os.write(fd, b"z")
            return size_ro, st.st_size, read(path), meta(path)
        finally:
            os.close(fd)

    pair.same("O_TRUNC", trunc)

    def ftruncate(b: str) -> Any:
        path = J(b, "ft")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"a" * 9000)
            os.ftruncate(fd, 5000)
            grown_hole = os.pread(fd, 10, 4995)
            os.ftruncate(fd, 20_000)
            tail = os.pread(fd, 20, 4990)
            os.write(fd, b"end")  # the offset stayed at 9000: a hole of zeros before
            return grown_hole, tail, os.fstat(fd).st_size, read(path)[8990:9010]
        finally:
            os.close(fd)

    pair.same("ftruncate", ftruncate)
    pair.same("ftruncate read-only fd", lambda b: _ftruncate_ro(J(b, "ft")))

    def syncs(b: str) -> Any:
        fd = os.open(J(b, "ft"), os.O_RDWR)
        dfd = os.open(b, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            os.fdatasync(fd)
            os.fsync(dfd)
            os.fdatasync(dfd)
            return True
        finally:
            os.close(fd)
            os.close(dfd)

    pair.same("fsync, fdatasync, fsync of a directory", syncs)
    pair.same("sync", lambda b: os.sync())

    def sparse(b: str) -> Any:
        path = J(b, "sp")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.pwrite(fd, b"far", 1 << 20)
            os.pwrite(fd, b"near", 10)
            return os.fstat(fd).st_size, os.pread(fd, 8, 8), os.pread(fd, 5, (1 << 20) - 1)
        finally:
            os.close(fd)

    pair.same("sparse writes", sparse)
    pair.check()


def _ftruncate_ro(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def test_unlink_while_open_and_fchmod_of_an_orphan(pair: Pair) -> None:
    usage = pair.mount.usage()["used"]

    def orphan(b: str) -> Any:
        path = J(b, "o")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"q" * 100_000)
            os.unlink(path)
            st = os.fstat(fd)
            os.write(fd, b"r" * 10)
            os.fchmod(fd, 0o4700)
            os.fchown(fd, USER, GROUP)
            os.utime(fd, ns=(OLD_NS, OLD_NS))
            os.ftruncate(fd, 50_000)
            os.fsync(fd)
            st2 = os.fstat(fd)
            return (os.path.exists(path), st.st_nlink, os.pread(fd, 3, 49_998),
                    stat.filemode(st2.st_mode), st2.st_uid, st2.st_gid, st2.st_size,
                    st2.st_nlink, st2.st_mtime_ns > OLD_NS)
        finally:
            os.close(fd)

    pair.same("orphan", orphan)
    assert pair.mount.usage()["used"] == usage

    def two_handles(b: str) -> Any:
        path = J(b, "two")
        create(path, 0o644, b"first")
        fd1 = os.open(path, os.O_RDONLY)
        fd2 = os.open(path, os.O_RDWR)
        os.unlink(path)
        create(path, 0o644, b"second")  # a new file under the old name
        try:
            os.pwrite(fd2, b"F", 0)
            return os.pread(fd1, 10, 0), read(path), os.fstat(fd1).st_nlink
        finally:
            os.close(fd1)
            os.close(fd2)

    pair.same("two handles on an orphan", two_handles)
    pair.check()


# -- links, inode numbers, lookups and forgets -------------------------------------------


def drop_caches() -> None:
    """Make the kernel forget every unused dentry and inode (it sends FUSE forgets)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def test_hard_links_nlink_and_inode_numbers(pair: Pair) -> None:
    def links(b: str) -> Any:
        a = J(b, "a")
        create(a, 0o644, b"x")
        counts = [os.stat(a).st_nlink]
        for i in range(3):
            os.link(a, J(b, f"l{i}"))
            counts.append(os.stat(a).st_nlink)
        os.unlink(J(b, "l0"))
        counts.append(os.stat(J(b, "l1")).st_nlink)
        os.rename(J(b, "l1"), J(b, "l2"))  # hard links onto each other: nothing happens
        counts.append(os.stat(J(b, "l2")).st_nlink)
        os.mkdir(J(b, "d"))
        os.mkdir(J(b, "d", "s1"))
        os.mkdir(J(b, "d", "s2"))
        dirs = [os.stat(J(b, "d")).st_nlink]
        os.rmdir(J(b, "d", "s1"))
        dirs.append(os.stat(J(b, "d")).st_nlink)
        os.rename(J(b, "d", "s2"), J(b, "s2"))
        dirs.append(os.stat(J(b, "d")).st_nlink)
        inos = {os.stat(J(b, n)).st_ino for n in ("a", "l1", "l2")}
        return counts, dirs, len(inos), sorted(os.listdir(b))

    pair.same("link counts", links)
    pair.same("link a symlink", lambda b: (os.symlink("a", J(b, "s")),
                                           os.link(J(b, "s"), J(b, "s2"), follow_symlinks=False),
                                           meta(J(b, "s2")), os.readlink(J(b, "s2"))))
    pair.same("link follows symlink", lambda b: (
        os.link(J(b, "s"), J(b, "s3"), follow_symlinks=True), meta(J(b, "s3"))))
    pair.check()

    m = pair.mount
    names = [f"f{i}" for i in range(100)]
    for n in names:
        create(J(pair.mnt, n))
    os.link(J(pair.mnt, "f0"), J(pair.mnt, "hard"))
    inos = {n: os.stat(J(pair.mnt, n)).st_ino for n in [*names, "hard"]}
    assert inos["hard"] == inos["f0"]
    assert len(set(inos.values())) == len(names)
    backing = {n: os.stat(J(m.backing, os.path.basename(pair.mnt), n)).st_ino for n in names}
    assert {n: inos[n] for n in names} == backing  # st_ino is the backing inode's
    # Held open while counted, so that nobody else's cache drop can forget them first;
    # after our drop, the count must have lost at least these 100.
    held = [os.open(J(pair.mnt, n), os.O_RDONLY) for n in names]
    try:
        known = m.status()["known_inodes"]
        assert known > len(names), known
    finally:
        for fd in held:
            os.close(fd)
    drop_caches()
    assert wait_until(lambda: m.status()["known_inodes"] <= known - len(names)), (
        known, m.status()["known_inodes"])  # forgets were processed
    # Looked up afresh after the kernel forgot them: the same numbers.
    assert {n: os.stat(J(pair.mnt, n)).st_ino for n in [*names, "hard"]} == inos
    assert os.stat(J(pair.mnt, "hard")).st_ino == os.stat(J(pair.mnt, "f0")).st_ino


def test_open_files_outlive_forgets(pair: Pair) -> None:
    m = pair.mount
    path = J(pair.mnt, "kept")
    create(path, 0o644, b"abc")
    fd = os.open(path, os.O_RDWR)
    try:
        ino = os.fstat(fd).st_ino
        os.unlink(path)
        drop_caches()
        assert os.pread(fd, 3, 0) == b"abc"
        os.pwrite(fd, b"Z", 0)
        assert os.fstat(fd).st_ino == ino
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    baseline = m.status()["known_inodes"]  # another's cache drop can only lower it later
    for i in range(50):
        create(J(pair.mnt, f"n{i}"))
    held = [os.open(J(pair.mnt, f"n{i}"), os.O_RDONLY) for i in range(50)]
    try:  # held open: known whatever else drops the kernel's caches
        assert m.status()["known_inodes"] > 50
    finally:
        for fd in held:
            os.close(fd)
    for i in range(50):
        os.unlink(J(pair.mnt, f"n{i}"))
    drop_caches()
    assert wait_until(lambda: m.status()["known_inodes"] <= baseline), (
        baseline, m.status()["known_inodes"])
    assert wait_until(lambda: m.status()["open_handles"] == 0), m.status()["open_handles"]


# -- readdir ----------------------------------------------------------------------------


def test_readdir_lists_what_the_backing_directory_lists(pair: Pair) -> None:
    def listing(b: str) -> Any:
        os.mkdir(J(b, "d"))
        create(J(b, "d", "f"))
        os.symlink("f", J(b, "d", "s"))
        os.mkfifo(J(b, "d", "p"))
        os.mkdir(J(b, "d", "sub"))
        os.mknod(J(b, "d", "c"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(J(b, "d", "blk"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
        return sorted((name, dtype) for name, dtype, _ in raw_listing(J(b, "d")))

    pair.same("names and d_type, . and .. included", listing)
    pair.same("empty directory", lambda b: (os.mkdir(J(b, "e")),
                                            sorted(n for n, _, _ in raw_listing(J(b, "e")))))
    # d_ino agrees with st_ino, for entries and for "." and ".."
    for base in pair.bases:
        entries = {name: ino for name, _, ino in raw_listing(J(base, "d"))}
        assert entries[b"."] == os.stat(J(base, "d")).st_ino, base
        assert entries[b".."] == os.stat(base).st_ino, base
        assert entries[b"sub"] == os.stat(J(base, "d", "sub")).st_ino, base
    mount_root = {name: ino for name, _, ino in raw_listing(pair.mount.path)}
    assert mount_root[b"."] == mount_root[b".."] == os.stat(pair.mount.path).st_ino
    pair.check()


def test_readdir_of_1000_entries_and_removal_during_listing(pair: Pair) -> None:
    names = [f"entry-{i:04d}" for i in range(1000)]

    def fill(b: str) -> None:
        os.mkdir(J(b, "big"))
        for n in names:
            create(J(b, "big", n))

    pair.each(fill)
    pair.same("1000 entries", lambda b: sorted(os.listdir(J(b, "big"))) == names)
    pair.same("scandir types", lambda b: sorted(
        (e.name, e.is_file(follow_symlinks=False)) for e in os.scandir(J(b, "big"))))

    def remove_during(b: str) -> Any:
        seen: list[str] = []
        removed: set[str] = set()
        with os.scandir(J(b, "big")) as it:
            for i, entry in enumerate(it):
                seen.append(entry.name)
                if i == 100:  # remove 300 entries not seen yet, and 50 seen ones
                    rest = [n for n in names if n not in set(seen)]
                    for n in rest[::2][:300] + seen[:50]:
                        os.unlink(J(b, "big", n))
                        removed.add(n)
                    create(J(b, "big", "zz-new"))
        # Each entry that was there all along is listed exactly once; none is repeated.
        kept = [n for n in names if n not in removed]
        return (len(seen) == len(set(seen)), set(kept) <= set(seen),
                sorted(os.listdir(J(b, "big"))) == sorted([*kept, "zz-new"]))

    pair.same("removal during listing", remove_during)

    def seekdir(b: str) -> Any:
        # telldir/seekdir through a fresh listing on the same open directory
        fd = os.open(J(b, "big"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = sorted(os.listdir(fd))
            second = sorted(os.listdir(fd))  # rewinds the same descriptor
            return first == second, len(first)
        finally:
            os.close(fd)

    pair.same("listing twice through one descriptor", seekdir)
    pair.check()


# -- xattrs -----------------------------------------------------------------------------


def test_xattrs_on_files_and_directories(pair: Pair) -> None:
    pair.each(lambda b: (create(J(b, "f"), 0o644, b"data"), os.mkdir(J(b, "d"))))
    for name in ("f", "d"):
        def roundtrip(b: str, n: str) -> Any:
            p = J(b, n)
            empty = sorted(os.listxattr(p))
            os.setxattr(p, b"user.a", b"1")
            os.setxattr(p, b"user.b", b"")
            os.setxattr(p, b"user.big", b"v" * 3000)
            os.setxattr(p, b"user.bin", bytes(range(256)))
            os.setxattr(p, b"user.a", b"2", XATTR_REPLACE)
            os.setxattr(p, b"user.c", b"3", XATTR_CREATE)
            got = {k: os.getxattr(p, k) for k in sorted(os.listxattr(p))}
            sizes = (_getxattr_size(p, b"user.big", 0), attempt(_getxattr_size, p,
                                                                 b"user.big", 10))
            os.removexattr(p, b"user.b")
            return empty, got, sizes, sorted(os.listxattr(p))

        pair.same(f"set/get/list/remove on {name}", roundtrip, name)
        pair.same(f"trusted on {name}", lambda b, n: (
            os.setxattr(J(b, n), b"trusted.t", b"x"), os.getxattr(J(b, n), b"trusted.t"),
            os.removexattr(J(b, n), b"trusted.t")), name)
        pair.same(f"other user reads {name}", other()(
            lambda b, n: os.getxattr(J(b, n), b"user.a")), name)
        pair.same(f"other user writes {name}", other()(
            lambda b, n: os.setxattr(J(b, n), b"user.z", b"1")), name)
    pair.same("through a descriptor", lambda b: _fd_xattrs(J(b, "f")))
    pair.same("huge value", lambda b: os.setxattr(J(b, "f"), b"user.huge", b"h" * 65537))
    pair.same("value of 64 KiB", lambda b: (os.setxattr(J(b, "f"), b"user.max",
                                                        b"m" * 65536),
                                            len(os.getxattr(J(b, "f"), b"user.max"))))
    pair.check()


def _fd_xattrs(path: str) -> Any:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.setxattr(fd, b"user.fd", b"via fd")
        return os.getxattr(fd, b"user.fd"), b"user.fd" in [
            os.fsencode(n) for n in os.listxattr(fd)]
    finally:
        os.close(fd)


def test_symlink_xattrs(pair: Pair) -> None:
    pair.each(lambda b: (create(J(b, "f")), os.symlink("f", J(b, "s"))))
    pair.same("trusted xattr on a symlink", lambda b: (
        os.setxattr(J(b, "s"), b"trusted.t", b"1", follow_symlinks=False),
        os.getxattr(J(b, "s"), b"trusted.t", follow_symlinks=False),
        sorted(os.listxattr(J(b, "s"), follow_symlinks=False)),
        os.removexattr(J(b, "s"), b"trusted.t", follow_symlinks=False),
        sorted(os.listxattr(J(b, "s"), follow_symlinks=False))))
    pair.same("xattr through a symlink reaches the file", lambda b: (
        os.setxattr(J(b, "s"), b"user.u", b"1"), os.getxattr(J(b, "f"), b"user.u")))
    pair.check()


# -- special files ----------------------------------------------------------------------


def test_fifo_and_device_nodes(pair: Pair) -> None:
    def nodes(b: str) -> Any:
        os.mkfifo(J(b, "fifo"), 0o640)
        os.mknod(J(b, "p2"), stat.S_IFIFO | 0o600)
        os.mknod(J(b, "chr"), stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.mknod(J(b, "big"), stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))
        os.mknod(J(b, "blk"), stat.S_IFBLK | 0o640, os.makedev(7, 255))
        os.mknod(J(b, "sock"), stat.S_IFSOCK | 0o700)
        os.mknod(J(b, "reg"), stat.S_IFREG | 0o6755)
        os.mknod(J(b, "dflt"))
        return [meta(J(b, n)) for n in ("fifo", "p2", "chr", "big", "blk", "sock", "reg",
                                        "dflt")]

    pair.same("mknod", nodes)
    pair.same("mknod as user", user()(lambda b: os.mknod(J(b, "uchr"),
                                                         stat.S_IFCHR | 0o600, 0)))
    pair.same("mkfifo as user", user()(lambda b: (os.mkfifo(J(b, "ufifo"), 0o666),
                                                  meta(J(b, "ufifo")))))

    def through_fifo(b: str) -> Any:
        rfd = os.open(J(b, "fifo"), os.O_RDONLY | os.O_NONBLOCK)
        wfd = os.open(J(b, "fifo"), os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(wfd, b"through the pipe")
            return os.read(rfd, 100)
        finally:
            os.close(wfd)
            os.close(rfd)

    pair.same("data through a fifo", through_fifo)
    pair.same("write-only fifo with no reader", lambda b: os.open(
        J(b, "fifo"), os.O_WRONLY | os.O_NONBLOCK))
    pair.check()


def test_symlinks_and_readlink(pair: Pair) -> None:
    targets = ["t", "../up", "/abs/path", "with space", "a" * 59, "b" * 60, "c" * 4095, "x/"]
    for i, target in enumerate(targets):
        pair.same(f"symlink {target[:10]}", lambda b, n, t: (
            os.symlink(t, J(b, n)), os.readlink(J(b, n)), meta(J(b, n))), f"s{i}", target)
    pair.same("readlink through dir_fd", lambda b: _readlink_at(b, "s0"))
    pair.same("symlink as user", user()(lambda b: (os.symlink("t", J(b, "us")),
                                                   meta(J(b, "us")))))
    pair.same("follow a relative symlink", lambda b: (
        os.mkdir(J(b, "d")), create(J(b, "d", "target"), 0o600, b"T"),
        os.symlink("d/target", J(b, "rel")), read(J(b, "rel"))))
    pair.same("follow through a symlinked dir", lambda b: (
        os.symlink("d", J(b, "dl")), read(J(b, "dl", "target")), os.listdir(J(b, "dl"))))
    pair.same("O_CREAT through a dangling symlink", lambda b: (
        os.symlink("made", J(b, "dangling")),
        create(J(b, "dangling"), 0o600, b"m", flags=os.O_CREAT | os.O_WRONLY),
        read(J(b, "made"))))
    pair.check()


def _readlink_at(base: str, name: str) -> str:
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.readlink(name, dir_fd=fd)
    finally:
        os.close(fd)


# -- rename -----------------------------------------------------------------------------


def test_rename_flags_and_open_handles(pair: Pair) -> None:
    def setup(b: str) -> None:
        create(J(b, "a"), 0o644, b"A")
        create(J(b, "b"), 0o600, b"BB")
        os.mkdir(J(b, "d"))
        create(J(b, "d", "in"), 0o644, b"in")
        os.mkdir(J(b, "e"))

    pair.each(setup)

    def state(b: str) -> list[tuple[str, Any]]:
        return sorted((n, read(J(b, n)) if os.path.isfile(J(b, n)) else
                       sorted(os.listdir(J(b, n)))) for n in os.listdir(b))

    pair.same("noreplace onto existing", lambda b: renameat2(J(b, "a"), J(b, "b"),
                                                             RENAME_NOREPLACE))
    pair.same("noreplace to new", lambda b: (renameat2(J(b, "a"), J(b, "a2"),
                                                       RENAME_NOREPLACE), state(b)))
    pair.same("exchange files", lambda b: (renameat2(J(b, "a2"), J(b, "b"), RENAME_EXCHANGE),
                                           state(b), meta(J(b, "b"))))
    pair.same("exchange file and dir", lambda b: (renameat2(J(b, "b"), J(b, "d"),
                                                            RENAME_EXCHANGE), state(b)))
    pair.same("exchange across dirs", lambda b: (renameat2(J(b, "d", "in"), J(b, "a2"),
                                                           RENAME_EXCHANGE), state(b)))
    pair.same("exchange with itself", lambda b: renameat2(J(b, "a2"), J(b, "a2"),
                                                          RENAME_EXCHANGE))
    pair.same("plain rename over file", lambda b: (os.rename(J(b, "a2"), J(b, "d", "in")),
                                                   state(b)))
    pair.same("dir over empty dir", lambda b: (os.rename(J(b, "b"), J(b, "e")), state(b)))
    pair.same("rename to itself", lambda b: (os.rename(J(b, "d"), J(b, "d")), state(b)))
    pair.same("whiteout", lambda b: (renameat2(J(b, "d"), J(b, "w"), 4), meta(J(b, "d"))))
    pair.check()


def test_rename_accounting_and_open_handles(pair: Pair) -> None:
    m = pair.mount

    def used() -> int:
        return int(m.usage()["used"])

    start = used()
    create(J(pair.mnt, "big"), 0o644, b"b" * 100_000)  # 25 blocks
    create(J(pair.mnt, "small"), 0o644, b"s" * 5000)  # 2 blocks
    assert used() == start + 27 * 4096
    os.rename(J(pair.mnt, "small"), J(pair.mnt, "big"))  # frees big's 25 blocks, once
    assert used() == start + 2 * 4096
    # Replaced while open: the blocks stay charged until the last close.
    create(J(pair.mnt, "victim"), 0o644, b"v" * 40_000)  # 10 blocks
    fd = os.open(J(pair.mnt, "victim"), os.O_RDWR)
    try:
        os.rename(J(pair.mnt, "big"), J(pair.mnt, "victim"))
        assert used() == start + 12 * 4096
        os.pwrite(fd, b"still mine", 0)
        assert os.pread(fd, 10, 0) == b"still mine"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert used() == start + 2 * 4096
    # A hard-linked target loses a name, not its blocks.
    create(J(pair.mnt, "h"), 0o644, b"h" * 8192)
    os.link(J(pair.mnt, "h"), J(pair.mnt, "h2"))
    os.rename(J(pair.mnt, "victim"), J(pair.mnt, "h"))
    assert used() == start + 4 * 4096
    renameat2(J(pair.mnt, "h2"), J(pair.mnt, "h"), RENAME_EXCHANGE)
    assert used() == start + 4 * 4096
    assert_healthy(m)

    def open_then_rename(b: str) -> Any:
        create(J(b, "moving"), 0o644, b"12345")
        os.mkdir(J(b, "elsewhere"))
        fd = os.open(J(b, "moving"), os.O_RDWR | os.O_APPEND)
        try:
            os.rename(J(b, "moving"), J(b, "elsewhere", "moved"))
            os.write(fd, b"678")
            os.fchmod(fd, 0o600)
            os.fsync(fd)
            return (os.pread(fd, 8, 0), read(J(b, "elsewhere", "moved")),
                    meta(J(b, "elsewhere", "moved")), os.path.exists(J(b, "moving")))
        finally:
            os.close(fd)

    pair.same("rename of an open file", open_then_rename)

    def open_dir_then_rename(b: str) -> Any:
        os.mkdir(J(b, "od"))
        create(J(b, "od", "x"))
        dfd = os.open(J(b, "od"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(J(b, "od"), J(b, "od2"))
            create(J(b, "od2", "y"))
            return sorted(os.listdir(dfd)), os.stat("x", dir_fd=dfd).st_size
        finally:
            os.close(dfd)

    pair.same("rename of an open directory", open_dir_then_rename)
    pair.check()


# -- names and paths --------------------------------------------------------------------


def test_names_of_255_bytes_everywhere(pair: Pair) -> None:
    names = ["a" * 255, "é" * 127 + "x", "\u00ff" * 127 + "y", "-" + "z" * 254]
    assert all(len(os.fsencode(n)) == 255 for n in names)

    def use(b: str, n: str) -> Any:
        d = J(b, n)
        os.mkdir(d)
        create(J(d, n), 0o640, b"long")
        os.symlink(n, J(d, "s" + n[1:]))
        os.link(J(d, n), J(d, "h" + n[1:]))
        os.rename(J(d, "h" + n[1:]), J(d, "r" + n[1:]))
        os.setxattr(J(d, n), b"user." + b"k" * 250, b"v")
        return (sorted(os.listdir(d)), read(J(d, "s" + n[1:])), meta(J(d, "r" + n[1:])),
                os.listxattr(J(d, n)))

    for n in names:
        pair.same(f"255-byte name {n[:3]}", use, n)
    pair.check()


def _deep_chain(top_fd: int, depth: int, name: str) -> int:
    """mkdir a chain below top_fd with dir_fd calls; return an O_RDONLY fd of the bottom."""
    fd = os.dup(top_fd)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def test_deep_trees_below_a_deep_backing_directory(mount_factory: Any,
                                                   tmp_path: Any) -> None:
    """Backing dir ~3000 bytes deep; a tree below the mount deeper than PATH_MAX."""
    name = "n" * 250
    backing = str(tmp_path)
    while len(backing) < 2800:
        backing = J(backing, name)
    os.makedirs(backing)
    assert 2800 <= len(backing) < 3100
    ref_top = J(str(tmp_path), "ref")
    os.mkdir(ref_top)
    m = mount_factory("1G", backing=backing)
    depth = 20  # 20 * 251 bytes: more than 4096 below the mount, 8000+ from the disk's root
    problems: list[str] = []
    results: dict[str, Any] = {}
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for label, top in (("mount", m.path), ("ref", ref_top)):
            top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
            bottom = _deep_chain(top_fd, depth, name)
            try:
                out = []
                fd = os.open("file", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=bottom)
                os.write(fd, b"deep data")
                os.close(fd)
                out.append(os.stat("file", dir_fd=bottom).st_size)
                os.rename("file", "renamed", src_dir_fd=bottom, dst_dir_fd=bottom)
                os.symlink("renamed", "link", dir_fd=bottom)
                os.link("renamed", "hard", src_dir_fd=bottom, dst_dir_fd=bottom)
                out.append(os.readlink("link", dir_fd=bottom))
                out.append(sorted(os.listdir(bottom)))
                os.setxattr(f"/proc/self/fd/{bottom}", b"user.deep", b"1")
                out.append(os.getxattr(f"/proc/self/fd/{bottom}", b"user.deep"))
                os.chdir(bottom)
                with open("renamed", "rb") as f:  # relative path from a deep cwd
                    out.append(f.read())
                os.mkdir("below")
                os.chdir("below")
                with open("../link", "rb") as f:
                    out.append(f.read())
                out.append(attempt(lambda: os.getcwd().endswith(
                    "/" + "/".join([name] * depth + ["below"]))))
                rel = "/".join([".."] * (depth + 1))  # back up to the top: ~60 bytes
                out.append(sorted(os.listdir(rel)) == sorted(os.listdir(top_fd)))
                out.append(attempt(os.stat, J(top, *([name] * depth), "renamed")))
                os.fchdir(cwd)
                results[label] = out
            finally:
                os.fchdir(cwd)
                os.close(bottom)
                os.close(top_fd)
        if results["mount"] != results["ref"]:
            problems.append(f"mount {results['mount']!r} != backing {results['ref']!r}")
        assert not problems, problems
        assert m.is_alive()
        used, inodes = scan_backing(backing, COSTS)
        usage = m.usage()
        assert (usage["used"], usage["inodes_used"]) == (used, inodes)
        assert used == (depth + 1) * 4096 + 4096  # 21 directories and one block of data
    finally:
        os.fchdir(cwd)
        os.close(cwd)


def test_remount_of_a_deep_backing_directory(mount_factory: Any, tmp_path: Any) -> None:
    """The scan at mount time copes with a tree deeper than PATH_MAX in the backing dir."""
    name = "d" * 250
    backing = J(str(tmp_path), "b")
    os.mkdir(backing)
    top = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
    bottom = _deep_chain(top, 20, name)
    try:
        fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bottom)
        os.write(fd, b"x" * 5000)
        os.close(fd)
    finally:
        os.close(bottom)
        os.close(top)
    m = mount_factory("1G", backing=backing)
    assert m.usage()["used"] == 20 * 4096 + 2 * 4096
    assert m.usage()["inodes_used"] == 21


# -- statfs and the error boundary ------------------------------------------------------


def test_statfs_answers(pair: Pair) -> None:
    st = os.statvfs(pair.mnt)
    assert st.f_namemax == 255
    assert st.f_bsize == st.f_frsize == 4096
    assert 0 < st.f_bavail <= st.f_blocks
    fd = os.open(pair.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.fstatvfs(fd).f_blocks == st.f_blocks
    finally:
        os.close(fd)
    pair.same("pathconf NAME_MAX", lambda b: os.pathconf(b, "PC_NAME_MAX"))


def test_unexpected_exception_answers_eio_and_daemon_lives(pair: Pair) -> None:
    @boundary
    async def broken() -> None:
        raise RuntimeError("a bug")

    @boundary
    async def failing() -> None:
        raise PermissionError(errno.EACCES, "denied")

    import trio

    for fn, code in ((broken, errno.EIO), (failing, errno.EACCES)):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            trio.run(fn)
        assert exc.value.errno == code
    # Control requests the daemon must refuse without dying, each with EINVAL and a reason.
    for line in (b"not json\n", b"[1]\n", b'{"request": "set", "args": {"limit": "x"}}\n',
                 b'{"request": "nope"}\n', b'{"request": "status", "args": []}\n'):
        reply = raw_control(pair.mount.path, line=line)
        assert reply["errno"] == "EINVAL" and reply["error"], (line, reply)
    refused = other()(lambda: raw_control(pair.mount.path, "set", {}))()
    assert refused["errno"] == "EPERM"
    assert pair.mount.is_alive()


def test_sockets_locks_fallocate_copy_and_busy_text(pair: Pair) -> None:
    def sockets(b: str) -> Any:
        server = socket.socket(socket.AF_UNIX)
        client = socket.socket(socket.AF_UNIX)
        try:
            server.bind(J(b, "sock"))
            server.listen(1)
            client.connect(J(b, "sock"))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"over a socket on the filesystem")
                got = conn.recv(100)
            return got, meta(J(b, "sock")), attempt(server.bind, J(b, "sock"))
        finally:
            server.close()
            client.close()

    pair.same("bind and connect", sockets)

    def connect_nothing(b: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(J(b, "no"))

    pair.same("connect to nothing", connect_nothing)

    def locks(b: str) -> Any:
        create(J(b, "lk"))
        fd1 = os.open(J(b, "lk"), os.O_RDWR)
        fd2 = os.open(J(b, "lk"), os.O_RDWR)
        try:
            fcntl.flock(fd1, fcntl.LOCK_EX)
            conflict = attempt(fcntl.flock, fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd1, fcntl.LOCK_UN)
            fcntl.flock(fd2, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.lockf(fd1, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
            return conflict, other()(lambda p: fcntl.lockf(  # a process of another user
                os.open(p, os.O_RDONLY), fcntl.LOCK_SH | fcntl.LOCK_NB, 5, 0))(J(b, "lk"))
        finally:
            os.close(fd1)
            os.close(fd2)

    pair.each(lambda b: os.chmod(b, 0o777))
    pair.same("flock and fcntl locks", locks)

    def fallocate(b: str) -> Any:
        fd = os.open(J(b, "fa"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, 10_000)
            os.posix_fallocate(fd, 5000, 100)  # inside: no change
            return (os.fstat(fd).st_size, os.pread(fd, 4, 9996),
                    attempt(os.posix_fallocate, fd, -1, 10),
                    attempt(os.posix_fallocate, fd, 0, 0))
        finally:
            os.close(fd)

    pair.same("posix_fallocate", fallocate)
    pair.same("posix_fallocate read-only", lambda b: _fallocate_ro(J(b, "fa")))

    def copy(b: str) -> Any:
        create(J(b, "src"), 0o644, b"copy me " * 1000)
        src = os.open(J(b, "src"), os.O_RDONLY)
        dst = os.open(J(b, "dst"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            n = os.copy_file_range(src, dst, 5000, 100, 0)
            os.sendfile(dst, src, 0, 100)
            return n, read(J(b, "dst"))[:100], os.stat(J(b, "dst")).st_size
        finally:
            os.close(src)
            os.close(dst)

    pair.same("copy_file_range and sendfile", copy)

    program = shutil.which("sleep")
    assert program is not None

    def busy(b: str) -> Any:
        shutil.copy(program, J(b, "prog"))
        proc = subprocess.Popen([J(b, "prog"), "10"])
        try:
            for _ in range(200):  # until the kernel has mapped it
                if os.path.realpath(f"/proc/{proc.pid}/exe").endswith("/prog"):
                    break
                time.sleep(0.005)
            return (attempt(os.open, J(b, "prog"), os.O_WRONLY),
                    attempt(os.truncate, J(b, "prog"), 0))
        finally:
            proc.kill()
            proc.wait()

    pair.same("ETXTBSY on a running program", busy)

    def direct(b: str) -> Any:
        buf = mmap.mmap(-1, 8192)  # page aligned, as O_DIRECT wants
        buf.write(b"d" * 8192)
        fd = os.open(J(b, "direct"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        try:
            written = os.write(fd, buf)
            back = mmap.mmap(-1, 4096)
            got = os.preadv(fd, [back], 4096)
            return written, got, bytes(back[:4]), os.fstat(fd).st_size
        finally:
            os.close(fd)

    pair.same("O_DIRECT with aligned buffers", direct)

    def reopen_direct(b: str) -> Any:
        buf = mmap.mmap(-1, 4096)
        buf.write(b"r" * 4096)
        fd = os.open(J(b, "direct"), os.O_RDWR | os.O_DIRECT)
        try:
            return os.pwrite(fd, buf, 4096), read(J(b, "direct"))[4094:4098]
        finally:
            os.close(fd)

    pair.same("reopen O_DIRECT", reopen_direct)
    pair.check()


def _fallocate_ro(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fallocate(fd, 0, 100)
    finally:
        os.close(fd)


# -- pinned differences -----------------------------------------------------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """The xattr form of a POSIX ACL: (tag, perm, id) entries, id -1 where it has none."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident & 0xFFFFFFFF)
                                           for tag, perm, ident in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 1, 2, 4, 0x10, 0x20
ACCESS_ACL = b"system.posix_acl_access"
DEFAULT_ACL = b"system.posix_acl_default"


def test_posix_acls_are_stored_and_enforced(pair: Pair) -> None:
    grant = _acl((ACL_USER_OBJ, 6, -1), (ACL_USER, 4, OTHER), (ACL_GROUP_OBJ, 0, -1),
                 (ACL_MASK, 4, -1), (ACL_OTHER, 0, -1))  # 0600 plus user OTHER r--
    deny = _acl((ACL_USER_OBJ, 6, -1), (ACL_USER, 0, OTHER), (ACL_GROUP_OBJ, 4, -1),
                (ACL_MASK, 4, -1), (ACL_OTHER, 4, -1))  # 0644 less user OTHER
    pair.each(lambda b: (create(J(b, "grant"), 0o600, b"g"), create(J(b, "deny"), 0o644, b"d"),
                         os.mkdir(J(b, "dir"), 0o700)))
    pair.same("set access ACLs", lambda b: (
        os.setxattr(J(b, "grant"), ACCESS_ACL, grant), os.setxattr(J(b, "deny"), ACCESS_ACL, deny),
        os.setxattr(J(b, "dir"), ACCESS_ACL, grant), meta(J(b, "grant")), meta(J(b, "deny"))))
    pair.same("read ACL back", lambda b: os.getxattr(J(b, "grant"), ACCESS_ACL) == grant)
    pair.same("granted by ACL", other()(lambda b: read(J(b, "grant"))))
    pair.same("denied by ACL", other()(lambda b: read(J(b, "deny"))))
    pair.same("dir granted by ACL", other()(lambda b: os.listdir(J(b, "dir"))))
    pair.same("chmod narrows the mask", lambda b: (os.chmod(J(b, "grant"), 0o600),
                                                   os.getxattr(J(b, "grant"), ACCESS_ACL)))
    pair.same("masked out", other()(lambda b: read(J(b, "grant"))))
    pair.same("remove ACL", lambda b: (os.removexattr(J(b, "deny"), ACCESS_ACL),
                                       meta(J(b, "deny"))))
    pair.same("after removal", other()(lambda b: read(J(b, "deny"))))
    default = _acl((ACL_USER_OBJ, 7, -1), (ACL_USER, 5, OTHER), (ACL_GROUP_OBJ, 5, -1),
                   (ACL_MASK, 7, -1), (ACL_OTHER, 0, -1))
    pair.same("default ACL is inherited", root(0o000)(lambda b: (
        os.setxattr(J(b, "dir"), DEFAULT_ACL, default), create(J(b, "dir", "f"), 0o640),
        os.mkdir(J(b, "dir", "sub"), 0o750), meta(J(b, "dir", "f")),
        meta(J(b, "dir", "sub")), os.getxattr(J(b, "dir", "sub"), DEFAULT_ACL) == default,
        os.getxattr(J(b, "dir", "f"), ACCESS_ACL))))
    pair.check()


def test_difference_umask_applies_under_a_default_acl(pair: Pair) -> None:
    """Where the parent has a default ACL, Linux ignores the umask and the ACL decides.
    FUSE applies the caller's umask in the kernel before the daemon sees the mode
    (pyfuse3 cannot ask for FUSE_CAP_DONT_MASK), so the bits the umask removes stay off:
    the mount is more restrictive than the backing filesystem here, never less."""
    default = _acl((ACL_USER_OBJ, 7, -1), (ACL_GROUP_OBJ, 7, -1), (ACL_OTHER, 7, -1))
    pair.each(lambda b: (os.mkdir(J(b, "d")), os.setxattr(J(b, "d"), DEFAULT_ACL, default)))
    make = root(0o077)(lambda b: (create(J(b, "d", "f"), 0o666), meta(J(b, "d", "f"))[0])[1])
    assert make(pair.ref) == "-rw-rw-rw-"
    assert make(pair.mnt) == "-rw-------"
    # Without a default ACL the umask applies on both.
    pair.same("umask without default ACL", root(0o077)(
        lambda b: (create(J(b, "g"), 0o666), meta(J(b, "g"))[0])))
    pair.check()


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def test_difference_what_pyfuse3_has_no_handler_for(pair: Pair) -> None:
    """pyfuse3 offers no fallocate, lseek or tmpfile handler: the kernel answers fallocate(2)
    and O_TMPFILE with EOPNOTSUPP (glibc's posix_fallocate then writes instead), and
    SEEK_DATA/SEEK_HOLE with its generic answer: all data, no holes."""
    def fallocate(b: str) -> Any:
        fd = os.open(J(b, "f"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if _libc.fallocate(fd, 0, 0, 4096) != 0:
                return Err(errno.errorcode[ctypes.get_errno()])
            return None
        finally:
            os.close(fd)

    def holes(b: str) -> Any:
        fd = os.open(J(b, "sparse"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, b"x", 1 << 20)
            return os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE)
        finally:
            os.close(fd)

    assert fallocate(pair.ref) is None
    assert fallocate(pair.mnt) == Err(errno.errorcode[errno.EOPNOTSUPP])
    tmpfile = lambda b: os.close(os.open(b, os.O_TMPFILE | os.O_RDWR, 0o600))  # noqa: E731
    assert attempt(tmpfile, pair.ref) is None
    assert attempt(tmpfile, pair.mnt) == Err(errno.errorcode[errno.EOPNOTSUPP])
    assert holes(pair.ref) == (1 << 20, 0)
    assert holes(pair.mnt) == (0, (1 << 20) + 1)


def test_difference_o_direct_alignment_is_not_enforced(pair: Pair) -> None:
    """FUSE takes O_DIRECT I/O from any buffer at any offset; ext4 wants them aligned."""
    def unaligned(b: str) -> Any:
        fd = os.open(J(b, "d"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        try:
            return attempt(os.pwrite, fd, b"x" * 100, 3)
        finally:
            os.close(fd)

    assert unaligned(pair.ref) == Err("EINVAL")
    assert unaligned(pair.mnt) == 100


def test_device_nodes_open_and_set_id_bits_count_as_root(pair: Pair) -> None:
    """A root mount is mounted dev,suid, as a local filesystem is (libfuse's default and
    fusermount3 for other users say nodev,nosuid)."""
    if os.geteuid() != 0:
        pytest.skip("only root mounts with dev,suid")
    pair.each(lambda b: os.mknod(J(b, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3)))
    assert attempt(_write_fd, J(pair.ref, "null"), os.O_WRONLY) == 1
    assert attempt(_write_fd, J(pair.mnt, "null"), os.O_WRONLY) == 1
    options = os.statvfs(pair.mnt).f_flag
    assert not options & os.ST_NODEV and not options & os.ST_NOSUID


def test_difference_glibc_limits(pair: Pair) -> None:
    """glibc answers pathconf LINK_MAX and FILESIZEBITS from the filesystem type, which it
    does not know for FUSE: 127 and 32 where ext4 says 65000 and 64 (the real limits are
    the backing filesystem's)."""
    assert os.pathconf(pair.ref, "PC_LINK_MAX") == 65000
    assert os.pathconf(pair.mnt, "PC_LINK_MAX") == 127
    assert os.pathconf(pair.ref, "PC_FILESIZEBITS") == 64
    assert os.pathconf(pair.mnt, "PC_FILESIZEBITS") == 32
