"""The pytest plugin (quotafs.testing), exercised as a user's suite would use it: each test
writes a small test file and runs pytest on it. Anything that mounts runs pytest in a
subprocess, so the inner session's mounts and daemons are its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap

import pytest

from quotafs.client import lifecycle
from quotafs.mountinfo import find_mount
from quotafs.testing.plugin import FORCE_NO_FUSE_ENV, FORCE_NO_LOOP_ENV, OptionError, mount_options
from tests.conftest import needs_fuse, needs_root

pytest_plugins = "pytester"

TIMEOUT = 60

STRICT_INI = """
[pytest]
addopts = --strict-markers
filterwarnings = error
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # In a subprocess: an in-process inner session would find quotafs already imported
    # (PytestAssertRewriteWarning), and mounts belong in a process of their own anyway.
    return pytester.runpytest_subprocess(*args, timeout=TIMEOUT)


def run_mounting(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=textwrap.dedent(source))
    return run(pytester, "-p", "no:cacheprovider", "-rs", *args)


def no_mount_left(paths: list[str]) -> bool:
    return all(find_mount(p) is None and not os.path.exists(p) for p in paths)


def recorded_paths(pytester: pytest.Pytester) -> list[str]:
    return (pytester.path / "paths.txt").read_text().split()


# -- fixtures on real mounts --------------------------------------------------------------

@needs_fuse
def test_quota_mount_gives_enospc_at_the_marker_limit(pytester: pytest.Pytester) -> None:
    pytester.makeini(STRICT_INI)
    result = run_mounting(pytester, """
        import errno, os
        import pytest

        def fill(path):
            written = 0
            with open(path, "wb", buffering=0) as f:
                while True:
                    try:
                        written += f.write(b"x" * 65536)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        return written

        @pytest.mark.quotafs(limit="1M")
        def test_enospc(quota_mount):
            with open("paths.txt", "a") as f:
                print(quota_mount.path, file=f)
            assert fill(os.path.join(quota_mount.path, "f")) == 1 << 20
            usage = quota_mount.usage()
            assert usage["used"] == usage["limit"] == 1 << 20
            assert usage["enospc_count"] >= 1
            st = os.statvfs(quota_mount.path)
            assert st.f_blocks * st.f_frsize == 1 << 20
            quota_mount.set_limit("2M")
            assert fill(os.path.join(quota_mount.path, "g")) == 1 << 20

        def test_default_limit(quota_mount):
            assert quota_mount.usage()["limit"] == 100 << 20

        @pytest.mark.quotafs("512K")
        def test_positional_limit(quota_mount):
            assert quota_mount.usage()["limit"] == 512 << 10

        @pytest.mark.quotafs(limit=None)
        def test_no_limit(quota_mount):
            assert quota_mount.usage()["limit"] is None
    """)
    result.assert_outcomes(passed=4)
    assert no_mount_left(recorded_paths(pytester))


@needs_fuse
def test_marker_options_reach_the_mount(pytester: pytest.Pytester) -> None:
    result = run_mounting(pytester, """
        import errno, os
        import pytest

        pytestmark = pytest.mark.quotafs(limit="2M", inodes=2, seed=7)

        @pytest.mark.quotafs(limit="1M", accounting="apparent", mmap_sigbus=True,
                             block_size="1K", fsname="mytest",
                             rules=[{"op": "fsync", "errno": "EIO", "times": 1}])
        def test_options(quota_mount):
            s = quota_mount.status()
            assert (s["limit"], s["inode_limit"], s["seed"]) == (1 << 20, 2, 7)
            assert (s["accounting"], s["mmap_sigbus"], s["block_size"]) == ("apparent", True,
                                                                            1024)
            assert "fsname=mytest" in s["mount_options"]
            with open(os.path.join(quota_mount.path, "a"), "wb") as f:
                f.write(b"abc")
                with pytest.raises(OSError) as info:
                    os.fsync(f.fileno())
                assert info.value.errno == errno.EIO
            open(os.path.join(quota_mount.path, "b"), "wb").close()
            with pytest.raises(OSError) as info:
                open(os.path.join(quota_mount.path, "c"), "wb")
            assert info.value.errno == errno.ENOSPC
            assert quota_mount.usage()["used"] == 3
            [rule] = quota_mount.faults()
            assert rule["fired"] == 1

        def test_module_marker_applies(quota_mount):
            s = quota_mount.status()
            assert (s["limit"], s["inode_limit"], s["seed"]) == (2 << 20, 2, 7)
            assert s["xattrs"] is True

        @pytest.mark.quotafs(limit="1M", xattrs="off")
        def test_xattrs_off(quota_mount):
            assert quota_mount.status()["xattrs"] is False
            with pytest.raises(OSError) as info:
                os.listxattr(quota_mount.path)
            assert info.value.errno == errno.EOPNOTSUPP
    """)
    result.assert_outcomes(passed=3)


@needs_fuse
def test_quotafs_factory_makes_mounts_with_different_limits(pytester: pytest.Pytester) -> None:
    result = run_mounting(pytester, """
        import os
        import pytest

        @pytest.mark.quotafs(limit="7M")  # not for the factory: each call says what it wants
        def test_two(quotafs_factory, tmp_path):
            backing = tmp_path / "data"
            backing.mkdir()
            (backing / "old").write_bytes(b"x" * 8192)
            small = quotafs_factory("1M")
            big = quotafs_factory(limit="3M", inodes=10, backing=str(backing))
            default = quotafs_factory()
            with open("paths.txt", "w") as f:
                print(small.path, big.path, default.path, file=f)
            assert quotafs_factory.mounts == [small, big, default]
            assert len({small.path, big.path, default.path}) == 3
            assert small.usage()["limit"] == 1 << 20
            assert (big.usage()["limit"], big.usage()["inode_limit"]) == (3 << 20, 10)
            assert big.usage()["used"] == 8192  # what the backing held counts
            assert os.listdir(big.path) == ["old"]
            assert default.usage()["limit"] == 100 << 20
    """)
    result.assert_outcomes(passed=1)
    assert no_mount_left(recorded_paths(pytester))
    # A backing directory that was given is the user's: left in place.
    [data] = list(pytester.path.glob("**/test_two0/data"))
    assert (data / "old").stat().st_size == 8192


# -- wider scopes: one mount shared by a class, a module, a session ----------------------

# Each test records "<test> <mount path> <still mounted?>" of every mount it sees, so the
# outer test can tell which tests shared one and when it went away.
RECORD = """
    from quotafs.mountinfo import find_mount

    def record(name, *mounts):
        with open("paths.txt", "a") as f:
            print(name, *(m.path for m in mounts), file=f)
        # Which of the mounts recorded so far are mounted now.
        with open("paths.txt") as f:
            seen = {path for line in f for path in line.split()[1:]}
        with open("alive.txt", "a") as f:
            print(name, *sorted(p for p in seen if find_mount(p) is not None), file=f)
"""


def recorded(pytester: pytest.Pytester, name: str) -> dict[str, list[str]]:
    lines = (pytester.path / name).read_text().splitlines()
    return {test: rest for test, *rest in (line.split() for line in lines)}


def run_recording(pytester: pytest.Pytester, files: dict[str, str]) -> pytest.RunResult:
    pytester.makepyfile(record=textwrap.dedent(RECORD),
                        **{k: textwrap.dedent(v) for k, v in files.items()})
    pytester.makeini(STRICT_INI)
    return run(pytester, "-p", "no:cacheprovider", "-rs")


@needs_fuse
def test_a_module_scoped_mount_is_shared_by_its_tests_and_released_after_them(
        pytester: pytest.Pytester) -> None:
    result = run_recording(pytester, {"test_a": """
        import os
        import pytest
        from record import record

        pytestmark = pytest.mark.quotafs(limit="3M", inodes=50)

        def test_first(quota_mount_module):
            record("a1", quota_mount_module)
            with open(os.path.join(quota_mount_module.path, "kept"), "wb") as f:
                f.write(b"x" * 4096)

        @pytest.mark.quotafs(limit="1M")  # a test's own marker is not the module's mount's
        def test_second(quota_mount_module, quota_mount):
            record("a2", quota_mount_module, quota_mount)
            assert os.listdir(quota_mount_module.path) == ["kept"]
            usage = quota_mount_module.usage()
            assert (usage["limit"], usage["inode_limit"]) == (3 << 20, 50)
            assert quota_mount.usage()["limit"] == 1 << 20
        """, "test_b": """
        from record import record

        def test_after(quota_mount_module):
            record("b1", quota_mount_module)
            assert quota_mount_module.usage()["limit"] == 100 << 20
        """})
    result.assert_outcomes(passed=3)
    paths = recorded(pytester, "paths.txt")
    alive = recorded(pytester, "alive.txt")
    assert paths["a1"][0] == paths["a2"][0] != paths["b1"][0]  # one mount per module
    assert paths["a2"][1] != paths["a2"][0]  # the function-scoped one is another mount
    # test_a's mount was still there for its second test, gone before test_b ran.
    assert paths["a1"][0] in alive["a2"]
    assert paths["a1"][0] not in alive["b1"]
    assert no_mount_left([p for ps in paths.values() for p in ps])


@needs_fuse
def test_a_session_scoped_mount_is_shared_across_modules(pytester: pytest.Pytester) -> None:
    result = run_recording(pytester, {"test_a": """
        import os
        from record import record

        def test_write(quota_mount_session, quotafs_factory_session):
            extra = quotafs_factory_session("2M", seed=5)
            record("a1", quota_mount_session, extra)
            open(os.path.join(quota_mount_session.path, "from_a"), "w").close()
        """, "test_b": """
        import os
        from record import record

        class TestClass:
            def test_read(self, quota_mount_session, quotafs_factory_session,
                          quota_mount_class):
                record("b1", quota_mount_session, *quotafs_factory_session.mounts,
                       quota_mount_class)
                assert os.listdir(quota_mount_session.path) == ["from_a"]
                assert quota_mount_session.usage()["limit"] == 100 << 20
                [extra] = quotafs_factory_session.mounts
                assert (extra.usage()["limit"], extra.status()["seed"]) == (2 << 20, 5)

            def test_class_mount_shared(self, quota_mount_class):
                record("b2", quota_mount_class)

        def test_outside_the_class(quota_mount_class):
            record("b3", quota_mount_class)
        """})
    result.assert_outcomes(passed=4)
    paths = recorded(pytester, "paths.txt")
    alive = recorded(pytester, "alive.txt")
    assert paths["a1"][:2] == paths["b1"][:2]  # the session's mount and the factory's
    assert paths["b1"][2] == paths["b2"][0] != paths["b3"][0]  # one per class
    assert set(paths["a1"]) <= set(alive["b3"])  # the session's still live at the end
    assert no_mount_left([p for ps in paths.values() for p in ps])


@needs_fuse
def test_a_wide_mount_is_torn_down_after_a_failure_and_shown_in_the_report(
        pytester: pytest.Pytester) -> None:
    result = run_recording(pytester, {"test_a": """
        import os
        import pytest
        from record import record

        pytestmark = pytest.mark.quotafs(limit="1M")

        def test_fails(quota_mount_module):
            record("a1", quota_mount_module)
            os.mkdir(os.path.join(quota_mount_module.path, "dir"))
            assert False, "boom"

        def test_sees_the_same_mount(quota_mount_module):
            record("a2", quota_mount_module)
            assert os.listdir(quota_mount_module.path) == ["dir"]
            raise RuntimeError("and fails too")
        """, "test_b": """
        from record import record

        def test_later(quota_mount):
            record("b1", quota_mount)
        """})
    result.assert_outcomes(passed=1, failed=2)
    paths = recorded(pytester, "paths.txt")
    alive = recorded(pytester, "alive.txt")
    [shared] = {paths["a1"][0], paths["a2"][0]}
    # Each failing test's report shows the module's mount.
    assert result.stdout.str().count(f"- quotafs {shared} -") == 2
    result.stdout.fnmatch_lines(
        ["used 4.0 KiB of 1.0 MiB (1020.0 KiB free), 0 ENOSPC from the quota*"])
    assert shared not in alive["b1"]
    assert no_mount_left([p for ps in paths.values() for p in ps])


@needs_fuse
def test_trio_tests_use_the_fixtures_and_open_quota_mount(pytester: pytest.Pytester) -> None:
    result = run_mounting(pytester, """
        import errno, os
        import pytest, trio
        from quotafs import open_quota_mount
        @pytest.mark.trio
        @pytest.mark.quotafs(limit="1M")
        async def test_fixture(quota_mount, quotafs_factory):
            other = quotafs_factory("2M")
            path = os.path.join(quota_mount.path, "f")
            def write():
                with open(path, "wb") as f:
                    f.write(b"x" * (2 << 20))
            with pytest.raises(OSError) as info:
                await trio.to_thread.run_sync(write)
            assert info.value.errno == errno.ENOSPC
            assert quota_mount.usage()["used"] == 1 << 20
            assert other.usage()["limit"] == 2 << 20

        @pytest.mark.trio
        async def test_open_quota_mount_directly():
            async with open_quota_mount(limit="1M") as m:
                await trio.sleep(0.1)
                assert m.usage()["limit"] == 1 << 20
                assert os.path.ismount(m.path)
            assert not os.path.exists(m.path)
    """)
    result.assert_outcomes(passed=2)


@needs_fuse
def test_trio_mode_suites_work_too(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\naddopts = --strict-markers\n")
    result = run_mounting(pytester, """
        import pytest, trio

        @pytest.mark.quotafs(limit="1M")
        async def test_fixture(quota_mount):
            await trio.sleep(0)
            assert quota_mount.usage()["limit"] == 1 << 20
    """)
    result.assert_outcomes(passed=1)


# -- the failure report -------------------------------------------------------------------

@needs_fuse
def test_a_failing_test_reports_usage_and_events(pytester: pytest.Pytester) -> None:
    result = run_mounting(pytester, """
        import os
        import pytest

        @pytest.mark.quotafs(limit="1M", seed=42)
        def test_fails(quota_mount, quotafs_factory):
            other = quotafs_factory("2M")
            quota_mount.add_fault("fsync", errno="EIO", times=1)
            with open(os.path.join(quota_mount.path, "f"), "wb", buffering=0) as f:
                for _ in range(3):
                    try:
                        f.write(b"x" * (1 << 20))
                    except OSError:
                        pass
                try:
                    os.fsync(f.fileno())
                except OSError:
                    pass
            assert False, "the application lost data"

        @pytest.mark.quotafs(limit="1M")
        def test_passes(quota_mount):
            pass
    """)
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*- quotafs /tmp/quotafs-mnt-* -*",
        "used 1.0 MiB of 1.0 MiB (0 B free), 2 ENOSPC from the quota, 1 fault fired "
        "(fault seed 42)",
        "inodes used 1; accounting blocks, mmap_sigbus False; backing /tmp/quotafs-backing-*",
        "events (3):",
        "  *#1 quota write /f: ENOSPC (quota)",
        "  *#2 quota write /f: ENOSPC (quota)",
        "  *#3 fault fsync /f: errno EIO rule r1",
        "*- quotafs /tmp/quotafs-mnt-* -*",
        "used 0 B of 2.0 MiB (2.0 MiB free), 0 ENOSPC from the quota, 0 faults fired*",
        "*",
        "events: none",
    ])
    assert out.count("ENOSPC from the quota") == 2  # the passing test gets no section


@needs_fuse
def test_the_report_survives_a_dead_daemon(pytester: pytest.Pytester) -> None:
    result = run_mounting(pytester, """
        import os, signal

        def test_daemon_dies(quota_mount):
            os.kill(quota_mount.pid, signal.SIGKILL)
            quota_mount.wait()
            os.listdir(quota_mount.path)
    """)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E * OSError: [[]Errno 107[]] Transport endpoint is not connected*",
        "*- quotafs /tmp/quotafs-mnt-* -*",
        "the daemon is gone (exit status -9): no usage to show; requests on the mount fail "
        "with ENOTCONN",
    ])


# -- bad options: one clear line, no traceback --------------------------------------------

BAD_MARKERS = [
    ('limt="1M"', "unknown option 'limt' (did you mean 'limit'?); the options are limit, "),
    ('limit="1.5X"', "limit: invalid size '1.5X': use bytes or a number with K, M, G, T"),
    ("limit=-1", "limit must not be negative, got -1"),
    ("limit=1.5", "limit must be a size like '10M' or a number of bytes or None (no limit), "
                  "got 1.5 (float)"),
    ('"1M", "2M"', "takes one positional argument (the limit) at most, got '1M', '2M'"),
    ('"1M", limit="2M"', "limit given twice, as positional and as keyword argument"),
    ('accounting="bytes"', "accounting must be 'blocks' or 'apparent', got 'bytes'"),
    ('mmap_sigbus="yes"', "mmap_sigbus must be True or False, got 'yes'"),
    ("inodes=-3", "inodes must be a whole number >= 0 or None, got -3"),
    ("block_size=1000", "block_size must be a power of two >= 512, got 1000"),
    ('rules=[{"op": "fsync"}]', "rules[0]: "),
    ('rules=[{"op": "fsync", "errno": "EWHAT"}]', 'rules[0]: field "errno": '),
    ('rules="fsync"', "rules must be a list of rule dicts, got 'fsync'"),
]


def test_bad_marker_arguments_fail_the_test_with_one_clear_line(
        pytester: pytest.Pytester) -> None:
    tests = "\n".join(
        f"@pytest.mark.quotafs({args})\ndef test_{i}(quota_mount):\n    pass\n"
        for i, (args, _) in enumerate(BAD_MARKERS))
    pytester.makepyfile(test_inner="import pytest\n\n" + tests + textwrap.dedent("""
        @pytest.mark.quotafs(limt="1M")
        def test_without_fixture():
            pass
        """))
    result = run(pytester, "-p", "no:cacheprovider")
    result.assert_outcomes(errors=len(BAD_MARKERS) + 1)
    out = result.stdout.str()
    for i, (_, message) in enumerate(BAD_MARKERS):
        lines = [line for line in out.splitlines()
                 if line.startswith(f"@pytest.mark.quotafs on test_inner.py::test_{i}: ")]
        assert len(lines) == 1, (i, out)
        assert message in lines[0], (message, lines[0])
    assert "@pytest.mark.quotafs on test_inner.py::test_without_fixture: unknown" in out
    assert "Traceback" not in out and "testing.py" not in out
    assert "During handling" not in out


def test_bad_factory_options_fail_the_test_with_one_clear_line(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner="""
        def test_unknown(quotafs_factory):
            quotafs_factory("1M", mmap=True)

        def test_bad_size(quotafs_factory):
            quotafs_factory("lots")
    """)
    result = run(pytester, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*_ test_unknown _*",
        "quotafs_factory: unknown option 'mmap' (did you mean 'mmap_sigbus'?); the options*",
        "*_ test_bad_size _*",
        "quotafs_factory: limit: invalid size 'lots': use bytes or a number with K, M, G, T*",
    ])
    assert "Traceback" not in result.stdout.str()


def test_mount_options_validates_like_the_marker() -> None:
    assert mount_options({"limit": "1M", "block_size": "4K", "backing": None}) == {
        "limit": 1 << 20, "block_size": 4096, "backing": None}
    with pytest.raises(OptionError, match="unknown option 'inode'"):
        mount_options({"inode": 3})


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    pytester.makeini(STRICT_INI)
    pytester.makepyfile(test_inner="""
        import pytest

        @pytest.mark.quotafs(limit="1M")
        def test_uses_no_fixture():
            pass
    """)
    run(pytester, "-p", "no:cacheprovider").assert_outcomes(passed=1)
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.quotafs(limit='100M', **options): size and*"])


# -- skips --------------------------------------------------------------------------------

def test_fixtures_skip_with_a_reason_where_fuse_is_unusable(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_NO_FUSE_ENV, "1")
    monkeypatch.setenv(FORCE_NO_LOOP_ENV, "1")
    pytester.makepyfile(test_inner="""
        import pytest

        @pytest.mark.quotafs(limit="1M")
        def test_mount(quota_mount):
            raise AssertionError("not reached")

        def test_factory(quotafs_factory):
            raise AssertionError("not reached")

        def test_ext4(ext4_loop):
            raise AssertionError("not reached")

        def test_other():
            pass
    """)
    result = run(pytester, "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=3, passed=1)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]1[]] *: quotafs: FUSE is not usable here: "
        "QUOTAFS_TESTING_FORCE_NO_FUSE is set (run `quotafs doctor`)",
        "SKIPPED [[]1[]] *: quotafs: FUSE is not usable here: "
        "QUOTAFS_TESTING_FORCE_NO_FUSE is set (run `quotafs doctor`)",
        "SKIPPED [[]1[]] *: quotafs: no ext4 reference here: QUOTAFS_TESTING_FORCE_NO_LOOP is set "
        "(run `quotafs doctor`)",
    ])


def test_fuse_check_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    from quotafs.errors import ExitCode, QuotafsError
    from quotafs.testing import plugin as testing

    monkeypatch.delenv(FORCE_NO_FUSE_ENV, raising=False)
    monkeypatch.setenv(FORCE_NO_FUSE_ENV, "0")  # "0" means not forced

    def no_fuse() -> None:
        raise QuotafsError("/dev/fuse does not exist: load the fuse module", ExitCode.NO_FUSE)

    monkeypatch.setattr(lifecycle, "check_fuse", no_fuse)
    assert testing.fuse_unusable_reason() == "/dev/fuse does not exist: load the fuse module"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert testing.ext4_unusable_reason() == (
        "the ext4 reference needs root (it attaches a loop device and mounts ext4)")


# -- leaks --------------------------------------------------------------------------------

LEAKY = """
    import os, signal, subprocess
    helpers = []

    def test_leaks_a_busy_mount(quota_mount):
        # A helper left running in the mount keeps it busy past the test.
        proc = subprocess.Popen(["sleep", "60"], cwd=quota_mount.path, start_new_session=True)
        helpers.append(proc)
        with open("leak.txt", "w") as f:
            print(quota_mount.path, proc.pid, file=f)

    def test_kills_its_daemon(quota_mount):
        # A dead daemon (ENOTCONN), and busy too: the teardown unmounts it lazily.
        with open("paths.txt", "w") as f:
            print(quota_mount.path, file=f)
        fd = os.open(quota_mount.path, os.O_RDONLY)
        os.kill(quota_mount.pid, signal.SIGKILL)
        quota_mount.wait()

    def test_later():
        pass
"""


@needs_fuse
@pytest.mark.parametrize("warnings_are_errors", [False, True], ids=["default", "W-error"])
def test_a_leaked_mount_is_cleaned_up_at_session_end_naming_the_test(
        pytester: pytest.Pytester, warnings_are_errors: bool) -> None:
    if warnings_are_errors:
        pytester.makeini(STRICT_INI)
    result = run_mounting(pytester, LEAKY)
    path, pid = (pytester.path / "leak.txt").read_text().split()
    try:
        os.kill(int(pid), 0)  # the helper is still running: the mount really was busy
    finally:
        os.kill(int(pid), signal.SIGKILL)
    out = result.stdout.str()
    if warnings_are_errors:
        # The teardown warning becomes that test's error; the session still cleans up.
        result.assert_outcomes(passed=3, errors=1)
        result.stdout.fnmatch_lines([
            "*ERROR at teardown of test_leaks_a_busy_mount*",
            f"QuotafsLeakWarning: quotafs mount {path} made by quota_mount"
            " in test_inner.py::test_leaks_a_busy_mount is still busy at teardown (target is "
            "busy); it stays mounted until the end of the session",
        ])
        assert result.ret != 0
        assert "Traceback" not in out and "testing.py" not in out
    else:
        result.assert_outcomes(passed=3, warnings=1)
        result.stdout.fnmatch_lines([
            "test_inner.py::test_leaks_a_busy_mount",
            f"*QuotafsLeakWarning: quotafs mount {path} made by quota_mount in "
            "test_inner.py::test_leaks_a_busy_mount is still busy at teardown*",
        ])
        assert result.ret == 0
    result.stdout.fnmatch_lines([
        "*= quotafs: leaked mounts cleaned up at session end =*",
        f"{path} (quota_mount of test_inner.py::test_leaks_a_busy_mount): busy at teardown: "
        "target is busy; daemon stopped, unmounted lazily",
    ])
    assert "test_kills_its_daemon" not in out  # its teardown cleaned up: nothing to report
    assert no_mount_left([path, *recorded_paths(pytester)])


@needs_fuse
def test_a_mount_whose_teardown_failed_is_cleaned_up_at_session_end(
        pytester: pytest.Pytester) -> None:
    result = run_mounting(pytester, """
        from quotafs.client import lifecycle
        from quotafs.errors import QuotafsError

        def test_teardown_breaks(monkeypatch, quota_mount):
            with open("paths.txt", "w") as f:
                print(quota_mount.path, file=f)
            def broken(*args, **kwargs):
                raise QuotafsError("simulated unmount failure")
            # Undone after quota_mount's teardown, which cannot unmount meanwhile.
            monkeypatch.setattr(lifecycle, "unmount", broken)

        def test_later():
            pass
    """)
    result.assert_outcomes(passed=2, errors=1, warnings=1)
    [path] = recorded_paths(pytester)
    result.stdout.fnmatch_lines([
        "*QuotafsError: simulated unmount failure",
        "*= warnings summary =*",
        f"*QuotafsLeakWarning: leaked quotafs mount {path} (quota_mount of "
        "test_inner.py::test_teardown_breaks): not unmounted by its teardown; daemon stopped, "
        "unmounted lazily",
        "*= quotafs: leaked mounts cleaned up at session end =*",
        f"{path} (quota_mount of test_inner.py::test_teardown_breaks): not unmounted by its "
        "teardown; daemon stopped, unmounted lazily",
    ])
    assert no_mount_left([path])


# -- the ext4 reference -------------------------------------------------------------------

@needs_root
@needs_fuse
def test_ext4_loop_fixture_gives_the_requested_free_space(pytester: pytest.Pytester) -> None:
    result = run_mounting(pytester, """
        import os
        import pytest
        from quotafs.errors import QuotafsError

        @pytest.mark.quotafs(limit="8M")
        def test_reference(ext4_loop, quota_mount):
            with open("ext4.txt", "w") as f:
                print(ext4_loop.path, ext4_loop.loop.image, file=f)
            st = os.statvfs(ext4_loop.path)
            assert 8 << 20 <= st.f_bfree * st.f_frsize <= (8 << 20) + 16384
            assert ext4_loop.usage()["limit"] == ext4_loop.free_bytes
            assert quota_mount.usage()["limit"] == 8 << 20  # the same marker, both fixtures
            with pytest.raises(QuotafsError, match="the ext4 reference is a real filesystem"):
                ext4_loop.set_limit("16M")
            with open(os.path.join(ext4_loop.path, "f"), "wb") as f:
                f.write(b"x" * (1 << 20))
            assert False, "show the report"
    """)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*- ext4 /*/mnt -*",
        "used * of 8.0 MiB free at mkfs (* free now), inodes used 1; write capacity hint *",
    ])
    mountpoint, image = (pytester.path / "ext4.txt").read_text().split()
    assert not os.path.ismount(mountpoint) and not os.path.exists(image)
    losetup = subprocess.run(["losetup", "-j", image], capture_output=True, text=True)
    assert losetup.stdout == ""


def test_ext4_loop_fixture_rejects_a_size_ext4_cannot_have(pytester: pytest.Pytester) -> None:
    if os.geteuid() != 0:
        pytest.skip("the size check comes after the root check")
    pytester.makepyfile(test_inner="""
        import pytest

        @pytest.mark.quotafs(limit="100K")
        def test_tiny(ext4_loop):
            pass
    """)
    result = run(pytester, "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert re.search(r"^ext4_loop: the ext4 reference needs at least 1\.0 MiB free; the "
                     r"quotafs marker asks for 100\.0 KiB$", result.stdout.str(), re.M)


def test_the_marker_takes_crash_sim(pytester: pytest.Pytester) -> None:
    pytester.makeini(STRICT_INI)
    result = run_mounting(pytester, """
        import os
        import pytest

        @pytest.mark.quotafs(limit="1M", crash_sim=True)
        def test_cut(quota_mount):
            with open(os.path.join(quota_mount.path, "unsynced"), "wb") as f:
                f.write(b"x" * 100)
            report = quota_mount.crash(model="ext4")
            assert report.lost_names == 1 and report.crashes == 1  # no commit: gone
            assert not os.path.exists(os.path.join(quota_mount.path, "unsynced"))
            assert quota_mount.status().crash_sim

        @pytest.mark.quotafs(limit="1M", crash_sim="yes")
        def test_bad_value(quota_mount):
            pass
    """)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*crash_sim must be True or False, got 'yes'*"])
