"""Other users on an --allow-other mount get no more than the backing directory gives them.

The daemon runs as root, so every request of another user must be done with that user's
rights: the kernel checks only its cached attributes (60 s) before sending a request, and
the backing inode may have changed meanwhile, or (the create race) be another inode than
the one the kernel checked. Each hole is reproduced by changing the backing inode behind
the kernel's cache, then asking through the mount as uid 65534. What the user may do must
still work. Also: events and fault rules are the mount owner's, and the daemon's
configuration is not on its command line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from quotafs.client.api import QuotaMount, mounted
from quotafs.errors import ExitCode
from tests.conftest import NobodyEnv, fuse_unusable_reason, raw_control
from tests.mounts.test_posix import Err, as_user, attempt, read

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or fuse_unusable_reason() is not None,
    reason="needs root and /dev/fuse (other uids, allow_other)")

J = os.path.join
NOBODY = 65534
GROUP = 5001  # a group NOBODY is in only where a test says so
EACCES, EPERM = Err("EACCES"), Err("EPERM")
CAPABILITY = b"security.capability"
# struct vfs_cap_data, revision 2, effective: CAP_NET_BIND_SERVICE (10) permitted.
CAP_NET_BIND = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


def nobody(groups: tuple[int, ...] = ()) -> Any:
    return as_user(NOBODY, NOBODY, groups, umask=0o022)


@dataclass
class Setup:
    mount: QuotaMount
    mnt: str  # a 1777 directory on the mount
    back: str  # the same directory in the backing dir
    ref: str  # a 1777 directory beside the backing dir, to compare with


@pytest.fixture
def setup() -> Iterator[Setup]:
    base = tempfile.mkdtemp(prefix="quotafs-security-", dir="/tmp")
    try:
        os.chmod(base, 0o755)  # every uid may reach the backing and the mount point
        backing = J(base, "backing")
        os.mkdir(backing, 0o755)
        ref = J(base, "ref")
        os.mkdir(ref)
        os.chmod(ref, 0o1777)
        with mounted(limit="64M", backing=backing, allow_other=True) as m:
            os.mkdir(J(m.path, "t"))
            os.chmod(J(m.path, "t"), 0o1777)
            yield Setup(m, J(m.path, "t"), J(backing, "t"), ref)
            assert m.is_alive()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def make(path: str, mode: int, uid: int = 0, gid: int = 0, data: bytes = b"SECRET") -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def cached_then_locked(s: Setup, name: str, cached_uid: int = 0, cached_mode: int = 0o666
                       ) -> str:
    """A root-owned 0600 file whose attributes the kernel holds as (cached_uid, cached_mode):
    the state the backing refuses while the kernel's cache would allow."""
    path = J(s.mnt, name)
    make(path, cached_mode, cached_uid, cached_uid)
    os.stat(path)  # the kernel caches these attributes for 60 s
    back = J(s.back, name)
    os.chown(back, 0, 0)
    os.chmod(back, 0o600)
    return path


def read_back(s: Setup, name: str) -> bytes:
    with open(J(s.back, name), "rb") as f:
        return f.read()


# -- holes: each was open while the daemon acted as root --------------------------------


def test_create_race_opens_nothing_the_backing_refuses(setup: Setup) -> None:
    s = setup
    s.mount.add_fault("create", delay="3s", path="/t/x")

    def appear() -> None:  # another user's file shows up while the create is delayed
        time.sleep(1.5)
        make(J(s.back, "x"), 0o600)

    writer = threading.Thread(target=appear)
    writer.start()
    try:
        @nobody()
        def open_creat(mnt: str) -> Any:
            fd = os.open(J(mnt, "x"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                return os.read(fd, 99)
            finally:
                os.close(fd)

        assert open_creat(s.mnt) == EACCES
    finally:
        writer.join()
    assert read_back(s, "x") == b"SECRET"
    assert os.stat(J(s.back, "x")).st_uid == 0


def test_open_and_truncate_of_a_file_the_backing_refuses(setup: Setup) -> None:
    s = setup
    path = cached_then_locked(s, "f")
    assert nobody()(lambda p: os.open(p, os.O_RDONLY))(path) == EACCES
    assert nobody()(lambda p: os.open(p, os.O_WRONLY))(path) == EACCES
    assert nobody()(lambda p: os.truncate(p, 0))(path) == EACCES
    assert nobody()(lambda p: os.open(p, os.O_WRONLY | os.O_TRUNC))(path) == EACCES
    assert read_back(s, "f") == b"SECRET"


def test_chmod_chown_utimes_of_a_file_the_user_no_longer_owns(setup: Setup) -> None:
    s = setup
    path = cached_then_locked(s, "f", cached_uid=NOBODY, cached_mode=0o644)
    assert nobody()(lambda p: os.chmod(p, 0o666))(path) == EPERM
    assert nobody()(lambda p: os.chown(p, -1, NOBODY))(path) == EPERM
    assert nobody()(lambda p: os.utime(p, (1, 1)))(path) == EPERM
    assert nobody()(lambda p: os.utime(p))(path) == EACCES  # "now" needs write permission
    st = os.stat(J(s.back, "f"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert st.st_mtime > 1


def locked_dir(s: Setup, name: str) -> str:
    """A directory the kernel holds as 0777 while the backing has it root's 0755."""
    path = J(s.mnt, name)
    os.mkdir(path)
    os.chmod(path, 0o777)
    os.stat(path)
    os.chmod(J(s.back, name), 0o755)
    return path


def test_hard_link_and_rename_into_a_directory_the_backing_refuses(setup: Setup) -> None:
    s = setup
    closed = locked_dir(s, "closed")
    mine = J(s.mnt, "mine")
    nobody()(lambda p: open(p, "w").close())(mine)
    assert nobody()(os.link)(mine, J(closed, "link")) == EACCES
    assert nobody()(os.rename)(mine, J(closed, "moved")) == EACCES
    assert nobody()(lambda d: open(J(d, "new"), "w").close())(closed) == EACCES
    assert nobody()(os.mkdir)(J(closed, "sub")) == EACCES
    assert os.listdir(J(s.back, "closed")) == []


def test_hard_link_of_a_file_the_backing_refuses(setup: Setup) -> None:
    with open("/proc/sys/fs/protected_hardlinks") as f:
        if f.read().strip() != "1":
            pytest.skip("fs.protected_hardlinks is off: anyone may link anything")
    s = setup
    path = cached_then_locked(s, "f")
    # Only the owner, or who may read and write the file, may link it.
    assert nobody()(lambda p: os.link(p, p + ".link"))(path) == EPERM
    assert not os.path.exists(J(s.back, "f.link"))


def test_rename_over_and_unlink_in_a_sticky_directory(setup: Setup) -> None:
    s = setup
    mine = J(s.mnt, "mine")
    nobody()(lambda p: open(p, "w").close())(mine)
    victim = cached_then_locked(s, "v", cached_uid=NOBODY, cached_mode=0o644)
    assert nobody()(os.rename)(mine, victim) == EPERM
    victim = cached_then_locked(s, "w", cached_uid=NOBODY, cached_mode=0o644)
    assert nobody()(os.unlink)(victim) == EPERM
    assert (read_back(s, "v"), read_back(s, "w")) == (b"SECRET", b"SECRET")


def test_xattrs_of_a_file_the_backing_refuses(setup: Setup) -> None:
    s = setup
    path = cached_then_locked(s, "f")
    os.setxattr(J(s.back, "f"), b"user.secret", b"42")
    assert nobody()(os.getxattr)(path, b"user.secret") == EACCES
    assert nobody()(os.setxattr)(path, b"user.new", b"1") == EACCES
    assert nobody()(os.removexattr)(path, b"user.secret") == EACCES
    assert os.listxattr(J(s.back, "f")) == ["user.secret"]


def test_security_capability_is_answered_as_the_backing_answers(setup: Setup) -> None:
    """The kernel asks for security.capability before every write(2), and the daemon
    answers it for a file known to have none before any identity switch or check. A file
    that has one still returns it, to root and to another user, as the backing's own
    filesystem does; a write still takes it away as there; and the early answer opens no
    user.* xattr the backing refuses."""
    s = setup

    def prepare(d: str) -> None:
        for name in ("plain", "capped"):
            make(J(d, name), 0o600)  # its write(2) asked: the daemon learnt "none"
        os.setxattr(J(d, "capped"), CAPABILITY, CAP_NET_BIND)
        os.setxattr(J(d, "plain"), b"user.secret", b"42")

    def capabilities(d: str) -> list[Any]:
        return [attempt(os.getxattr, J(d, n), CAPABILITY) for n in ("plain", "capped")]

    def rewrite(d: str) -> None:
        with open(J(d, "capped"), "r+b") as f:
            f.write(b"new")

    prepare(s.mnt)
    prepare(s.ref)
    assert capabilities(s.mnt) == capabilities(s.ref) == [Err("ENODATA"), CAP_NET_BIND]
    assert nobody()(capabilities)(s.mnt) == nobody()(capabilities)(s.ref) \
        == [Err("ENODATA"), CAP_NET_BIND]
    assert nobody()(os.getxattr)(J(s.mnt, "plain"), b"user.secret") == EACCES
    assert os.getxattr(J(s.back, "capped"), CAPABILITY) == CAP_NET_BIND
    rewrite(s.mnt)
    rewrite(s.ref)
    assert capabilities(s.mnt) == capabilities(s.ref)
    assert nobody()(capabilities)(s.mnt) == nobody()(capabilities)(s.ref)


def test_trusted_xattrs_are_not_listed_to_other_users(setup: Setup) -> None:
    s = setup
    make(J(s.mnt, "f"), 0o644, NOBODY, NOBODY)
    os.setxattr(J(s.back, "f"), b"trusted.root", b"1")
    os.setxattr(J(s.back, "f"), b"user.open", b"1")
    assert nobody()(os.listxattr)(J(s.mnt, "f")) == ["user.open"]
    assert sorted(os.listxattr(J(s.mnt, "f"))) == ["trusted.root", "user.open"]


# -- what the user may do still works ---------------------------------------------------


def test_own_files_work_as_on_the_backing(setup: Setup) -> None:
    s = setup

    @nobody()
    def own(mnt: str) -> Any:
        p = J(mnt, "own")
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"hello")
        os.close(fd)
        os.truncate(p, 4)
        os.chmod(p, 0o640)
        os.chown(p, -1, NOBODY)
        os.utime(p, (1_000_000, 2_000_000))
        os.setxattr(p, b"user.k", b"v")
        os.link(p, p + ".2")
        os.rename(p + ".2", p + ".3")
        os.mkdir(J(mnt, "dir"), 0o750)
        os.symlink("own", J(mnt, "sym"))
        with open(p, "rb") as f:
            return f.read(), os.getxattr(p, b"user.k")

    assert own(s.mnt) == (b"hell", b"v")
    for name in ("own", "own.3", "dir", "sym"):
        st = os.lstat(J(s.back, name))
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    st = os.stat(J(s.back, "own"))
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o640, 2_000_000)
    assert nobody()(os.unlink)(J(s.mnt, "own.3")) is None


def test_group_writable_files_through_a_supplementary_group(setup: Setup) -> None:
    s = setup
    make(J(s.mnt, "g"), 0o660, 0, GROUP, data=b"")

    def use(p: str) -> Any:
        with open(p, "r+b") as f:
            f.write(b"via group")
        os.utime(p)  # touch: "now" needs only write permission
        os.chown(p, -1, GROUP)  # but a chown needs ownership, even to one's own group
        return None

    assert nobody((GROUP,))(use)(J(s.mnt, "g")) == EPERM  # after the write and the touch
    assert read_back(s, "g") == b"via group"
    assert nobody()(read)(J(s.mnt, "g")) == EACCES
    assert nobody((GROUP,))(read)(J(s.mnt, "g")) == b"via group"

    @nobody((GROUP,))
    def chgrp_own(mnt: str) -> Any:  # an owner may give its file to a group it is in
        p = J(mnt, "own")
        open(p, "w").close()
        os.chown(p, -1, GROUP)
        return os.stat(p).st_gid

    assert chgrp_own(s.mnt) == GROUP


def test_sticky_directory_rules(setup: Setup) -> None:
    s = setup
    make(J(s.mnt, "roots"), 0o666)
    assert nobody()(os.unlink)(J(s.mnt, "roots")) == EPERM
    nobody()(lambda p: open(p, "w").close())(J(s.mnt, "mine"))
    assert nobody()(os.rename)(J(s.mnt, "mine"), J(s.mnt, "roots")) == EPERM
    assert nobody()(os.rename)(J(s.mnt, "mine"), J(s.mnt, "mine2")) is None
    assert nobody()(os.unlink)(J(s.mnt, "mine2")) is None
    os.unlink(J(s.mnt, "roots"))  # root may


def test_setgid_directory_gives_its_group_and_strips_sgid_like_the_backing(
        setup: Setup) -> None:
    s = setup
    for side in (s.mnt, s.ref):
        d = J(side, "sgid")
        os.mkdir(d)
        os.chown(d, 0, GROUP)
        os.chmod(d, 0o2777)

    @nobody()
    def create_in(d: str) -> Any:
        out = []
        for name, mode in (("f", 0o2775), ("g", 0o644)):
            os.close(os.open(J(d, name), os.O_CREAT | os.O_WRONLY, mode))
            out.append(os.stat(J(d, name)))
        os.mkdir(J(d, "sub"), 0o755)
        out.append(os.stat(J(d, "sub")))
        return [(st.st_uid, st.st_gid, oct(st.st_mode)) for st in out]

    on_mount = create_in(J(s.mnt, "sgid"))
    reference = create_in(J(s.ref, "sgid"))
    assert on_mount == reference
    assert [gid for _, gid, _ in on_mount] == [GROUP] * 3


# -- events and fault rules are the mount owner's ---------------------------------------


def test_events_and_rules_are_the_owners_status_is_public(setup: Setup,
                                                          nobody_env: NobodyEnv) -> None:
    s = setup
    s.mount.add_fault("open", errno="EIO", path="/t/private/*")
    os.mkdir(J(s.mnt, "private"), 0o700)
    make(J(s.mnt, "private", "f"), 0o600)
    with pytest.raises(OSError):
        read(J(s.mnt, "private", "f"))
    assert [e["path"] for e in s.mount.events()] == ["/t/private/f"]

    for name in ("events", "faults"):

        @nobody()
        def peek(mnt: str, name: str = name) -> Any:
            return raw_control(mnt, name)

        refused = peek(s.mount.path)
        assert refused["errno"] == "EPERM" and "result" not in refused, name
    status = nobody()(lambda m: raw_control(m, "status")["result"])(s.mount.path)
    assert status["used"] == s.mount.usage()["used"]
    for command in (["events"], ["fault", "list"]):
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             nobody_env.python, "-m", "quotafs", *command, s.mount.path],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(nobody_env.src)})
        assert result.returncode == ExitCode.PERMISSION, result
        assert "/t/private" not in result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- the daemon's configuration is not on its command line ------------------------------


def test_20000_rules_mount_and_the_daemons_argv_shows_none() -> None:
    rules = [{"op": "open", "path": f"/secret-rule-{i}", "errno": "EIO"} for i in range(20000)]
    with mounted(limit="1M", rules=rules) as m:
        assert m.status()["fault_rules"] == 20000
        with open(f"/proc/{m.pid}/cmdline", "rb") as f:
            argv = f.read()
        assert b"secret-rule" not in argv and os.fsencode(m.backing) not in argv, argv
        open(J(m.path, "secret-rule-19999"), "w").close()
        with pytest.raises(OSError) as raised:  # the last rule arrived whole and fires
            read(J(m.path, "secret-rule-19999"))
        assert raised.value.errno == errno.EIO


# -- a daemon that is not root checks the caller's rights itself ------------------------

OWNER = NOBODY  # the non-root user who mounts (fusermount3 wants a passwd entry)
OTHER = 4242  # and another user

# Run as root in a private mount namespace: /etc/fuse.conf with user_allow_other and a
# /dev/fuse that OWNER may open, bound over the machine's only inside the namespace.
_NON_ROOT_MOUNT = r"""
import json, os, subprocess, sys, time
base, owner, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
J = os.path.join
conf, dev = J(base, "fuse.conf"), J(base, "fuse")
with open(conf, "w") as f:
    f.write("user_allow_other\n")
os.mknod(dev, 0o20666, os.makedev(10, 229)); os.chmod(dev, 0o666)
subprocess.run(["mount", "--bind", conf, "/etc/fuse.conf"], check=True)
subprocess.run(["mount", "--bind", dev, "/dev/fuse"], check=True)
# This Python may live below root's 0700 home: show OWNER a 0755 /root with only it inside.
view = J(base, "root")
os.mkdir(view); os.chmod(view, 0o755)
for name in os.listdir("/root"):
    if sys.executable.startswith("/root/" + name) or os.path.realpath(
            sys.executable).startswith("/root/" + name + "/"):
        os.mkdir(J(view, name))
        subprocess.run(["mount", "--bind", "/root/" + name, J(view, name)], check=True)
subprocess.run(["mount", "--rbind", view, "/root"], check=True)
B, M, run = J(base, "b"), J(base, "m"), J(base, "run")
for d in (B, M, run):
    os.mkdir(d); os.chown(d, owner, owner)
as_owner = ["setpriv", f"--reuid={owner}", f"--regid={owner}", "--clear-groups"]
env = dict(os.environ, XDG_RUNTIME_DIR=run)
q = [sys.executable, "-m", "quotafs"]
subprocess.run(as_owner + q + ["mount", "--allow-other", "--backing", B, M], check=True,
               env=env)
out = {}
try:
    def as_other(name, fn):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.setgroups([]); os.setresgid(other, other, other)
            os.setresuid(other, other, other)
            try:
                fn(); res = "ok"
            except OSError as exc:
                res = os.strerror(exc.errno)
            os.write(w, res.encode()); os._exit(0)
        os.close(w)
        out[name] = os.read(r, 200).decode(); os.waitpid(pid, 0); os.close(r)

    def as_owner_do(fn):
        pid = os.fork()
        if pid == 0:
            os.setgroups([]); os.setresgid(owner, owner, owner)
            os.setresuid(owner, owner, owner)
            fn(); os._exit(0)
        os.waitpid(pid, 0)

    def setup():
        os.mkdir(J(M, "t")); os.chmod(J(M, "t"), 0o1777)
        with open(J(M, "t", "f"), "w") as f:
            f.write("SECRET")
        os.chmod(J(M, "t", "f"), 0o666)
        os.stat(J(M, "t", "f"))
        os.chmod(J(B, "t", "f"), 0o600)  # behind the kernel's cache
    as_owner_do(setup)
    as_other("open_stale", lambda: open(J(M, "t", "f")).read())
    as_other("truncate_stale", lambda: os.truncate(J(M, "t", "f"), 0))
    as_other("unlink_sticky", lambda: os.unlink(J(M, "t", "f")))
    subprocess.run(as_owner + q + ["fault", "add", M, "--op", "create", "--path", "/t/x",
                                   "--delay", "3s"], check=True, env=env)
    def appear():
        time.sleep(1.5)
        with open(J(B, "t", "x"), "w") as f:
            f.write("SECRET")
        os.chmod(J(B, "t", "x"), 0o600)
    pid = os.fork()
    if pid == 0:
        as_owner_do(appear); os._exit(0)
    as_other("create_race", lambda: os.open(J(M, "t", "x"), os.O_RDWR | os.O_CREAT))
    os.waitpid(pid, 0)
    as_other("create_new", lambda: open(J(M, "t", "new"), "w").close())
    as_other("read_public", lambda: open(J(M, "t", "new")).read())
    out["secret_kept"] = open(J(B, "t", "f")).read()
finally:
    subprocess.run(["umount", M])
    for _ in range(500):
        if not os.path.ismount(M):
            break
        time.sleep(0.01)
print(json.dumps(out))
"""


def test_a_non_root_daemon_checks_other_users_against_fresh_attributes() -> None:
    base = tempfile.mkdtemp(prefix="quotafs-security-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        result = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                                 "-c", _NON_ROOT_MOUNT, base, str(OWNER), str(OTHER)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    denied, refused = os.strerror(errno.EACCES), os.strerror(errno.EPERM)
    assert out == {"open_stale": denied, "truncate_stale": denied, "unlink_sticky": refused,
                   "create_race": denied, "create_new": "ok", "read_public": "ok",
                   "secret_kept": "SECRET"}


def test_a_directory_closed_behind_the_cache_closes_the_path(setup: Setup) -> None:
    """The kernel's cached entries must not carry another user past a directory that the
    backing now closes to them: every directory on the way is checked as the caller."""
    s = setup
    os.mkdir(J(s.mnt, "d"), 0o755)
    make(J(s.mnt, "d", "f"), 0o644)

    @nobody()
    def read_f(mnt: str) -> Any:
        with open(J(mnt, "d", "f"), "rb") as f:
            return f.read()

    assert read_f(s.mnt) == b"SECRET"  # and the kernel now holds d and d/f
    os.chmod(J(s.back, "d"), 0o700)  # behind the kernel's cache
    assert read_f(s.mnt) == EACCES
