"""Fault rules firing at the handlers, in-process: which request gets which errno, when
(nth, times, path globs), and the other effects (delay, short write, corrupt read)."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from quotafs import protocol as control
from tests.operations.driver import FsFactory, InProcessFS


async def write_errno(fs: InProcessFS, path: str) -> int | None:
    """The errno a one-byte write to `path` (created, opened and closed) gets, or None."""
    try:
        await fs.write_file(path, b"x")
    except OSError as exc:
        return exc.errno
    return None


async def test_an_errno_rule_fails_its_op_only(fs: InProcessFS) -> None:
    await fs.write_file("/a", b"a")
    await fs.add_fault(op=["fsync"], errno="EIO")
    f = await fs.open("/a")
    with pytest.raises(OSError) as exc:
        await fs.fsync(f)
    assert exc.value.errno == errno.EIO
    assert await fs.write(f, 0, b"b") == 1
    await fs.release(f)
    assert await fs.read_file("/a") == b"b"


async def test_nth_fires_on_the_nth_match_only(fs: InProcessFS) -> None:
    await fs.add_fault(op=["create"], errno="EDQUOT", nth=3)
    assert [await write_errno(fs, f"/{i}") for i in range(5)] == [
        None, None, errno.EDQUOT, None, None]
    assert sorted(os.listdir(fs.backing)) == ["0", "1", "3", "4"]
    faults = (await fs.status())["faults_fired"]
    assert faults == 1


async def test_times_retires_the_rule(fs: InProcessFS) -> None:
    await fs.add_fault(op=["mkdir"], errno="EACCES", times=2)
    results = []
    for name in ("a", "b", "c"):
        try:
            await fs.mkdir(f"/{name}")
            results.append(None)
        except OSError as exc:
            results.append(exc.errno)
    assert results == [errno.EACCES, errno.EACCES, None]


async def test_a_path_glob_picks_the_files(fs: InProcessFS) -> None:
    await fs.mkdir("/logs")
    await fs.mkdir("/data")
    await fs.add_fault(op=["write"], path="/logs/**", errno="EIO")
    await fs.add_fault(op=["create"], path="*.tmp", errno="EROFS")
    assert await write_errno(fs, "/logs/app") == errno.EIO
    assert await write_errno(fs, "/data/app") is None
    assert await write_errno(fs, "/data/x.tmp") == errno.EROFS
    assert await write_errno(fs, "/x.tmp") == errno.EROFS
    assert await write_errno(fs, "/x.tmpl") is None


async def test_a_rule_on_rename_matches_either_path(fs: InProcessFS) -> None:
    await fs.mkdir("/keep")
    await fs.write_file("/a", b"a")
    await fs.add_fault(op=["rename"], path="/keep/*", errno="EXDEV")
    with pytest.raises(OSError) as exc:
        await fs.rename("/a", "/keep/a")
    assert exc.value.errno == errno.EXDEV
    await fs.rename("/a", "/b")


async def test_truncate_is_its_own_op(fs: InProcessFS) -> None:
    await fs.write_file("/t", b"t" * 10_000)
    await fs.add_fault(op=["truncate"], errno="EPERM")
    await fs.chmod("/t", 0o600)  # a setattr that is no truncate
    with pytest.raises(PermissionError):
        await fs.truncate("/t", 0)
    assert os.stat(os.path.join(fs.backing, "t")).st_size == 10_000


async def test_a_faulted_write_charges_nothing(fs: InProcessFS) -> None:
    f = await fs.create("/a")
    await fs.add_fault(op=["write"], errno="EIO", times=1)
    with pytest.raises(OSError):
        await fs.write(f, 0, b"x" * 8192)
    assert (await fs.status())["used"] == 0
    assert await fs.write(f, 0, b"x" * 8192) == 8192
    await fs.release(f)
    assert (await fs.status())["used"] == 8192


async def test_short_write(fs: InProcessFS) -> None:
    await fs.add_fault(op=["write"], short_write=4096)
    f = await fs.create("/a")
    assert await fs.write(f, 0, b"x" * 10_000) == 4096
    assert await fs.write(f, 4096, b"y" * 100) == 100  # not longer than the rule's count
    await fs.release(f)
    assert os.stat(os.path.join(fs.backing, "a")).st_size == 4196
    assert (await fs.status())["used"] == 8192


async def test_corrupt_read_flips_what_is_read_not_what_is_stored(fs: InProcessFS) -> None:
    data = bytes(range(256)) * 16
    await fs.write_file("/a", data)
    await fs.add_fault(op=["read"], corrupt_read=True, times=1)
    assert await fs.read_file("/a") != data
    assert await fs.read_file("/a") == data
    with open(os.path.join(fs.backing, "a"), "rb") as f:
        assert f.read() == data


async def test_delay_serves_the_request_late(fs: InProcessFS, autojump_clock: trio.abc.Clock,
                                             ) -> None:
    await fs.add_fault(op=["mkdir"], delay="250ms")
    before = trio.current_time()
    await fs.mkdir("/slow")
    assert trio.current_time() - before == pytest.approx(0.25)
    assert os.path.isdir(os.path.join(fs.backing, "slow"))


async def test_fired_faults_are_events(fs: InProcessFS) -> None:
    await fs.add_fault(op=["unlink"], path="/victim", errno="EBUSY")
    await fs.write_file("/victim", b"v")
    with pytest.raises(OSError):
        await fs.unlink("/victim")
    events = await fs.events()
    assert [(e["kind"], e["op"], e["path"], e["errno"]) for e in events] == [
        ("fault", "unlink", "/victim", "EBUSY")]
    assert events[0]["pid"] == os.getpid()


async def test_the_control_channel_is_never_faulted(fs: InProcessFS) -> None:
    await fs.add_fault(op=["all"], errno="EIO")
    assert (await fs.status())["fault_rules"] == 1
    with pytest.raises(OSError) as exc:
        await fs.statfs()
    assert exc.value.errno == errno.EIO
    await fs.control(control.FAULT_CLEAR, {})
    assert (await fs.status())["fault_rules"] == 0


async def test_rules_given_at_mount(make_fs: FsFactory) -> None:
    fs = make_fs("1M", rules=[{"op": ["create"], "errno": "ENOSPC"}], seed=7)
    assert await write_errno(fs, "/a") == errno.ENOSPC
    assert (await fs.status())["seed"] == 7


# -- durability effects (--crash-sim) -----------------------------------------------------


async def test_a_crash_rule_cuts_before_the_request_and_answers_eio(
        make_fs: FsFactory) -> None:
    cfs = make_fs("4M", crash_sim=True)
    await cfs.write_file("/a", b"a" * 4096)
    f = await cfs.open("/a")
    await cfs.fsync(f)
    await cfs.fsyncdir("/")
    await cfs.add_fault(op=["write"], crash=True, crash_model="ext4", nth=2)
    assert await cfs.write(f, 4096, b"1" * 4096) == 4096  # unsynced: lost at the cut
    with pytest.raises(OSError) as info:
        await cfs.write(f, 8192, b"2" * 4096)  # the cut, before it is carried out
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError):  # close(2): the flush is EIO, the release goes through
        await cfs.release(f)
    assert cfs.ops.inodes.statistics().open_handles == 0
    assert os.path.getsize(os.path.join(cfs.backing, "a")) == 4096
    status = await cfs.status()
    assert (status["crashes"], status["faults_fired"]) == (1, 1)
    assert (await cfs.books())[0] == (await cfs.books())[1]


async def test_drop_unsynced_reverts_the_file_and_matches_only_files_with_unsynced_writes(
        make_fs: FsFactory) -> None:
    cfs = make_fs("4M", crash_sim=True)
    await cfs.add_fault(op=["fsync"], errno="EIO", drop_unsynced=True)
    f = await cfs.create("/wal")
    await cfs.fsyncdir("/")
    await cfs.fsync(f)  # nothing unsynced: the rule does not even match
    await cfs.write(f, 0, b"s" * 100)
    with pytest.raises(OSError) as info:
        await cfs.fsync(f)
    assert info.value.errno == errno.EIO
    assert os.path.getsize(os.path.join(cfs.backing, "wal")) == 0  # dropped
    await cfs.fsync(f)  # the next fsync: 0
    await cfs.release(f)
    [rule] = (await cfs.control("faults", {}))["rules"]
    assert (rule["matched"], rule["fired"]) == (1, 1)


async def test_durability_rules_are_refused_without_crash_sim(fs: InProcessFS) -> None:
    for rule in ({"op": ["write"], "crash": True},
                 {"op": ["fsync"], "errno": "EIO", "drop_unsynced": True}):
        with pytest.raises(OSError) as info:
            await fs.add_fault(**rule)
        assert info.value.errno == errno.EINVAL
    assert (await fs.status())["fault_rules"] == 0
