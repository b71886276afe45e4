"""The Python API beyond one mount: many at once, mounts started from threads and from trio,
and the loop-ext4 reference with QuotaMount's shape."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import threading
import time
from typing import Any

import pytest
import trio

import quotafs
from quotafs.client import api
from quotafs.client.api import Ext4Mount, QuotaMount, mounted, open_quota_mount
from quotafs.errors import ExitCode, QuotafsError
from quotafs.protocol import Event, Limits, RuleStatus, Status, Usage
from tests.conftest import needs_fuse, needs_root

M = 1024 * 1024


def fill(path: str, chunk: int = 64 * 1024) -> int:
    """Write until ENOSPC; return the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, b"x" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return written
    finally:
        os.close(fd)


def test_the_package_exports_the_api_lazily() -> None:
    assert quotafs.ext4_loop is api.ext4_loop
    assert quotafs.Ext4Mount is api.Ext4Mount
    assert quotafs.mounted is api.mounted
    with pytest.raises(AttributeError):
        _ = quotafs.no_such_thing


@needs_fuse
def test_results_are_typed_documents_that_read_as_0_1_0_dicts() -> None:
    with mounted(limit="1M", inodes=10) as m:
        limits = m.set_limit("2M")
        assert isinstance(limits, Limits) and (limits.limit, limits.inodes) == (2 * M, 10)
        status, usage = m.status(), m.usage()
        assert isinstance(status, Status) and isinstance(usage, Usage)
        assert (status.limit, status.pid, status.backing) == (2 * M, m.pid, m.backing)
        assert usage == status.usage() and usage.limit == usage["limit"] == 2 * M
        assert set(usage) == {"limit", "used", "reserved", "free", "root_reserve",
                              "available", "inode_limit", "inodes_used", "enospc_count"}
        rule_id = m.add_fault("mkdir", errno="EROFS", times=1)
        with pytest.raises(OSError):
            os.mkdir(os.path.join(m.path, "d"))
        [rule] = m.faults()
        assert isinstance(rule, RuleStatus)
        assert (rule.id, rule.spec.errno, rule.fired, rule.retired) == (rule_id, "EROFS", 1, True)
        [event] = m.events()
        assert isinstance(event, Event) and (event.kind, event.rule) == ("fault", rule_id)
        assert dict(event) == event.to_dict() and event == event.to_dict()


@needs_fuse
def test_five_mounts_at_once_each_with_its_own_quota() -> None:
    with contextlib.ExitStack() as stack:
        mounts = [stack.enter_context(mounted(limit=(i + 1) * M)) for i in range(5)]
        assert len({m.path for m in mounts}) == len({m.backing for m in mounts}) == 5
        for i, m in enumerate(mounts):
            assert fill(os.path.join(m.path, "f")) == (i + 1) * M
            assert m.usage()["used"] == (i + 1) * M
        paths = [m.path for m in mounts]
    assert not any(os.path.exists(p) for p in paths)


@needs_fuse
def test_five_mounts_concurrently_from_threads() -> None:
    everyone_mounted = threading.Barrier(5, timeout=60)

    def one(i: int) -> tuple[str, int]:
        with mounted(limit=(i + 1) * M) as m:
            everyone_mounted.wait()  # all five are up at the same time
            written = fill(os.path.join(m.path, "f"))
            everyone_mounted.wait()  # and still up while the others fill theirs
            assert m.is_alive()
            return m.path, written

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    assert [written for _, written in results] == [(i + 1) * M for i in range(5)]
    assert not any(os.path.exists(path) for path, _ in results)


@needs_fuse
def test_a_mount_started_in_a_thread_outlives_the_thread() -> None:
    # The daemon dies with its parent (PR_SET_PDEATHSIG), and the kernel's parent is the
    # thread that forked it: the API starts daemons from threads that never end.
    with contextlib.ExitStack() as stack:
        box: list[QuotaMount] = []
        worker = threading.Thread(target=lambda: box.append(
            stack.enter_context(mounted(limit="1M"))))
        worker.start()
        worker.join()
        [m] = box
        assert not worker.is_alive()
        time.sleep(0.3)  # a daemon tied to the thread would be unmounting by now
        assert os.path.ismount(m.path) and m.is_alive()
        with open(os.path.join(m.path, "f"), "wb") as f:  # a round trip to the daemon
            f.write(b"still here")
        assert m.is_alive() and m.usage()["used"] == 4096


@needs_fuse
async def test_open_quota_mount_outlives_trio_worker_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # trio's worker threads retire after IDLE_TIMEOUT (10 s); make that 10 ms.
    from trio._core import _thread_cache

    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.01)
    async with open_quota_mount(limit="1M") as m:
        await trio.sleep(0.5)
        assert m.is_alive()
        assert os.path.ismount(m.path)
        assert m.usage()["limit"] == M


@needs_fuse
async def test_open_quota_mount_five_at_once() -> None:
    paths: list[str] = []

    async def one(i: int, ready: trio.Event) -> None:
        async with open_quota_mount(limit=(i + 1) * M) as m:
            paths.append(m.path)
            ready.set()
            await all_up.wait()
            assert m.usage()["limit"] == (i + 1) * M

    all_up = trio.Event()
    events = [trio.Event() for _ in range(5)]
    async with trio.open_nursery() as nursery:
        for i, event in enumerate(events):
            nursery.start_soon(one, i, event)
        for event in events:
            await event.wait()
        assert all(os.path.ismount(p) for p in paths)
        all_up.set()
    assert not any(os.path.exists(p) for p in paths)


# -- ext4_loop ----------------------------------------------------------------------------

def test_ext4_loop_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(QuotafsError) as info, api.ext4_loop(free="16M"):
        pass
    assert info.value.code == ExitCode.PERMISSION
    assert "ext4_loop needs root" in str(info.value)


def test_ext4_loop_needs_a_size() -> None:
    with pytest.raises(QuotafsError) as info, api.ext4_loop(free=None):  # type: ignore[arg-type]
        pass
    assert info.value.code == ExitCode.USAGE


@needs_root
def test_ext4_loop_has_quotamounts_shape(tmp_path: Any) -> None:
    with api.ext4_loop(free="4M", workdir=str(tmp_path)) as ref:
        assert isinstance(ref, Ext4Mount)
        assert os.path.ismount(ref.path) and ref.path == ref.loop.mountpoint
        assert ref.backing is None and ref.pid is None and ref.is_alive()
        usage = ref.usage()
        with mounted(limit="4M") as q:
            assert set(usage) == set(q.usage())
        assert 4 * M <= usage["limit"] <= 4 * M + 16 * 1024
        assert usage["used"] == 0 and usage["free"] == usage["limit"]
        with open(os.path.join(ref.path, "f"), "wb") as f:
            f.write(b"x" * M)
            os.fsync(f.fileno())
        after = ref.usage()
        assert M <= after["used"] < M + 64 * 1024
        assert after["inodes_used"] == 1
        assert ref.status()["filesystem"] == "ext4"
        assert ref.write_capacity_hint < ref.free_bytes
        for attempt in (lambda: ref.set_limit("8M"), lambda: ref.add_fault("fsync", errno="EIO"),
                        lambda: ref.set_inode_limit(10)):
            with pytest.raises(QuotafsError) as info:
                attempt()
            assert info.value.code == ExitCode.USAGE
            assert "the ext4 reference is a real filesystem" in str(info.value)
        assert ref.faults() == [] and ref.events() == [] and ref.clear_faults() == 0
        with open(os.path.join(ref.path, "g"), "wb") as f:  # never synced: lost at the cut
            f.write(b"y" * 1000)
        ref.power_cut()
        assert sorted(os.listdir(ref.path)) == ["f", "lost+found"] and ref.is_alive()
        assert os.path.getsize(os.path.join(ref.path, "f")) == M
        mountpoint, image = ref.path, ref.loop.image
    assert not os.path.ismount(mountpoint)
    assert not os.path.exists(image)


async def test_trio_controls() -> None:
    import errno

    import trio

    async with open_quota_mount(limit="1M") as m:
        await m.trio.set_limit("2M")
        assert (await m.trio.usage())["limit"] == 2 * M
        rule = await m.trio.add_fault("mkdir", errno="EROFS", times=1)

        def mkdir() -> int:
            try:
                os.mkdir(os.path.join(m.path, "d"))
            except OSError as exc:
                return exc.errno or 0
            return 0

        assert await trio.to_thread.run_sync(mkdir) == errno.EROFS
        [fired] = [e for e in await m.trio.events() if e["kind"] == "fault"]
        assert fired["rule"] == rule
        assert (await m.trio.faults())[0]["retired"] is True
        assert await m.trio.clear_faults() == 1


async def test_trio_crash_and_revive() -> None:
    import errno

    import trio

    async with open_quota_mount(limit="1M", crash_sim=True) as m:
        await m.trio.add_fault("mkdir", crash=True, times=1)

        def mkdir(name: str) -> int:
            try:
                os.mkdir(os.path.join(m.path, name))
            except OSError as exc:
                return exc.errno or 0
            return 0

        assert await trio.to_thread.run_sync(mkdir, "a") == errno.EIO  # the cut
        assert await trio.to_thread.run_sync(mkdir, "b") == errno.EIO  # down
        assert await m.trio.revive() is True
        assert await trio.to_thread.run_sync(mkdir, "c") == 0
        assert sorted(os.listdir(m.path)) == ["c"]
        assert (await m.trio.crash()).crashes == 2
