"""Root's reserve (`--reserve`), as ext4's reserved blocks: other users stop at
limit - reserve and see it in df Avail, root writes on into it. On real mounts, with the
other user a real child process of uid 65534 on an --allow-other mount."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from quotafs.cli import main as cli
from quotafs.client.api import QuotaMount
from quotafs.errors import QuotafsError
from quotafs.model.reserve import resolve_reserve
from quotafs.testing.plugin import OptionError, mount_options
from tests.conftest import MountFactory, needs_root

KiB = 1024
MiB = 1024 * KiB
NOBODY = 65534

def _as(uid: int, fn: Callable[[], object]) -> Any:
    """fn() in a forked child that has become `uid` (real, effective, saved; no groups);
    its JSON-able result. (A fork, not an exec: this venv's Python may not be executable
    by that user.)"""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            if uid != 0:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            os.write(write_end, json.dumps(fn()).encode())
            os._exit(0)
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(out)


def _errno_of(call: Callable[[], object]) -> str | None:
    try:
        call()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return None


def _fill(uid: int, path: str, fd: int | None = None) -> dict[str, Any]:
    """Append 4 KiB writes to `path` (or the open `fd`) as `uid` until an error."""
    def fill() -> dict[str, Any]:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if fd is None \
            else fd
        written = 0
        err = _errno_of(lambda: [os.write(out, b"x" * 4096) for _ in iter(int, 1)])
        written = os.fstat(out).st_size
        return {"written": written, "errno": err}

    result: dict[str, Any] = _as(uid, fill)
    return result


def _shared(m: QuotaMount) -> str:
    """A directory of the mount that the other user may write to."""
    os.chmod(m.path, 0o755)  # mkdtemp's 0700
    d = os.path.join(m.path, "shared")
    os.mkdir(d)
    os.chmod(d, 0o1777)
    return d


def _df(m: QuotaMount) -> tuple[int, int, int]:
    st = os.statvfs(m.path)
    return st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize


@needs_root
def test_other_users_stop_at_limit_minus_reserve_root_writes_on(
        mount_factory: MountFactory) -> None:
    m = mount_factory("1M", reserve="256K", allow_other=True)
    d = _shared(m)
    assert _df(m) == (MiB, MiB - 4 * KiB, MiB - 4 * KiB - 256 * KiB)  # the dir's block
    other = _fill(NOBODY, os.path.join(d, "nobody.dat"))
    assert other["errno"] == "ENOSPC"
    assert m.usage()["used"] == MiB - 256 * KiB  # exactly where the reserve begins
    assert os.stat(os.path.join(d, "nobody.dat")).st_uid == NOBODY
    # df as ext4 shows it: Avail 0 for everyone but root, the reserve still free for root
    assert _df(m) == (MiB, 256 * KiB, 0)
    assert _as(NOBODY, lambda: _errno_of(lambda: os.mkdir(os.path.join(d, "sub")))) \
        == "ENOSPC"
    root = _fill(0, os.path.join(d, "root.dat"))
    assert (root["errno"], root["written"]) == ("ENOSPC", 256 * KiB)
    assert m.usage()["used"] == MiB
    assert os.path.getsize(os.path.join(d, "nobody.dat")) == other["written"]


@needs_root
def test_a_handle_keeps_its_openers_rights(mount_factory: MountFactory) -> None:
    """write(2) carries no caller: the handle's opener decides (here root opens, then the
    writes come from a process that is no longer root through that descriptor)."""
    m = mount_factory("1M", reserve="512K", allow_other=True)
    d = _shared(m)
    _fill(NOBODY, os.path.join(d, "nobody.dat"))
    fd = os.open(os.path.join(d, "root-opened.dat"), os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        assert _fill(NOBODY, "", fd) == {"written": 512 * KiB, "errno": "ENOSPC"}
    finally:
        os.close(fd)
    assert m.usage()["used"] == MiB


@needs_root
def test_set_reserve_live(mount_factory: MountFactory,
                          capsys: pytest.CaptureFixture[str]) -> None:
    m = mount_factory("1M", allow_other=True)
    d = _shared(m)
    assert _df(m)[2] == MiB - 4 * KiB  # default 0: every user gets the whole limit
    assert cli.main(["set", m.path, "--reserve", "50%"]) == 0
    assert "reserve 512.0 KiB" in capsys.readouterr().out
    assert m.usage()["root_reserve"] == 512 * KiB
    assert _df(m)[2] == 512 * KiB - 4 * KiB
    assert _fill(NOBODY, os.path.join(d, "a"))["errno"] == "ENOSPC"
    assert m.usage()["used"] == 512 * KiB
    m.set_reserve("128K")
    assert _fill(NOBODY, os.path.join(d, "b"))["written"] == 384 * KiB
    m.set_reserve(0)
    assert _fill(NOBODY, os.path.join(d, "c"))["written"] == 128 * KiB
    assert m.usage()["used"] == MiB
    assert cli.main(["status", m.path]) == 0
    assert "reserve:      0 B" in capsys.readouterr().out
    assert cli.main(["status", "--json", m.path]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["root_reserve"], status["available"]) == (0, 0)


def test_set_reserve_refuses_what_does_not_fit(mount_factory: MountFactory,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    m = mount_factory("1M", reserve="10%")
    assert m.usage()["root_reserve"] == 25 * 4 * KiB  # 10% of 256 blocks, rounded down
    with pytest.raises(QuotafsError, match="larger than the limit"):
        m.set_reserve("2M")
    with pytest.raises(QuotafsError, match="needs a limit"):
        m.set_limit(None)  # a reserve of an unlimited mount would mean nothing
    assert cli.main(["set", m.path, "--reserve", "5x"]) == 2
    assert "invalid size" in capsys.readouterr().err
    assert m.usage()["root_reserve"] == 100 * KiB and m.usage()["limit"] == MiB
    m.set_limit(2 * MiB)  # a reserve is bytes, as ext4's reserved block count
    assert m.usage()["root_reserve"] == 100 * KiB


def test_reserve_is_validated_before_anything_is_made(
        tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--reserve", "5%"], ["--limit", "1M", "--reserve", "101%"],
                ["--limit", "1M", "--reserve", "2M"], ["--limit", "1M", "--reserve", "x%"]):
        with pytest.raises(SystemExit) as exited:  # argparse exits, main returns
            raise SystemExit(cli.main(["run", *bad, "--", "true"]))
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "reserve" in err, err
    with pytest.raises(OptionError, match="reserve"):
        mount_options({"reserve": "5 percent"})
    assert mount_options({"reserve": "5%"}) == {"reserve": "5%"}


@pytest.mark.quotafs("1M", reserve="25%")
def test_plugin_marker_takes_a_reserve(quota_mount: QuotaMount) -> None:
    assert quota_mount.usage()["root_reserve"] == 256 * KiB
    assert os.statvfs(quota_mount.path).f_bavail * os.statvfs(quota_mount.path).f_frsize \
        == 768 * KiB


def test_percent_counts_whole_blocks_as_mke2fs() -> None:
    # mke2fs: 5% of 131,072 blocks is 6,553 reserved blocks (DESIGN.md fact 9)
    assert resolve_reserve("5%", 131072 * KiB, KiB) == 6553 * KiB
    assert resolve_reserve("0.5 %", 1000, 1) == 5
    assert resolve_reserve("6M", 8 * MiB, 4096) == 6 * MiB
    assert resolve_reserve(None, None, 4096) == resolve_reserve("0%", 1, 1) == 0


# -- --like-ext4 against the recipe's ext4 (truncate -s 128M; mkfs.ext4; mount) ----------

def _ext4_recipe(size: int) -> Any:
    if os.geteuid() != 0:
        pytest.skip("a loop ext4 needs root")
    from quotafs.reference.loopext4 import MIN_FREE, open_ext4_loop

    return open_ext4_loop(MIN_FREE, image_size=size)


def _df_h(path: str) -> list[str]:
    out = subprocess.run(["df", "-h", "--output=size,avail", path], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return out.splitlines()[1].split()


@needs_root
def test_like_ext4_statfs_is_the_recipes_ext4(mount_factory: MountFactory) -> None:
    m = mount_factory(like_ext4="128M")
    mine = os.statvfs(m.path)
    with _ext4_recipe(128 * MiB) as ext4:
        ref = os.statvfs(ext4.mountpoint)
        assert _df_h(m.path) == _df_h(ext4.mountpoint) == ["115M", "106M"]
    same = ("f_bsize", "f_frsize", "f_bfree", "f_bavail", "f_ffree", "f_favail", "f_namemax")
    assert {f: getattr(mine, f) for f in same} == {f: getattr(ref, f) for f in same}
    assert (ref.f_bsize, ref.f_bfree, ref.f_bavail) == (1024, 117189, 108015)  # fact 9
    # What mkfs used itself (root directory, lost+found, reserved inodes) is no part of
    # the limit: quotafs's size and inode count are ext4's free blocks and inodes.
    assert (mine.f_blocks, mine.f_files) == (ref.f_bfree, ref.f_ffree)
    usage = m.usage()
    assert usage["root_reserve"] == 6553 * KiB and usage["free"] == (117189 - 2621) * KiB


@needs_root
def test_like_ext4_writers_stop_where_the_recipes_ext4_stops(
        mount_factory: MountFactory) -> None:
    """4 KiB writes, as another user and then as root, on both: within a few blocks
    (measured: 2 KiB and 1 KiB apart; ext4 spends a block or two on metadata)."""
    m = mount_factory(like_ext4="128M", allow_other=True)
    mine = {uid: _fill(uid, os.path.join(_shared(m), f"{uid}.dat")) for uid in (NOBODY,)}
    with _ext4_recipe(128 * MiB) as ext4:
        d = os.path.join(ext4.mountpoint, "shared")
        os.mkdir(d)
        os.chmod(d, 0o1777)
        ref = {NOBODY: _fill(NOBODY, os.path.join(d, "n.dat"))}
        ref[0] = _fill(0, os.path.join(d, "r.dat"))
    mine[0] = _fill(0, os.path.join(m.path, "shared", "r.dat"))
    for uid in (NOBODY, 0):
        assert ref[uid]["errno"] == mine[uid]["errno"] == "ENOSPC"
        assert abs(int(mine[uid]["written"]) - int(ref[uid]["written"])) <= 8 * KiB, uid


# -- compare and ext4_loop: both views, quotafs sized for the writers' user --------------

@pytest.fixture
def reachable_tmp() -> Any:
    """A work directory that uid 65534 can enter (pytest's tmp_path is below a 0700 dir)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="quotafs-reserve-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_ext4_loop_reports_both_views_and_sizes_quotafs_for_other_users(
        reachable_tmp: str, mount_factory: MountFactory) -> None:
    from quotafs.client.api import ext4_loop

    with ext4_loop(free="8M", workdir=reachable_tmp) as ref:
        u = ref.usage()
        kept = ref.loop.reserved_clusters_bytes
        assert ref.root_reserve_bytes > 0  # a default mkfs.ext4 reserves 5%
        assert u["free"] - u["available"] == ref.root_reserve_bytes + kept
        options = ref.quotafs_options()
        assert options == {"limit": ref.write_capacity_hint,
                           "reserve": ref.root_reserve_bytes}
        d = os.path.join(ref.path, "shared")
        os.mkdir(d)
        os.chmod(d, 0o1777)
        on_ext4 = _fill(NOBODY, os.path.join(d, "n.dat"))
    m = mount_factory(**options, allow_other=True)
    on_quotafs = _fill(NOBODY, os.path.join(_shared(m), "n.dat"))
    assert on_ext4["errno"] == on_quotafs["errno"] == "ENOSPC"
    assert abs(int(on_quotafs["written"]) - int(on_ext4["written"])) <= 8 * KiB
    assert m.usage()["available"] == 0 < m.usage()["free"]


@needs_root
def test_compare_as_user_runs_the_writers_as_that_user(reachable_tmp: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "quotafs", "compare", "--limit", "8M", "--writers", "write",
         "--file-size", "16M", "--chunk", "4K", "--as-user", "nobody", "--json", "--check",
         "--workdir", reachable_tmp], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    ext4 = report["ext4"]
    assert report["writers_user"] == "nobody"
    assert report["quotafs_reserve"] == ext4["root_reserve_bytes"] > 0
    assert ext4["avail_bytes"] == ext4["free_bytes"] - ext4["root_reserve_bytes"] \
        - ext4["reserved_clusters_bytes"]
    acked = {r["target"]: r["bytes_acknowledged"] for r in report["records"]}
    # nobody stops short of root's room on both: at others' room (df Avail)
    assert acked["ext4"] <= ext4["avail_bytes"] < report["quotafs_limit"]
    assert 0 <= acked["quotafs"] - acked["ext4"] <= 4 * KiB
    assert report["matched"]
    assert os.listdir(reachable_tmp) == []


@needs_root
def test_compare_as_user_refuses_what_that_user_cannot_reach(tmp_path: Any) -> None:
    os.chmod(tmp_path, 0o700)
    proc = subprocess.run(
        [sys.executable, "-m", "quotafs", "compare", "--limit", "8M", "--as-user", "nobody",
         "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot enter" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "quotafs", "compare", "--as-user", "no-such-user-x"],
        capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, "quotafs: no such user 'no-such-user-x'\n")


@pytest.mark.parametrize("bad", [False, 0.5, [], "-1", -1, "\u0665%", "5 percent", "x%",
                                 "100.5%"])
def test_bad_reserves_are_one_line(bad: Any) -> None:
    with pytest.raises(QuotafsError) as info:
        resolve_reserve(bad, 1000, 1)
    assert info.value.code == 2 and "\n" not in str(info.value)


@pytest.mark.quotafs(like_ext4="16M")
def test_plugin_marker_takes_like_ext4(quota_mount: QuotaMount) -> None:
    # mkfs.ext4 of 16M: 14,059 free 1 KiB blocks, 819 reserved, 327 kept back; 4,085 inodes
    st = os.statvfs(quota_mount.path)
    assert (st.f_bsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files) == \
        (1024, 14059, 14059, 14059 - 819 - 327, 4085)


async def test_open_quota_mount_takes_and_sets_a_reserve() -> None:
    from quotafs.client.api import open_quota_mount

    async with open_quota_mount(limit="1M", reserve="25%") as m:
        assert (await m.trio.usage())["root_reserve"] == 256 * KiB
        await m.trio.set_reserve("6K")
        assert (await m.trio.usage())["available"] == MiB - 6 * KiB


@needs_root
@pytest.mark.quotafs(like_ext4="16M")
def test_plugin_like_ext4_and_its_ext4_reference(ext4_loop: Any,
                                                 quota_mount: QuotaMount) -> None:
    """The marker's like_ext4 makes ext4_loop the recipe's image of that size."""
    assert ext4_loop.loop.image_size == 16 * MiB
    mine, ref = os.statvfs(quota_mount.path), os.statvfs(ext4_loop.path)
    assert (mine.f_bfree, mine.f_bavail, mine.f_ffree) == (ref.f_bfree, ref.f_bavail,
                                                           ref.f_ffree)


@needs_root
@pytest.mark.parametrize("root_maps_too", [False, True])
def test_mmap_writeback_is_judged_by_the_newest_mapping(mount_factory: MountFactory,
                                                        root_maps_too: bool) -> None:
    """Pages nobody stores through its shared mapping, with only the reserve left: its
    msync fails with ENOSPC, unless root mapped the file after it (the kernel then
    writes back through root's handle). Documented in docs/accounting.md."""
    import mmap

    m = mount_factory("1M", reserve="512K", allow_other=True)
    d = _shared(m)
    _fill(NOBODY, os.path.join(d, "ballast"))
    path = os.path.join(d, "mapped")
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o666))
    os.chown(path, NOBODY, NOBODY)
    mapped_r, mapped_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: nobody maps, dirties, waits, syncs
        code = 3
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            fd = os.open(path, os.O_RDWR)
            os.ftruncate(fd, 64 * KiB)
            mapping = mmap.mmap(fd, 64 * KiB)
            mapping[:] = b"A" * (64 * KiB)
            os.write(mapped_w, b"1")
            os.read(go_r, 1)
            code = 0 if _errno_of(lambda: (mapping.flush(), os.fsync(fd))) is None else 1
        finally:
            os._exit(code)
    os.read(mapped_r, 1)
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, 64 * KiB) if root_maps_too else None
    os.write(go_w, b"1")
    _, status = os.waitpid(pid, 0)
    if mapping is not None:
        mapping.close()
    os.close(fd)
    for end in (mapped_r, mapped_w, go_r, go_w):
        os.close(end)
    assert os.waitstatus_to_exitcode(status) == (0 if root_maps_too else 1)
