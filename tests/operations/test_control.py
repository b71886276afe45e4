"""The control channel's service as the daemon runs it (what the socket carries is
tests/mounts/test_control_socket.py's): status, settings, rules and events, each refused
with its errno and reason, the caller's uid deciding what it may do."""

from __future__ import annotations

import errno
import json
import os

import pytest

from quotafs.daemon import control
from tests.operations.driver import Ctx, FsFactory, InProcessFS, SessionStandIns


async def test_status_reports_the_ledger_and_the_mount(make_fs: FsFactory) -> None:
    fs = make_fs("1M", inodes=10, accounting="blocks")
    await fs.write_file("/a", b"a" * 5000)
    status = await fs.status()
    assert (status["limit"], status["used"], status["inode_limit"], status["inodes_used"]) \
        == (1 << 20, 8192, 10, 1)
    assert (status["accounting"], status["block_size"], status["backing"]) \
        == ("blocks", 4096, fs.backing)
    assert status["open_handles"] == 0


async def test_set_changes_the_limits(fs: InProcessFS) -> None:
    assert await fs.set_limits(limit=8192, inodes=1) == {
        "limit": 8192, "inodes": 1, "reserve": 0}
    await fs.write_file("/a", b"a" * 8192)
    with pytest.raises(OSError) as exc:
        await fs.write_file("/b", b"")
    assert exc.value.errno == errno.ENOSPC
    status = await fs.status()
    assert (status["limit"], status["inode_limit"], status["enospc_count"]) == (8192, 1, 1)
    events = await fs.events()
    assert [(e["kind"], e["op"], e["path"]) for e in events] == [("quota", "create", "/b")]


async def test_a_bad_request_is_einval_with_its_reason(fs: InProcessFS) -> None:
    with pytest.raises(OSError) as exc:
        await fs.set_limits(limit=-1)
    assert exc.value.errno == errno.EINVAL
    assert "limit must be an integer" in exc.value.result["error"]  # type: ignore[attr-defined]
    with pytest.raises(OSError) as exc:
        await fs.add_fault(op=["write"], errno="ENOTANERRNO")
    assert exc.value.errno == errno.EINVAL
    assert "unknown errno name" in exc.value.result["error"]  # type: ignore[attr-defined]
    assert (await fs.status())["limit"] == 1 << 20


async def test_fault_add_answers_the_rule_id(fs: InProcessFS) -> None:
    first = await fs.add_fault(op=["read"], errno="EIO")
    second = await fs.add_fault(op=["write"], errno="EIO", seed=3)
    assert (first["id"], second["id"], second["effective_seed"]) == ("r1", "r2", 3)
    with pytest.raises(OSError) as exc:
        await fs.control(control.FAULT_CLEAR, {"id": "r9"})
    assert exc.value.errno == errno.ENOENT
    assert await fs.control(control.FAULT_CLEAR, {"id": "r1"}) == {"cleared": 1}
    assert (await fs.status())["fault_rules"] == 1


async def test_other_users_may_read_the_status_but_not_change_anything(
        fs: InProcessFS) -> None:
    fs.ctx = Ctx(uid=65534, gid=65534, pid=os.getpid())
    assert (await fs.status())["limit"] == 1 << 20
    for request in (fs.set_limits(limit=None), fs.add_fault(op=["read"], errno="EIO")):
        with pytest.raises(PermissionError):
            await request
    with pytest.raises(PermissionError):
        await fs.events()
    fs.ctx = Ctx.of_this_process()
    assert (await fs.status())["fault_rules"] == 0


async def test_forget_asks_the_kernel_to_drop_its_entries(
        fs: InProcessFS, session_stand_ins: SessionStandIns) -> None:
    await fs.mkdir("/d")
    await fs.write_file("/d/f", b"f")
    answer = await fs.control(control.FORGET, {})
    assert answer["entries"] == 2
    assert sorted(name for _, name in session_stand_ins.invalidated) == [b"d", b"f"]


async def test_user_quotafs_names_are_plain_xattrs_now(fs: InProcessFS) -> None:
    """The control channel left the root's xattrs: such names are stored like any other."""
    with pytest.raises(OSError) as exc:
        await fs.getxattr("/", b"user.quotafs.status")
    assert exc.value.errno == errno.ENODATA
    await fs.setxattr("/", b"user.quotafs.set", b'{"limit": 1}')
    assert os.getxattr(fs.backing, b"user.quotafs.set") == b'{"limit": 1}'
    assert (await fs.status())["limit"] == 1 << 20


async def test_a_malformed_request_is_einval_and_answered(fs: InProcessFS) -> None:
    for line in (b"not json", b"[1]", b'{"request": 3}', b'{"request": "status", "args": 1}',
                 b'{"request": "nope"}', b"[" * 100_000):
        reply = json.loads(fs.ops.control.answer(line, 0))
        assert reply["errno"] == "EINVAL", line[:40]
        assert reply["error"]
    with pytest.raises(OSError) as exc:
        await fs.control(control.EVENTS, {"after": "x"})
    assert exc.value.errno == errno.EINVAL


async def test_xattrs_off_answers_enosys_to_every_xattr_request(
        make_fs: FsFactory) -> None:
    fs = make_fs("1M", xattrs=False)
    await fs.write_file("/a", b"a")
    for call in (fs.getxattr("/a", b"user.x"), fs.setxattr("/a", b"user.x", b"1"),
                 fs.listxattr("/a"), fs.removexattr("/a", b"user.x")):
        with pytest.raises(OSError) as exc:
            await call
        assert exc.value.errno == errno.ENOSYS
    assert os.listxattr(os.path.join(fs.backing, "a")) == []
    assert (await fs.status())["xattrs"] is False
    added = await fs.add_fault(op=["getxattr", "write"], errno="EIO")
    assert added["warnings"] == ["getxattr: the mount has --xattrs off, so the kernel never "
                                 "sends these requests"]
