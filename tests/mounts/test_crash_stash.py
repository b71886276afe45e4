"""--crash-sim's stash (the removals a cut may undo) is the daemon's alone: its name at the
mount's root is refused to every request, it is made once at mount time (0700, marked) and
used through one descriptor, and a tree of that name quotafs did not make is never removed:
the --crash-sim mount refuses it (exit 4). Review of issue 13, findings 1 and 2."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from quotafs.client import lifecycle
from quotafs.client.api import mounted
from quotafs.daemon.crashsim import STASH, STASH_MARK
from quotafs.errors import ExitCode
from tests.conftest import MountFactory, fuse_unusable_reason
from tests.mounts.test_crash_sim import assert_books_are_a_fresh_scan, fsync_dir
from tests.mounts.test_lifecycle2 import _pid, assert_one_line, quotafs
from tests.mounts.test_posix import Err, as_user, attempt

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or fuse_unusable_reason() is not None,
    reason="needs root and /dev/fuse (other uids, allow_other)")

J = os.path.join
NAME = os.fsdecode(STASH)
NOBODY = 65534
EPERM = Err("EPERM")


def nobody(fn: Callable[..., Any]) -> Callable[..., Any]:
    return as_user(NOBODY, NOBODY, (), umask=0o022)(fn)


@pytest.fixture
def base() -> Iterator[str]:
    top = tempfile.mkdtemp(prefix="quotafs-stash-", dir="/tmp")
    try:
        os.chmod(top, 0o755)  # every uid may reach the backing and the mount point
        os.mkdir(J(top, "b"), 0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_user_cannot_take_the_stash_name_to_read_what_root_removes(base: str) -> None:
    backing = J(base, "b")
    with mounted(limit="64M", backing=backing, allow_other=True, crash_sim=True) as m:
        os.chmod(m.path, 0o1777)
        mine = J(m.path, "mine")
        assert nobody(os.mkdir)(mine) is None
        assert nobody(os.chmod)(mine, 0o777) is None
        # The review's repro: the stash's name as a symlink to a directory of the user's.
        assert nobody(os.symlink)(J(backing, "mine"), J(m.path, NAME)) == EPERM
        assert nobody(os.symlink)("/tmp", J(m.path, NAME)) == EPERM
        os.mkdir(J(m.path, "private"), 0o700)
        with open(J(m.path, "private", "s"), "w") as f:
            f.write("victim secret")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(J(m.path, "private"))
        fsync_dir(m.path)
        os.unlink(J(m.path, "private", "s"))
        assert nobody(os.listdir)(mine) == []
        assert os.listdir(J(backing, "mine")) == []
        assert not os.path.lexists(J(backing, "mine", "s"))
        # the daemon's stash holds it, root's and 0700
        st = os.lstat(J(backing, NAME))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == 0
        assert nobody(os.listdir)(J(backing, NAME)) == Err("EACCES")
        m.crash(model="posix")  # the removal is undone from the stash, for root only
        with open(J(m.path, "private", "s")) as f:
            assert f.read() == "victim secret"
        assert nobody(read_text)(J(m.path, "private", "s")) == Err("EACCES")
        assert m.is_alive()


MAKERS = {
    "create": lambda p: open(p, "w").close(),
    "mkdir": os.mkdir,
    "mknod": os.mkfifo,
    "symlink": lambda p: os.symlink("x", p),
    "link": lambda p: os.link(J(os.path.dirname(p), "f"), p),
    "rename": lambda p: os.rename(J(os.path.dirname(p), "f"), p),
}


@pytest.mark.parametrize("op", sorted(MAKERS))
def test_the_stash_name_is_refused_at_the_root(mount_factory: MountFactory, op: str) -> None:
    m = mount_factory("16M", crash_sim=True)
    with open(J(m.path, "f"), "w") as f:
        f.write("f")
    assert attempt(MAKERS[op], J(m.path, NAME)) == EPERM
    assert os.path.isfile(J(m.path, "f")) and os.listdir(m.path) == ["f"]
    # not a file: every later removal still works (the review's ENOTDIR denial)
    os.unlink(J(m.path, "f"))
    assert os.listdir(m.path) == []
    os.mkdir(J(m.path, "d"))
    assert attempt(MAKERS["mkdir"], J(m.path, "d", NAME)) is None  # only the root's is kept
    m.crash(model="posix")
    assert os.listdir(m.path) == []  # the removal and the creates undone: nothing synced


def stash_tree(backing: str) -> str:
    """A user's directory of the stash's name, made through a default mount."""
    with mounted(backing=backing) as m:
        os.mkdir(J(m.path, NAME))
        with open(J(m.path, NAME, "thesis.txt"), "w") as f:
            f.write("thesis")
    return J(backing, NAME, "thesis.txt")


def test_a_users_tree_of_the_stash_name_refuses_the_crash_sim_mount(base: str) -> None:
    backing, mnt = J(base, "b"), J(base, "mnt")
    os.mkdir(mnt)
    thesis = stash_tree(backing)
    try:
        result = quotafs("mount", "--crash-sim", "--backing", backing, mnt)
        assert_one_line(result, ExitCode.BACKING, NAME)
    finally:
        if os.path.ismount(mnt):
            quotafs("umount", mnt)
    with open(thesis) as f:
        assert f.read() == "thesis"
    with mounted(backing=backing) as m:  # a default mount still shows it
        assert os.listdir(J(m.path, NAME)) == ["thesis.txt"]


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_symlink_or_file_of_the_stash_name_refuses_the_mount(base: str, kind: str) -> None:
    backing, mnt, outside = J(base, "b"), J(base, "mnt"), J(base, "outside")
    os.mkdir(mnt)
    os.mkdir(outside)
    with open(J(outside, "keep"), "w") as f:
        f.write("keep")
    if kind == "symlink":
        os.symlink(outside, J(backing, NAME))
    else:
        with open(J(backing, NAME), "w") as f:
            f.write("mine")
    try:
        assert_one_line(quotafs("mount", "--crash-sim", "--backing", backing, mnt),
                        ExitCode.BACKING, NAME)
    finally:
        if os.path.ismount(mnt):
            quotafs("umount", mnt)
    assert os.listdir(outside) == ["keep"] and os.path.lexists(J(backing, NAME))


def test_the_stash_is_made_at_mount_and_gone_at_unmount(base: str) -> None:
    backing = J(base, "b")
    with mounted(limit="16M", backing=backing, crash_sim=True) as m:
        assert os.path.isdir(J(backing, NAME))
        assert os.listdir(m.path) == []
        status = m.status()
        assert (status.used, status.inodes_used) == (0, 0)  # unseen by the quota
        with open(J(m.path, "f"), "w") as f:
            f.write("f")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(m.path)
        os.unlink(J(m.path, "f"))
        assert os.listdir(J(backing, NAME)) != [os.fsdecode(STASH_MARK)]  # f is in it
        m.crash(model="posix")  # the unlink is undone, f comes back from the stash
        assert os.listdir(m.path) == ["f"]
        assert os.listdir(J(backing, NAME)) == [os.fsdecode(STASH_MARK)]
        assert_books_are_a_fresh_scan(m)  # the stash is no part of the quota
    assert os.listdir(backing) == ["f"]


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_a_killed_daemons_stash_goes_at_the_next_crash_sim_mount(base: str) -> None:
    backing, mnt = J(base, "b"), J(base, "mnt")
    os.mkdir(mnt)
    assert quotafs("mount", "--crash-sim", "--limit", "16M", "--backing", backing,
                   mnt).returncode == 0
    try:
        pid = _pid(mnt)
        for name in ("gone", "kept"):
            with open(J(mnt, name), "w") as f:
                f.write(name)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(mnt)
        os.unlink(J(mnt, "gone"))  # not durable: in the stash
        os.kill(pid, signal.SIGKILL)
        assert lifecycle.wait_for_exit(pid, 20)
    finally:
        quotafs("umount", mnt)
    assert not os.path.ismount(mnt)
    assert sorted(os.listdir(backing)) == [NAME, "kept"]  # the stash, marked, left behind
    with mounted(limit="16M", backing=backing, crash_sim=True) as again:
        # nothing reverted: the removal is permanent, the rest as it was
        assert os.listdir(again.path) == ["kept"]
        assert os.listdir(J(backing, NAME)) == [os.fsdecode(STASH_MARK)]
        assert_books_are_a_fresh_scan(again)
        again.crash(model="posix")
        assert os.listdir(again.path) == ["kept"]
    assert os.listdir(backing) == ["kept"]
