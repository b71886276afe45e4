"""The control socket on real mounts (issue 14): status, set, faults and events through it
with xattrs on and off; --xattrs off makes the kernel stop asking for xattrs while data,
quota and df work; other users get EPERM; the socket lives and dies with its daemon."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from quotafs import QuotaMount, controlsocket, open_quota_mount
from quotafs.client import lifecycle
from quotafs.errors import ExitCode, QuotafsError
from tests.conftest import NOBODY, MountFactory, NobodyEnv, fuse_unusable_reason, raw_control
from tests.mounts.test_lifecycle2 import _pid, _wait_gone, assert_one_line, cleanup, quotafs
from tests.mounts.test_posix import as_user

pytestmark = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")
__all__ = ["cleanup"]  # a fixture, used by name


def _write_blocks(path: str, count: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(count):
            os.pwrite(fd, bytes([i % 256]) * 4096, i * 4096)
    finally:
        os.close(fd)


@pytest.mark.parametrize("xattrs", [True, False], ids=["xattrs-on", "xattrs-off"])
def test_status_set_faults_and_events_go_through_the_socket(
        mount_factory: MountFactory, xattrs: bool) -> None:
    m = mount_factory("1M", xattrs=xattrs)
    assert os.path.exists(controlsocket.socket_path(m.path, os.geteuid()))
    assert m.status().xattrs is xattrs
    # A change is in effect when the call returns: the next write sees it.
    m.set_limit("8K")
    with pytest.raises(OSError) as full:
        _write_blocks(os.path.join(m.path, "big"), 3)
    assert full.value.errno == errno.ENOSPC
    m.set_limit("1M")
    rule = m.add_fault("write", errno="EIO", path="/f")
    with pytest.raises(OSError) as injected:
        _write_blocks(os.path.join(m.path, "f"), 1)
    assert injected.value.errno == errno.EIO
    [listed] = m.faults()
    assert (listed.id, listed.fired) == (rule, 1)
    assert [(e.kind, e.path) for e in m.events()] == [("quota", "/big"), ("fault", "/f")]
    assert [e.path for e in m.events(after=1)] == ["/f"]
    assert m.clear_faults() == 1
    _write_blocks(os.path.join(m.path, "f"), 1)  # no rule left
    # The command line asks the same socket.
    shown = subprocess.run([sys.executable, "-m", "quotafs", "status", "--json", m.path],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["xattrs"] is xattrs
    human = subprocess.run([sys.executable, "-m", "quotafs", "status", m.path],
                           capture_output=True, text=True, timeout=60)
    assert f"xattrs:       {'on' if xattrs else 'off'}" in human.stdout
    events = subprocess.run([sys.executable, "-m", "quotafs", "events", m.path],
                            capture_output=True, text=True, timeout=60)
    assert events.returncode == 0 and "fault write /f: errno EIO" in events.stdout


def test_xattrs_off_stops_the_kernel_asking_and_keeps_data_quota_and_df(
        mount_factory: MountFactory) -> None:
    on = mount_factory("1M")
    off = mount_factory("1M", xattrs=False)
    for m in (on, off):
        _write_blocks(os.path.join(m.path, "f"), 100)
    # With xattrs each write(2) costs a GETXATTR security.capability; without, the first
    # ENOSYS is remembered for the connection and no other is sent.
    assert on.status().getxattr_requests >= 100
    assert off.status().getxattr_requests <= 1
    f = os.path.join(off.path, "f")
    for call in (lambda: os.getxattr(f, "user.a"), lambda: os.setxattr(f, "user.a", b"1"),
                 lambda: os.listxattr(f), lambda: os.removexattr(f, "user.a"),
                 lambda: os.getxattr(off.path, "user.quotafs.status")):
        with pytest.raises(OSError) as refused:
            call()
        assert refused.value.errno == errno.EOPNOTSUPP
    for tool, args in (("getfattr", ["-n", "user.a", f]), ("setfattr", ["-n", "user.a", f])):
        if shutil.which(tool):
            result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
            assert result.returncode != 0 and "Operation not supported" in result.stderr
    with open(f, "rb") as data:
        assert data.read(8192) == b"\0" * 4096 + b"\1" * 4096
    assert off.usage().used == 100 * 4096
    vfs = os.statvfs(off.path)
    assert (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize == 100 * 4096
    with pytest.raises(OSError) as full:  # past the quota: ENOSPC from write(2) itself
        _write_blocks(os.path.join(off.path, "g"), 200)
    assert full.value.errno == errno.ENOSPC
    assert off.usage().enospc_count == 1
    warned = subprocess.run([sys.executable, "-m", "quotafs", "fault", "add", off.path, "--op",
                             "getxattr", "--errno", "EIO"], capture_output=True, text=True,
                            timeout=60)
    assert warned.returncode == 0
    assert "warning: getxattr: the mount has --xattrs off" in warned.stderr


def test_other_users_get_eperm_and_change_nothing(mount_factory: MountFactory) -> None:
    m = mount_factory("1M", allow_other=True)
    os.chmod(m.path, 0o777)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("set", {"limit": 999999999}), ("fault.add", {"op": "write", "errno": "EIO"}),
        ("fault.clear", {}), ("events", {}), ("faults", {}), ("forget", {})]

    @as_user(NOBODY, NOBODY)
    def ask(path: str) -> list[Any]:
        return [raw_control(path, name, args) for name, args in requests]

    for (name, _), reply in zip(requests, ask(m.path), strict=True):
        assert reply.get("errno") == "EPERM" and "result" not in reply, (name, reply)
    public = as_user(NOBODY, NOBODY)(lambda path: raw_control(path, "status"))(m.path)
    assert public["result"]["limit"] == 1 << 20
    assert m.usage().limit == 1 << 20 and m.faults() == []


def test_the_command_line_of_another_user_is_refused_in_one_line(
        mount_factory: MountFactory, nobody_env: NobodyEnv) -> None:
    m = mount_factory("1M", allow_other=True)
    for command in (["set", m.path, "--limit", "2M"],
                    ["fault", "add", m.path, "--op", "write", "--errno", "EIO"],
                    ["fault", "clear", m.path]):
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             nobody_env.python, "-m", "quotafs", *command],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(nobody_env.src)})
        assert_one_line(result, ExitCode.PERMISSION, "not allowed to change")
    assert m.usage().limit == 1 << 20 and m.faults() == []


def _mount_point(tmp_path: Path, cleanup: list[str]) -> tuple[str, str]:
    """(a fresh mount point, detached at the end whatever happens; its socket's path)."""
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    return mnt, controlsocket.socket_path(mnt, os.geteuid())


def _mount_and_signal(mnt: str, sig: signal.Signals) -> int:
    """Mount at `mnt` (detached), send the daemon `sig`, wait until it is gone; its pid.
    The backing directory is the test's own: one a SIGKILLed daemon made would be kept."""
    backing = tempfile.mkdtemp(prefix="backing-", dir=os.path.dirname(mnt))
    assert quotafs("mount", "--backing", backing, mnt).returncode == 0
    pid = _pid(mnt)
    os.kill(pid, sig)
    _wait_gone(pid)
    return pid


def test_the_socket_lives_and_dies_with_its_daemon(tmp_path: Path,
                                                   cleanup: list[str]) -> None:
    mnt, sock = _mount_point(tmp_path, cleanup)
    # Unmounted normally: gone.
    assert quotafs("mount", "--xattrs", "off", mnt).returncode == 0
    assert os.path.exists(sock)
    assert quotafs("umount", mnt).returncode == 0
    assert not os.path.exists(sock)
    # SIGTERM: the daemon unmounts and removes it.
    _mount_and_signal(mnt, signal.SIGTERM)
    assert not os.path.exists(sock) and not os.path.ismount(mnt)
    # SIGKILL leaves it: a command says the daemon is gone; umount cleans up.
    _mount_and_signal(mnt, signal.SIGKILL)
    assert os.path.exists(sock)
    assert_one_line(quotafs("status", mnt), ExitCode.NOT_QUOTAFS, "is gone")
    assert quotafs("umount", mnt).returncode == 0
    assert not os.path.exists(sock)


def test_a_stale_socket_is_replaced_by_the_next_daemon(tmp_path: Path,
                                                       cleanup: list[str]) -> None:
    mnt, sock = _mount_point(tmp_path, cleanup)
    old = _mount_and_signal(mnt, signal.SIGKILL)
    # Detached behind quotafs's back: the dead daemon's socket stays.
    subprocess.run(["umount", "-l", mnt], check=True, timeout=30)
    stale = os.lstat(sock)
    assert quotafs("mount", "--limit", "2M", mnt).returncode == 0
    assert not os.path.samestat(os.lstat(sock), stale)
    new = json.loads(quotafs("status", "--json", mnt).stdout)
    assert (new["limit"], new["pid"] != old) == (2 << 20, True)
    assert quotafs("umount", mnt).returncode == 0
    assert not os.path.exists(sock)


def test_a_stopped_daemon_without_xattrs_gives_up_in_time(
        mount_factory: MountFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    m = mount_factory("1M", xattrs=False)
    monkeypatch.setenv("QUOTAFS_PROBE_TIMEOUT", "1")
    os.kill(m.pid, signal.SIGSTOP)
    try:
        for call in (m.status, lambda: m.set_limit("2M"), m.events, m.faults):
            started = time.monotonic()
            with pytest.raises(QuotafsError, match="does not answer") as info:
                call()
            assert info.value.code == ExitCode.DAEMON
            assert time.monotonic() - started < 5
        assert isinstance(info.value, lifecycle.NoAnswer)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert m.usage().used == 0


def test_the_api_takes_xattrs_off_in_every_form() -> None:
    started = QuotaMount.start("1M", xattrs=False)
    try:
        assert started.status().xattrs is False
    finally:
        started.close()

    async def main() -> bool:
        async with open_quota_mount("1M", xattrs="off") as m:
            with pytest.raises(OSError) as info:
                os.getxattr(m.path, "user.a")
            assert info.value.errno == errno.EOPNOTSUPP
            return (await m.trio.status()).xattrs

    assert trio.run(main) is False


# Run by root in a private mount namespace (as tests/mounts/test_unprivileged.py does): a
# 0666 fuse node over /dev/fuse, a mount by nobody, then each user's control requests.
_USERS_MOUNT = """
import json, os, subprocess, sys
top, python, src, nobody, other = sys.argv[1:4] + [int(a) for a in sys.argv[4:6]]
mnt, node = f"{top}/mnt", f"{top}/fuse"
os.mknod(node, 0o666 | 0o020000, os.makedev(10, 229)); os.chmod(node, 0o666)
subprocess.run(["mount", "--bind", node, "/dev/fuse"], check=True)
env = {"PATH": "/usr/bin:/bin", "HOME": top, "XDG_RUNTIME_DIR": f"{top}/run",
       "TMPDIR": f"{top}/tmp", "PYTHONPATH": src}

def q(uid, *args):
    who = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                               "--clear-groups"]
    r = subprocess.run(who + [python, "-m", "quotafs", *args], capture_output=True,
                       text=True, timeout=120, env=env)
    return [r.returncode, r.stdout if "--json" in args else "", r.stderr.strip()]

out = {"mount": q(nobody, "mount", "--xattrs", "off", "--limit", "64K", mnt)}
sys.path.insert(0, src)
from quotafs import controlsocket
sock = controlsocket.socket_path(mnt, nobody)
try:
    out["socket_owner"] = os.lstat(sock).st_uid
    out["root_set"] = q(0, "set", "--json", mnt, "--limit", "128K")
    out["other_set"] = q(other, "set", mnt, "--limit", "1M")
    out["other_status"] = q(other, "status", "--json", mnt)
    out["owner_status"] = q(nobody, "status", "--json", mnt)
finally:
    out["umount"] = q(nobody, "umount", mnt)
out["socket_left"] = os.path.exists(sock)
out["dir_left"] = os.path.exists(os.path.dirname(sock))
print(json.dumps(out))
"""


def test_root_controls_a_users_mount_and_a_third_user_cannot(nobody_env: NobodyEnv) -> None:
    """The socket of nobody's mount is found by root from the mount point alone; another
    user reads the status but is refused a change in one line."""
    shared = os.path.exists(controlsocket.control_dir(NOBODY))  # other mounts of nobody's
    top = Path(tempfile.mkdtemp(prefix="case-", dir=nobody_env.top))
    try:
        for sub in ("mnt", "run", "tmp"):
            (top / sub).mkdir(mode=0o700)
            os.chown(top / sub, NOBODY, NOBODY)
        top.chmod(0o755)
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
             _USERS_MOUNT, str(top), nobody_env.python, str(nobody_env.src), str(NOBODY),
             "4242"], capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert out["mount"][0] == 0, out
    assert out["socket_owner"] == NOBODY
    assert out["root_set"][0] == 0 and json.loads(out["root_set"][1])["limit"] == 128 << 10
    assert out["other_set"][0] == ExitCode.PERMISSION
    assert "not allowed to change" in out["other_set"][2]
    assert len(out["other_set"][2].splitlines()) == 1
    assert out["other_status"][0] == 0  # the status is public, as df is
    owner = json.loads(out["owner_status"][1])
    assert (owner["limit"], owner["xattrs"]) == (128 << 10, False)
    assert out["umount"][0] == 0
    assert out["socket_left"] is False
    if not shared:  # else another mount of nobody's may hold a socket in it
        assert out["dir_left"] is False  # the last socket's daemon removes the directory


def test_the_api_removes_the_socket_of_a_killed_daemon() -> None:
    m = QuotaMount.start("1M")
    sock = controlsocket.socket_path(m.path, os.geteuid())
    try:
        os.kill(m.pid, signal.SIGKILL)
        m.wait(20)
        assert os.path.exists(sock)  # nobody listens at it any more
    finally:
        m.close()
    assert not os.path.exists(sock)
