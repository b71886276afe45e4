"""One MountOptions for the CLI, the API, the plugin and the daemon (issue 11): every option
checked by one table, the same bad input refused with the same one-line message by
`quotafs mount`, `quotafs.mounted()` and the plugin, before anything is made."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quotafs
from quotafs.cli.main import build_parser
from quotafs.client import lifecycle
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.mountinfo import find_mount
from quotafs.options import OPTION_NAMES, SETTABLE, MountOptions, check_settings, validate
from quotafs.testing.plugin import OptionError, mount_options

# option -> (a good raw value, what it becomes), (a bad raw value, words of its message)
TABLE: dict[str, tuple[tuple[Any, Any], tuple[Any, str]]] = {
    "limit": (("10M", 10 << 20), ("10X", "limit: invalid size '10X'")),
    "inodes": (("5", 5), ("-3", "inodes must be a whole number >= 0 or None, got '-3'")),
    "accounting": (("apparent", "apparent"),
                   ("bogus", "accounting must be 'blocks' or 'apparent', got 'bogus'")),
    "block_size": (("4K", 4096),
                   ("1000", "block_size must be a power of two >= 512, got '1000'")),
    "reserve": (("5%", "5%"), ("x%", "invalid reserve 'x%': a percentage like 5% or 0.5%")),
    "like_ext4": (("16M", 16 << 20), ("big", "like_ext4: invalid size 'big'")),
    "kept_back": ((8192, 8192), (-1, "kept_back must not be negative, got -1")),
    "mmap_sigbus": ((True, True), ("yes", "mmap_sigbus must be True or False, got 'yes'")),
    "seed": (("7", 7), ("x", "seed must be a whole number >= 0 or None, got 'x'")),
    "rules": (([{"op": "fsync", "errno": "EIO"}], [{"op": ["fsync"], "errno": "EIO"}]),
              ([{"op": "write", "short_write": 0}], "must be at least 1 byte")),
    "rules_file": ((None, None), ("/nonexistent/rules.toml", "/nonexistent/rules.toml")),
    "log_file": (("/var/log/q.log", "/var/log/q.log"), (3, "log_file must be a path, got 3")),
    "backing": ((Path("/srv/b"), "/srv/b"), ("a\0b", "backing must be a path")),
    "keep_backing": ((True, True), (1, "keep_backing must be True or False, got 1")),
    "allow_other": ((True, True), (1, "allow_other must be True or False, got 1")),
    "no_cache": ((True, True), (1, "no_cache must be True or False, got 1")),
    "fsname": (("mytest", "mytest"), ("x,ro", "fsname must not contain commas")),
    "debug": ((True, True), (1, "debug must be True or False, got 1")),
    "xattrs": (("off", False), ("maybe", "xattrs must be 'on' or 'off' (or True/False), "
                                         "got 'maybe'")),
    "crash_sim": ((True, True), ("on", "crash_sim must be True or False, got 'on'")),
}
# The mount flag of each option whose bad value argv can carry (flags without a value
# cannot be wrong; a path cannot hold NUL).
FLAGS = {"limit": "--limit", "inodes": "--inodes", "accounting": "--accounting",
         "block_size": "--block-size", "reserve": "--reserve", "like_ext4": "--like-ext4",
         "seed": "--seed", "rules_file": "--rules", "fsname": "--fsname",
         "xattrs": "--xattrs"}
STARTER_FIELDS = {"mountpoint", "private_backing", "die_with_parent"}


def test_the_table_covers_every_option_and_every_field() -> None:
    assert set(TABLE) == set(OPTION_NAMES)
    fields = {field.name for field in dataclasses.fields(MountOptions)}
    assert fields - STARTER_FIELDS == set(OPTION_NAMES) - {"rules_file"}


def test_every_mount_flag_is_an_option() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("mount", "run"):
        parser = sub.choices[command]  # type: ignore[index]
        dests = {a.dest for a in parser._actions if a.option_strings} - {"help"}
        local = {"fg", "quiet"} if command == "mount" else {"cd", "mountpoint", "quiet"}
        assert dests - local == set(OPTION_NAMES) - {"kept_back", "rules", "log_file"}
        for name, flag in FLAGS.items():
            assert flag in next(a for a in parser._actions if a.dest == name).option_strings


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_a_good_value(name: str) -> None:
    (given, normalised), _ = TABLE[name]
    if name == "rules_file":
        return  # read into rules: test_rules_file_is_read_into_rules
    options = MountOptions.from_values({name: given})
    assert options.value(name) == normalised
    assert validate({name: given}) == {name: normalised}
    assert validate(validate({name: given})) == {name: normalised}  # again: no change


def test_rules_file_is_read_into_rules(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text('seed = 7\n[[rule]]\nop = "fsync"\nerrno = "EIO"\n')
    options = MountOptions.from_values({"rules_file": str(rules),
                                        "rules": [{"op": "read", "errno": "EIO"}]})
    assert [rule.ops for rule in options.rules] == [("fsync",), ("read",)]  # file's first
    assert options.seed == 7
    assert MountOptions.from_values({"rules_file": str(rules), "seed": 1}).seed == 1


@pytest.fixture
def nothing_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory for this test alone, and no daemon may start."""
    def no_daemon(*_: object, **__: object) -> NoReturn:
        raise AssertionError("a daemon was started for options that are wrong")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(lifecycle, "start_daemon", no_daemon)
    return tmp_path


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_a_bad_value_is_one_message_everywhere(name: str, nothing_made: Path) -> None:
    _, (bad, words) = TABLE[name]
    with pytest.raises(QuotafsError) as info:
        MountOptions.from_values({name: bad})
    message = str(info.value)
    assert info.value.code == ExitCode.USAGE and words in message and "\n" not in message
    with pytest.raises(QuotafsError) as api, quotafs.mounted(**{name: bad}):
        pass
    assert (api.value.code, str(api.value)) == (ExitCode.USAGE, message)
    assert list(nothing_made.iterdir()) == []  # neither a mount point nor a backing dir
    with pytest.raises(OptionError) as plugin:
        mount_options({name: bad})
    assert str(plugin.value) == message


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_the_cli_says_it_too(name: str, tmp_path: Path) -> None:
    _, (bad, _words) = TABLE[name]
    with pytest.raises(QuotafsError) as info:
        MountOptions.from_values({name: bad})
    result = subprocess.run([sys.executable, "-m", "quotafs", "mount", FLAGS[name], bad,
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (
        ExitCode.USAGE, f"quotafs: {printable(str(info.value))}\n")
    assert find_mount(str(tmp_path)) is None


@pytest.mark.parametrize(("values", "words"), [
    ({"reserve": "5%"}, "--reserve 5% needs a limit"),
    ({"limit": "1M", "reserve": "2M"}, "larger than the limit"),
    ({"like_ext4": "16M", "block_size": "1K"}, "--like-ext4 sets the block size"),
])
def test_combinations_are_refused_before_anything_is_made(
        values: dict[str, Any], words: str, nothing_made: Path) -> None:
    options = MountOptions.from_values(values)  # each value is fine alone
    with pytest.raises(QuotafsError) as info:
        options.resolve()
    assert info.value.code == ExitCode.USAGE and words in str(info.value)
    with pytest.raises(QuotafsError) as api, quotafs.mounted(**values):
        pass
    assert str(api.value) == str(info.value)
    assert list(nothing_made.iterdir()) == []


def test_unknown_options_are_named() -> None:
    for values in ({"inode": 3}, {"mountpoint": "/m"}, {"private_backing": True}):
        with pytest.raises(QuotafsError, match=r"unknown option .*; the options are limit, "):
            MountOptions.from_values(values)


def test_resolved_options_cross_to_the_daemon_unchanged() -> None:
    options = MountOptions.from_values({"limit": "1M", "reserve": "10%", "fsname": "t",
                                        "rules": [{"op": "fsync", "errno": "EIO"}]})
    resolved = options.resolve()
    assert (resolved.reserve, resolved.block_size, resolved.kept_back) == (25 * 4096, 4096, 0)
    assert resolved.seed is not None and resolved.resolve() == resolved
    config = resolved.placed("/m", "/b", private_backing=True, die_with_parent=True)
    assert MountOptions.from_json(config.to_json()) == config
    assert (config.backing_dir, config.reserve_bytes, config.block_bytes) == (
        "/b", 25 * 4096, 4096)


def test_set_checks_as_mount_does() -> None:
    for name in SETTABLE:
        _, (bad, _words) = TABLE[name]
        with pytest.raises(QuotafsError) as mount_error:
            MountOptions.from_values({name: bad})
        with pytest.raises(QuotafsError) as set_error:
            check_settings({name: bad})
        assert str(set_error.value) == str(mount_error.value)
    assert check_settings({"limit": "2M", "inodes": None, "reserve": "5%"}) == {
        "limit": 2 << 20, "inodes": None, "reserve": "5%"}
    with pytest.raises(QuotafsError, match="accounting cannot be changed on a live mount"):
        check_settings({"accounting": "apparent"})


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2**65), st.floats(allow_nan=False),
    st.text(max_size=8), st.lists(st.dictionaries(st.sampled_from(["op", "errno", "times"]),
                                                  st.sampled_from(["write", "EIO", 0, 2])),
                                  max_size=2),
    st.sampled_from(["10M", "0", "5%", "101%", "4K", "1000", "x,ro", "blocks", "apparent",
                     "none", str(2**63), "\u0661\u0660M", "/a", "", Path("/p")]))


@given(st.dictionaries(st.sampled_from([*OPTION_NAMES, "limt", "mountpoint"]).filter(
    lambda name: name != "rules_file"), _VALUES, max_size=6))
@settings(max_examples=500, deadline=None)
def test_any_values_are_options_or_one_usage_line(values: dict[str, Any]) -> None:
    try:
        options = MountOptions.from_values(values)
    except QuotafsError as exc:
        assert exc.code == ExitCode.USAGE and "\n" not in str(exc)
        return
    assert MountOptions.from_json(options.to_json()) == options
    assert validate(validate(values)) == validate(values)
    if options.like_ext4 is None:  # like_ext4 would run mkfs.ext4
        try:
            resolved = options.resolve()
        except QuotafsError as exc:
            assert exc.code == ExitCode.USAGE and "\n" not in str(exc)
        else:
            assert isinstance(resolved.reserve, int) and resolved.resolve() == resolved
