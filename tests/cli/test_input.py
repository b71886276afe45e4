"""Bad input (issue 10, item 6): one line, a documented exit code, never a traceback, never
a hang — and one validation of the mount options for the CLI, the API and the plugin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quotafs
from quotafs.client import control as client_control
from quotafs.client import lifecycle
from quotafs.daemon.control import ControlChannel
from quotafs.daemon.inodes import TableStats
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.model.faults import FaultEngine, compile_glob, load_rules_toml, spec_from_args
from quotafs.model.ledger import Ledger
from quotafs.mountinfo import find_mount
from quotafs.protocol import FAULT_ADD, MAX_EVENT_PATH, SET
from quotafs.testing.plugin import OptionError, mount_options
from quotafs.units import parse_size
from tests.cli.test_cli_errors import assert_one_line_error
from tests.cli.test_cli_errors import quotafs as run_quotafs
from tests.conftest import MountFactory, needs_fuse, needs_root, raw_control


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    """A mount point for commands that must refuse to mount; should one mount anyway (the
    code before the fix did), it is unmounted at teardown, not left behind."""
    yield tmp_path
    if find_mount(str(tmp_path)) is not None:
        lifecycle.unmount(str(tmp_path), lazy=True)


# -- rules files --------------------------------------------------------------------------


def test_deeply_nested_toml_rules_file_is_one_line(target: Path) -> None:
    rules = target / "deep.toml"
    rules.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    result = run_quotafs("mount", "--rules", str(rules), str(target))
    assert_one_line_error(result, ExitCode.USAGE, "nested too deeply")
    assert find_mount(str(target)) is None


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_rules_file_must_be_a_regular_file(target: Path, special: str) -> None:
    path = special
    if special == "fifo":
        path = str(target / "fifo")
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif special == "dir":
        path = str(target)
    started = time.monotonic()
    result = run_quotafs("mount", "--rules", path, str(target))
    reason = "Is a directory" if special == "dir" else "not a regular file"
    assert_one_line_error(result, ExitCode.USAGE, reason)
    assert time.monotonic() - started < 20


def test_rules_file_size_is_capped(target: Path) -> None:
    rules = target / "big.toml"
    rules.write_text("# padding\n" * 120_000)  # 1.2 MB of comments
    result = run_quotafs("mount", "--rules", str(rules), str(target))
    assert_one_line_error(result, ExitCode.USAGE, "larger than 1024 KiB")


# -- the glob matcher is linear -----------------------------------------------------------


@cache
def _reference_segment(pattern: str, name: str) -> bool:
    """fnmatch-like, by recursion over one segment: the obvious, slow, correct matcher."""
    if not pattern:
        return not name
    head = pattern[0]
    if head == "*":
        return any(_reference_segment(pattern[1:], name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    if head == "?":
        return _reference_segment(pattern[1:], name[1:])
    return head == name[0] and _reference_segment(pattern[1:], name[1:])


@cache
def _reference(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_reference(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and _reference_segment(pattern[0], path[0]) and _reference(
        pattern[1:], path[1:])


def _reference_match(glob: str, path: str) -> bool:
    segments = tuple(path[1:].split("/")) if path else ()
    if "/" not in glob:
        return bool(segments) and _reference_segment(glob, segments[-1])
    return _reference(tuple(glob[1:].split("/")), segments)


_SEGMENT = st.text("ab*?", min_size=1, max_size=5).filter(lambda s: "**" not in s)
_GLOB = st.one_of(
    _SEGMENT,
    st.lists(st.one_of(_SEGMENT, st.just("**")), min_size=1, max_size=6).map(
        lambda parts: "/" + "/".join(parts)))
_PATH = st.lists(st.text("ab", min_size=1, max_size=4), max_size=6).map(
    lambda parts: "".join("/" + p for p in parts))


@given(_GLOB, _PATH)
@settings(max_examples=600, deadline=None)
def test_glob_matcher_agrees_with_the_reference(glob: str, path: str) -> None:
    assert (compile_glob(glob).fullmatch(path) is not None) == _reference_match(glob, path), (
        glob, path, compile_glob(glob).pattern)


@pytest.mark.parametrize(("glob", "path"), [
    ("/**/**/**/**/**/**/**/**/**/**/**/x", "/d" * 20 + "/y"),  # 21.8 s before, in a stat
    ("/**/a/**/a/**/a/**/a/**/a/**/b", "/a" * 60),
    ("*a*a*a*a*a*a*a*a*a*b", "/" + "a" * 250),
    ("/**/*a*a*a*a*a*b/**/x", "/" + "a" * 200 + "/c" * 40),
])
def test_glob_match_time_is_linear(glob: str, path: str) -> None:
    engine = FaultEngine(seed=1)
    engine.add(spec_from_args("getattr", path=glob, errno="EIO"))
    started = time.perf_counter()
    for _ in range(10):
        assert engine.check("getattr", path) is None
    assert time.perf_counter() - started < 0.5


def test_over_long_globs_are_refused() -> None:
    with pytest.raises(QuotafsError, match="longer than 4096 characters"):
        spec_from_args("open", path="/" + "a" * 5000, errno="EIO")


# -- fault rules and events past 64 KiB ---------------------------------------------------


@needs_fuse
def test_fault_list_pages_past_64k(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    for i in range(40):  # 40 rules of ~4 KiB each: 160 KiB of listing
        m.add_fault("open", path=f"/{i}-" + "p" * 4000, errno="EIO")
    assert [r["id"] for r in m.faults()] == [f"r{i}" for i in range(1, 41)]
    result = run_quotafs("fault", "list", m.path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 41  # seed line + one per rule
    listed = json.loads(run_quotafs("fault", "list", "--json", m.path).stdout)
    assert len(listed["rules"]) == 40


def _channel() -> ControlChannel:
    return ControlChannel(Ledger(None, None), {}, os.geteuid(), FaultEngine(seed=1),
                          statistics=lambda: TableStats(0, 0, 0), forget_cached=lambda: 0)


def test_an_over_long_event_path_is_cut_and_hides_nothing() -> None:
    control = _channel()
    control.record_quota_hit("write", "/" + "\u00e9" * 70_000)  # 420 KB as JSON
    control.record_quota_hit("write", "/after")
    events = control.events_after(0)["events"]
    assert [e["seq"] for e in events] == [1, 2]
    # Cut to MAX_EVENT_PATH characters, each at most 12 as JSON (an escaped surrogate pair).
    assert len(json.dumps(events)) < 13 * MAX_EVENT_PATH
    assert events[0]["path"].endswith("...[65905 more]")
    assert events[1]["path"] == "/after"


# -- fault options -------------------------------------------------------------------------


@needs_fuse
def test_short_write_0_is_refused_and_records_no_quota_event(
        mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    result = run_quotafs("fault", "add", m.path, "--op", "write", "--short-write", "0")
    assert_one_line_error(result, ExitCode.USAGE, "--short-write: must be at least 1 byte")
    with pytest.raises(QuotafsError) as info:  # the control channel refuses it as well
        client_control.request(m.path, FAULT_ADD, {"op": "write", "short_write": 0})
    assert info.value.code == ExitCode.USAGE
    assert "must be at least 1 byte" in str(info.value)
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(b"x" * 8192)
    assert m.faults() == [] and m.events() == []
    assert m.usage()["enospc_count"] == 0


@pytest.mark.parametrize("value", ["\u0661\u0660", "\u0663"])
def test_counts_in_rules_are_ascii(value: str) -> None:
    with pytest.raises(QuotafsError, match="must be a whole number"):
        spec_from_args("open", errno="EIO", times=value)
    with pytest.raises(QuotafsError):
        spec_from_args("open", delay=value + "ms")


# -- events as text ------------------------------------------------------------------------


def test_escape_name_as_ls_b() -> None:
    assert printable("/a\nb\x1b[31mred\\x\t é") == "/a\\nb\\033[31mred\\\\x\\t é"
    assert printable(os.fsdecode(b"/\xff")) == "/\\377"


@needs_fuse
def test_text_events_escape_newlines_and_terminal_escapes(
        mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    m.add_fault("create", errno="EIO")
    name = "evil\n12:00:00.000 #99 quota write fake: ENOSPC\x1b]0;owned\x07"
    with pytest.raises(OSError):
        open(os.path.join(m.path, name), "w").close()
    result = run_quotafs("events", m.path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "/evil\\n12:00:00.000 #99" in lines[0] and "\\033]0;owned\\a" in lines[0]
    json_event = json.loads(run_quotafs("events", "--json", m.path).stdout)
    assert json_event["path"] == "/" + name  # JSON keeps the name exact


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["\u0661\u0660M", "10M\n", "\u200910M", "1e3", "\u0663"])
def test_sizes_are_ascii(target: Path, text: str) -> None:
    with pytest.raises(QuotafsError, match="invalid size"):
        parse_size(text)
    result = run_quotafs("mount", "--limit", text, str(target))
    assert_one_line_error(result, ExitCode.USAGE, "invalid size")


@pytest.mark.parametrize("text", ["8E", str(2**63), str(2**64), "16777216T", "9" * 5000])
def test_limits_of_2_63_and_more_are_refused(target: Path, text: str) -> None:
    result = run_quotafs("mount", "--limit", text, str(target))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    result = run_quotafs("mount", "--inodes", text, str(target))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert find_mount(str(target)) is None


@pytest.mark.parametrize("option", ["limit", "inodes"])
def test_api_refuses_2_63_before_mounting(option: str) -> None:
    with pytest.raises(QuotafsError) as info, quotafs.mounted(**{option: 2**64}):
        pass
    assert info.value.code == ExitCode.USAGE and "2^63-1" in str(info.value)


@needs_fuse
def test_set_refuses_2_63(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    assert_one_line_error(run_quotafs("set", m.path, "--limit", str(2**64)), ExitCode.USAGE,
                          "2^63-1")
    assert_one_line_error(run_quotafs("set", m.path, "--inodes", str(2**63)), ExitCode.USAGE,
                          "2^63-1")
    with pytest.raises(QuotafsError, match="2\\^63-1"):
        m.set_limit(2**64)
    assert raw_control(m.path, SET, {"limit": 2**64})["errno"] == "EINVAL"
    os.statvfs(m.path)  # df still answers
    assert m.usage()["limit"] == 1 << 20


# -- output -------------------------------------------------------------------------------


@needs_fuse
def test_status_into_a_closed_pipe_exits_quietly(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    for command in (["status", m.path], ["fault", "list", m.path], ["events", m.path]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # `| head` that has already gone
        try:
            result = subprocess.run([sys.executable, "-m", "quotafs", *command],
                                    stdout=write_end, stderr=subprocess.PIPE, text=True,
                                    timeout=60)
        finally:
            os.close(write_end)
        if command[0] == "events":
            assert result.returncode == 0  # no events: nothing written, nothing broken
            continue
        assert result.returncode == ExitCode.BROKEN_PIPE, result.stderr
        assert result.stderr == ""


@needs_fuse
def test_unlimited_prints_as_unlimited(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    result = run_quotafs("set", m.path, "--limit", "none")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("limit none, used ") and "free unlimited" in result.stdout
    assert "PiB" not in result.stdout
    status = run_quotafs("status", m.path).stdout
    assert re.search(r"^free: +unlimited$", status, re.M), status


@needs_fuse
@pytest.mark.parametrize("sigbus", [False, True])
def test_status_shows_reservations_only_with_mmap_sigbus(
        mount_factory: MountFactory, sigbus: bool) -> None:
    m = mount_factory("1M", mmap_sigbus=sigbus)
    status = run_quotafs("status", m.path).stdout
    assert ("reserved:" in status) is sigbus, status
    assert "mmap sigbus:  " + ("on" if sigbus else "off") in status


@needs_root
def test_compare_workdir_missing(tmp_path: Path) -> None:
    result = run_quotafs("compare", "--workdir", str(tmp_path / "missing"))
    assert_one_line_error(result, ExitCode.USAGE, "--workdir")


# -- one validation of mount options, before any side effect ------------------------------


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory for this test alone: what a failed mount leaves is seen here."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(("options", "message"), [
    ({"limit": "10X"}, "limit: invalid size '10X'"),
    ({"accounting": "bogus"}, "accounting must be 'blocks' or 'apparent', got 'bogus'"),
    ({"block_size": 1000}, "block_size must be a power of two >= 512, got 1000"),
    ({"fsname": "x,allow_other"}, "fsname must not contain commas"),
    ({"limit": 2**63}, "limit is too large: at most 2^63-1"),
    ({"inodes": 2**64}, "inodes is too large: at most 2^63-1"),
    ({"rules": [{"op": "write", "short_write": 0}]}, "must be at least 1 byte"),
])
def test_api_validates_before_making_anything(private_tmp: Path, options: dict[str, object],
                                              message: str) -> None:
    with pytest.raises(QuotafsError) as info, quotafs.mounted(**options):  # type: ignore[arg-type]
        pass
    assert info.value.code == ExitCode.USAGE
    assert message in str(info.value)
    assert list(private_tmp.iterdir()) == []  # neither a mount point nor a backing dir
    with pytest.raises(OptionError) as plugin:  # the plugin says the same
        mount_options(options)
    assert str(plugin.value) == str(info.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--limit", "10X"], "limit: invalid size '10X'"),
    (["--accounting", "bogus"], "accounting must be 'blocks' or 'apparent', got 'bogus'"),
    (["--block-size", "1000"], "block_size must be a power of two >= 512, got '1000'"),
    (["--inodes", "-3"], "inodes must be a whole number >= 0 or None, got '-3'"),
    (["--fsname", "x,allow_other"], "fsname must not contain commas"),
    (["--fsname", "x,ro"], "fsname must not contain commas"),
    (["--fsname", "a=b"], "fsname must not contain commas"),
    (["--fsname", ""], "fsname must be a non-empty string"),
])
def test_cli_says_what_the_api_says(target: Path, argv: list[str], message: str) -> None:
    for command in (["mount", *argv, str(target)], ["run", *argv, "--", "true"]):
        result = run_quotafs(*command)
        assert_one_line_error(result, ExitCode.USAGE, message)
    assert find_mount(str(target)) is None


def test_mount_options_round_trip(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text('seed = 7\n[[rule]]\nop = "fsync"\nerrno = "EIO"\n')
    checked = mount_options({"limit": "1M", "rules_file": str(rules), "inodes": "5"})
    assert checked == {"limit": 1 << 20, "inodes": 5, "seed": 7,
                       "rules": [{"op": ["fsync"], "errno": "EIO"}]}
    assert mount_options(checked) == checked  # validating again changes nothing


def test_nested_toml_in_memory() -> None:
    with pytest.raises(QuotafsError, match="nested too deeply"):
        load_rules_toml("a = " + "[" * 3000 + "]" * 3000)
