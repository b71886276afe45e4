"""Fault rules on real mounts: each effect and trigger fires as specified, and only then."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quotafs.errors import ExitCode
from tests.conftest import MountFactory, needs_root, raw_control


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def errno_of(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_fsync_fails_once_and_the_event_is_recorded(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    rule = m.add_fault("fsync", errno="EIO", times=1)
    fd = os.open(os.path.join(m.path, "db"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        assert errno_of(os.fsync, fd) == errno.EIO
        assert errno_of(os.fsync, fd) == 0
        assert errno_of(os.fsync, fd) == 0
    finally:
        os.close(fd)
    [event] = [e for e in m.events() if e["kind"] == "fault"]
    assert (event["op"], event["path"], event["errno"], event["rule"]) == (
        "fsync", "/db", "EIO", rule)
    [listed] = m.faults()
    assert (listed["fired"], listed["retired"]) == (1, True)


def test_nth_fires_on_the_nth_matching_request_only(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    m.add_fault("open", errno="EACCES", nth=3, path="/x")
    write_file(os.path.join(m.path, "x"), b"1")
    results = [errno_of(lambda: open(os.path.join(m.path, "x"), "rb").close())
               for _ in range(5)]
    assert results == [0, 0, errno.EACCES, 0, 0]


def test_glob_matches_files_created_later_and_nothing_else(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    os.mkdir(os.path.join(m.path, "logs"))
    m.add_fault("write", errno="EROFS", path="/logs/*.log")
    assert errno_of(write_file, os.path.join(m.path, "logs", "new.log"), b"x") == errno.EROFS
    assert errno_of(write_file, os.path.join(m.path, "logs", "new.txt"), b"x") == 0
    assert errno_of(write_file, os.path.join(m.path, "other.log"), b"x") == 0


def test_short_write_reaches_the_application(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    m.add_fault("write", short_write=1000, times=1)
    fd = os.open(os.path.join(m.path, "f"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert os.write(fd, b"a" * 4096) == 1000
        assert os.write(fd, b"b" * 4096) == 4096
    finally:
        os.close(fd)
    assert os.path.getsize(os.path.join(m.backing, "f")) == 5096


def test_corrupt_read_flips_exactly_one_bit(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    data = os.urandom(4096)
    write_file(os.path.join(m.path, "f"), data)
    m.add_fault("read", corrupt_read=True, times=1)
    fd = os.open(os.path.join(m.path, "f"), os.O_RDONLY)
    try:
        got = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    diff = int.from_bytes(got, "big") ^ int.from_bytes(data, "big")
    assert bin(diff).count("1") == 1
    assert (Path(m.backing) / "f").read_bytes() == data  # the disk is untouched


def test_delay_does_not_stall_other_requests(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    write_file(os.path.join(m.path, "slow"), b"s")
    write_file(os.path.join(m.path, "fast"), b"f")
    m.add_fault("open", delay="800ms", path="/slow")
    slow_took: list[float] = []

    def open_slow() -> None:
        start = time.monotonic()
        open(os.path.join(m.path, "slow"), "rb").close()
        slow_took.append(time.monotonic() - start)

    thread = threading.Thread(target=open_slow)
    thread.start()
    time.sleep(0.1)
    start = time.monotonic()
    for _ in range(5):
        open(os.path.join(m.path, "fast"), "rb").close()
    fast_took = time.monotonic() - start
    thread.join()
    assert slow_took[0] >= 0.8
    assert fast_took < 0.5  # served while the slow open waited


def _open_outcomes(m_path: str, count: int) -> list[int]:
    return [errno_of(lambda: open(os.path.join(m_path, "f"), "rb").close())
            for _ in range(count)]


def test_probability_zero_never_one_always(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    write_file(os.path.join(m.path, "f"), b"x")
    m.add_fault("open", errno="EIO", probability=0)
    assert set(_open_outcomes(m.path, 200)) == {0}
    m.clear_faults()
    m.add_fault("open", errno="EIO", probability=1)
    assert set(_open_outcomes(m.path, 50)) == {errno.EIO}


def test_same_seed_same_firing_pattern(mount_factory: MountFactory) -> None:
    patterns = []
    for seed in (1234, 1234, 999):
        m = mount_factory("1M", seed=seed)
        write_file(os.path.join(m.path, "f"), b"x")
        m.add_fault("open", errno="EIO", probability=0.5)
        patterns.append(_open_outcomes(m.path, 64))
    assert patterns[0] == patterns[1]
    assert patterns[0] != patterns[2]
    assert 10 < patterns[0].count(errno.EIO) < 54


def test_after_bytes_fills_a_log_directory(mount_factory: MountFactory) -> None:
    m = mount_factory("10M")
    os.mkdir(os.path.join(m.path, "logs"))
    m.add_fault("write", errno="ENOSPC", path="/logs/**", after_bytes="100K")
    write_file(os.path.join(m.path, "data"), b"d" * 300_000)  # elsewhere: not counted
    fd = os.open(os.path.join(m.path, "logs", "app.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    try:
        while True:
            written += os.write(fd, b"l" * 1000)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    # Requests after the 100 KiB mark fail. (The kernel splits a write(2) at a page that is
    # not cached whole, so the write crossing the mark gets the part up to it.)
    assert 100 * 1024 <= written < 100 * 1024 + 1000


def test_rules_file_at_mount(mount_factory: MountFactory, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('seed = 5\n[[rule]]\nop = "mkdir"\nerrno = "EDQUOT"\n')
    m = mount_factory("1M", rules_file=str(rules))
    assert errno_of(os.mkdir, os.path.join(m.path, "d")) == errno.EDQUOT
    assert m.status()["seed"] == 5


def test_a_rule_at_mount_waits_for_the_first_request_of_a_program(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    # The daemon makes no request on its own mount (it once stat()ed it to time its
    # read-ahead tuning, and that stat used up a one-time getattr rule).
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nop = "getattr"\npath = "/"\nerrno = "EIO"\ntimes = 1\n')
    m = mount_factory("1M", rules_file=str(rules))
    time.sleep(0.5)  # what the daemon does on its own after the mount, it has done
    assert errno_of(os.stat, m.path) == errno.EIO
    assert errno_of(os.stat, m.path) == 0  # used up by our stat, and only by it
    [event] = [e for e in m.events() if e["kind"] == "fault"]
    assert event["op"] == "getattr" and event["pid"] == os.getpid()


def test_bad_rules_and_bad_fault_options_are_one_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nop = "read"\nerrno = "EIO"\n[[rule]]\nop = "write"\n'
                     'errno = "EIO"\nprobability = 1.5\n')
    result = subprocess.run([sys.executable, "-m", "quotafs", "mount", "--rules", str(rules),
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.count("\n") == 1
    assert "rule 2" in result.stderr and "probability" in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--op", "frobnicate", "--errno", "EIO"], "frobnicate"),
    (["--op", "read", "--errno", "ENOTANERRNO"], "ENOTANERRNO"),
    (["--op", "read", "--delay", "soon"], "delay"),
    (["--op", "read", "--errno", "EIO", "--probability", "2"], "between 0 and 1"),
    (["--op", "read", "--short-write", "10"], "write"),
])
def test_fault_add_refuses_bad_rules(mount_factory: MountFactory, args: list[str],
                                     words: str) -> None:
    m = mount_factory("1M")
    result = subprocess.run([sys.executable, "-m", "quotafs", "fault", "add", m.path, *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr
    assert m.faults() == []


def test_fault_commands_on_a_live_mount(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")

    def quotafs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quotafs", *args], capture_output=True,
                              text=True, timeout=60)

    added = quotafs("fault", "add", m.path, "--op", "unlink", "--errno", "EBUSY")
    assert added.returncode == 0 and added.stdout.strip() == "r1"
    write_file(os.path.join(m.path, "f"), b"x")
    assert errno_of(os.unlink, os.path.join(m.path, "f")) == errno.EBUSY
    listing = quotafs("fault", "list", m.path)
    assert "r1: --op unlink --errno EBUSY" in listing.stdout and "fired=1" in listing.stdout
    events = quotafs("events", m.path, "--json")
    assert '"op": "unlink"' in events.stdout
    missing = quotafs("fault", "clear", m.path, "r7")
    assert missing.returncode == ExitCode.USAGE and "r7" in missing.stderr
    assert quotafs("fault", "clear", m.path, "r1").returncode == 0
    os.unlink(os.path.join(m.path, "f"))
    not_quotafs = quotafs("fault", "list", "/")
    assert not_quotafs.returncode == ExitCode.NOT_QUOTAFS


def test_live_limit_change_while_a_writer_runs(mount_factory: MountFactory) -> None:
    m = mount_factory("100M")
    stop = threading.Event()
    outcome: list[int] = []

    def writer() -> None:
        fd = os.open(os.path.join(m.path, "stream"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while not stop.is_set():
                os.write(fd, b"w" * 65536)
        except OSError as exc:
            outcome.append(exc.errno or 0)
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)
    m.set_limit(m.usage()["used"] + 1024 * 1024)
    thread.join(timeout=30)
    stop.set()
    assert outcome == [errno.ENOSPC]
    assert m.usage()["used"] <= m.usage()["limit"]


@needs_root
def test_other_users_cannot_change_settings(mount_factory: MountFactory) -> None:
    m = mount_factory("1M", allow_other=True)
    os.chmod(m.path, 0o777)
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and tries to raise the limit
        code = 1
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            reply = raw_control(m.path, "set", {"limit": 999999999})
            code = 0 if reply.get("errno") == "EPERM" else 3
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert m.usage()["limit"] == 1024 * 1024


def test_rules_follow_renames_of_directories(mount_factory: MountFactory) -> None:
    """Paths are cached per inode: a renamed directory must take its files' paths along."""
    m = mount_factory("1M")
    os.mkdir(os.path.join(m.path, "a"))
    write_file(os.path.join(m.path, "a", "f"), b"1")
    m.add_fault("open", errno="EACCES", path="/b/f")
    assert errno_of(lambda: open(os.path.join(m.path, "a", "f"), "rb").close()) == 0
    os.rename(os.path.join(m.path, "a"), os.path.join(m.path, "b"))
    assert errno_of(lambda: open(os.path.join(m.path, "b", "f"), "rb").close()) == errno.EACCES
    os.rename(os.path.join(m.path, "b"), os.path.join(m.path, "c"))
    assert errno_of(lambda: open(os.path.join(m.path, "c", "f"), "rb").close()) == 0
    [event] = [e for e in m.events() if e["kind"] == "fault"]
    assert (event["op"], event["path"]) == ("open", "/b/f")


def test_a_rule_added_later_fires_on_files_the_daemon_found_quiet(
        mount_factory: MountFactory) -> None:
    """The daemon remembers per inode that no rule can match it; a new rule must count."""
    m = mount_factory("1M")
    os.mkdir(os.path.join(m.path, "d"))
    path = os.path.join(m.path, "d", "f")
    write_file(path, b"1")
    m.add_fault("all", errno="EIO", path="/elsewhere")  # rules exist, none for /d/f
    for _ in range(3):
        os.stat(path)
        assert errno_of(lambda: open(path, "rb").close()) == 0
    m.add_fault("open", errno="EACCES", path="/d/f")
    assert errno_of(lambda: open(path, "rb").close()) == errno.EACCES
    m.add_fault("create", errno="EDQUOT", path="/d/new")
    assert errno_of(write_file, os.path.join(m.path, "d", "new"), b"x") == errno.EDQUOT


def test_rules_on_the_root_directory_and_its_entries(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    m.add_fault("all", errno="EIO", path="/elsewhere")
    write_file(os.path.join(m.path, "top"), b"1")  # quiet: nothing matches /top
    m.add_fault("create", errno="EDQUOT", path="/new")
    assert errno_of(write_file, os.path.join(m.path, "new"), b"x") == errno.EDQUOT
    assert errno_of(write_file, os.path.join(m.path, "other"), b"x") == 0
    assert errno_of(os.listdir, m.path) == 0  # the root itself found quiet
    m.add_fault("opendir", errno="EACCES", path="/")
    assert errno_of(os.listdir, m.path) == errno.EACCES
    [event] = [e for e in m.events() if e["kind"] == "fault" and e["op"] == "create"]
    assert event["path"] == "/new"


def test_enospc_from_the_kth_allocating_write_on(mount_factory: MountFactory) -> None:
    """--allocating --from-nth 3: two allocating writes pass, the third and every later one
    get ENOSPC; overwrites in place do not count and keep working; on disk: what passed."""
    m = mount_factory(None)
    m.add_fault("write", allocating=True, errno="ENOSPC", from_nth=3)
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.pwrite(fd, b"a" * 4096, 0) == 4096  # allocating 1
        assert os.pwrite(fd, b"b" * 4096, 0) == 4096  # overwrite: not counted
        assert os.pwrite(fd, b"c" * 4096, 4096) == 4096  # allocating 2
        assert errno_of(os.pwrite, fd, b"d" * 4096, 8192) == errno.ENOSPC  # 3rd: refused
        assert os.pwrite(fd, b"e" * 100, 10) == 100  # overwrite still works
        assert errno_of(os.pwrite, fd, b"f" * 4096, 65536) == errno.ENOSPC  # and later ones
    finally:
        os.close(fd)
    with open(os.path.join(m.backing, "f"), "rb") as f:
        assert f.read() == b"b" * 10 + b"e" * 100 + b"b" * (4096 - 110) + b"c" * 4096
    [rule] = m.faults()
    assert (rule["matched"], rule["fired"], rule["retired"]) == (4, 2, False)
    assert [e["errno"] for e in m.events() if e["kind"] == "fault"] == ["ENOSPC", "ENOSPC"]


def test_status_counts_peak_usage_and_allocating_writes(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    before = m.status()
    assert (before["peak_used"], before["allocating_writes"]) == (before["used"], 0)
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in range(3):
            os.pwrite(fd, b"x" * 8192, i * 8192)  # three allocating writes, 2 blocks each
        os.pwrite(fd, b"y" * 8192, 0)  # an overwrite: not counted
    finally:
        os.close(fd)
    os.truncate(path, 4096)
    after = m.status()
    assert after["allocating_writes"] == 3
    assert after["peak_used"] == before["used"] + 6 * 4096
    assert after["used"] == before["used"] + 4096  # the truncate gave space back, not the peak
    text = subprocess.run([sys.executable, "-m", "quotafs", "status", m.path], check=True,
                          capture_output=True, text=True, timeout=60).stdout
    peak = after["peak_used"]
    assert f"peak used:    {peak // 1024}.0 KiB ({peak} bytes)  (3 allocating writes since " \
        "the mount)" in text, text
