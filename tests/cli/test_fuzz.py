"""Fuzz the command line and the control channel (issue 10, item 6): whatever the input, no
traceback, an exit code from docs/exit-codes.md, nothing new mounted, and the daemon still
serving afterwards."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotafs.cli import main as cli
from quotafs.client import control, lifecycle
from quotafs.client.api import QuotaMount, mounted
from quotafs.daemon import serve
from quotafs.model.faults import SPEC_KEYS, parse_duration
from quotafs.mountinfo import find_mount
from quotafs.options import MountOptions
from quotafs.protocol import FAULT_ADD, FAULT_CLEAR, SET, STATUS
from tests.conftest import needs_fuse

pytestmark = needs_fuse

DOCS = Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md"
DOCUMENTED = {int(code) for code in re.findall(r"^\| (\d+) +\|", DOCS.read_text(), re.M)}
LIMIT = 4 << 20
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def live() -> Iterator[QuotaMount]:
    with mounted(limit=LIMIT) as m:
        yield m


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("fuzz")
    deep = base / "deep.toml"
    deep.write_text("x = " + "[" * 3000 + "]" * 3000)
    good = base / "good.toml"
    good.write_text('[[rule]]\nop = "fsync"\nerrno = "EIO"\n')
    return {"deep": str(deep), "good": str(good), "missing": str(base / "missing")}


def _reset(m: QuotaMount) -> None:
    m.clear_faults()
    control.set_limits(m.path, limit=LIMIT, inodes=None)


def _assert_serving(m: QuotaMount) -> None:
    assert m.is_alive()
    status = json.loads(os.getxattr(m.path, STATUS))
    assert status["pid"] == m.pid and status["limit"] == LIMIT


# -- the command line ---------------------------------------------------------------------

# Values that have broken an option before, or sit on an edge, besides random text.
EDGES = ["", "0", "-1", "1", "4096", "10M", "1.5G", "0.1K", "\u0661\u0660M", "8E", "16E",
         str(2**63 - 1), str(2**63), str(2**64), "9" * 400, "none", "x,allow_other", "a=b",
         "/dev/zero", "EIO", "ENOSPC", "EWHAT", "write", "read", "all", "open,write", "1ms",
         "0s", "1.5us", "3601s", "/**/**/**/**/**/x", "*.log", "/a/", "[z-a]", "nan", "inf",
         "1e400", "0.5", "2", "r1", "r999", "\n", "\x1b[31m", "blocks", "apparent", "bytes",
         "-", "--", "=", "é" * 50]


def _safe(option: str, value: str) -> bool:
    """Leave out what would legitimately stall the mount: delays beyond 10 ms."""
    if option != "--delay":
        return True
    try:
        return parse_duration(value) <= 10_000
    except ValueError:
        return True


def _subcommands() -> dict[str, list[str]]:
    """Every subcommand the fuzz may run, with the option strings its parser knows."""
    parser = cli.build_parser()
    out: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
                return
        out[" ".join(prefix)] = [s for a in p._actions for s in a.option_strings]

    walk(parser, [])
    # umount would take the live mount away; compare builds a loop ext4; --follow never
    # ends by design.
    for name in ("umount", "unmount", "compare"):
        out.pop(name)
    out["events"].remove("--follow")
    out["events"].remove("-f")
    # sweep runs --setup and --check as shell commands: fuzzed text must not run. (Its
    # baseline mounts before CMD runs, which the fuzz stops.)
    out["sweep"] = [o for o in out["sweep"] if o not in ("--setup", "--check")]
    return out


COMMANDS = _subcommands()


@st.composite
def _argv(draw: st.DrawFn, mountpoint: str, files: dict[str, str]) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    values = st.one_of(st.sampled_from(EDGES + list(files.values())),
                       st.text(max_size=12), st.integers().map(str))
    words: list[str] = []
    for option in draw(st.lists(st.sampled_from(COMMANDS[command]), max_size=5)):
        words.append(option)
        if draw(st.booleans()):
            words.append(draw(values.filter(lambda v, o=option: _safe(o, v))))
    # The mount point is the live mount (mount and run then refuse it after checking the
    # options) or a path that does not exist: nothing new can ever be mounted.
    target = draw(st.sampled_from([mountpoint, files["missing"]]))
    argv = [*command.split(), *words]
    if command == "run":
        return [*argv, "--mountpoint", target, "--", "true"]
    return [*argv, target] if draw(st.integers(0, 9)) else argv


class _WouldMount(Exception):
    pass


def _no_daemon(config: MountOptions, *_: object, **__: object) -> NoReturn:
    """Stands in for starting a daemon: a fuzzed argv that passes every check must not
    mount anything (a drawn mount point such as "" or "/" would be a real directory)."""
    if config.private_backing:
        shutil.rmtree(config.backing_dir, ignore_errors=True)
    raise _WouldMount(config.mountpoint)


def _run_main(argv: list[str]) -> tuple[int, str]:
    """cli.main in this process: (exit code, stderr); an argv that would mount gives 0."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(mock.patch.object(lifecycle, "start_daemon", _no_daemon))
        stack.enter_context(mock.patch.object(serve, "run", _no_daemon))
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        except _WouldMount:
            code = 0
    return code, err.getvalue()


@FUZZ
@given(data=st.data())
def test_cli_fuzz(live: QuotaMount, files: dict[str, str], data: st.DataObject) -> None:
    argv = data.draw(_argv(live.path, files), label="argv")
    try:
        code, stderr = _run_main(argv)  # an exception here is the traceback a user saw
    finally:
        _reset(live)
    assert code in DOCUMENTED, (argv, code, stderr)
    assert "Traceback" not in stderr, (argv, stderr)
    if code != 0:  # the error is one line, the last
        assert stderr.splitlines()[-1].startswith("quotafs"), (argv, stderr)
    assert find_mount(files["missing"]) is None
    _assert_serving(live)


# -- the control channel ------------------------------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                     st.sampled_from([2**63 - 1, 2**63, 2**64, -1, 0, "EIO", "write", "all",
                                      "1ms", "/**/x", "r1", "4K"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_KEYS = st.sampled_from([*SPEC_KEYS, "limit", "inodes", "id", "x"])
_REQUEST = st.dictionaries(_KEYS, _JSON, max_size=5).map(
    lambda d: {k: v for k, v in d.items() if k != "delay" or v in ("1ms", "0s", 5)})
_VALUES = st.one_of(
    _REQUEST.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"[" * 20000, b'{"limit": ' + b"9" * 5000 + b"}", b"\xff\xfe",
                     b'{"limit": 1e999}', b"null", b"[]", b'{"id": null}']),
)


@FUZZ
@given(name=st.sampled_from([SET, FAULT_ADD, FAULT_CLEAR]), value=_VALUES)
def test_control_channel_fuzz(live: QuotaMount, name: bytes, value: bytes) -> None:
    try:
        os.setxattr(live.path, name, value)
    except OSError as exc:
        assert exc.errno in (errno.EINVAL, errno.ENOENT), (name, value, exc)
    finally:
        _reset(live)
    _assert_serving(live)


def test_fuzz_left_nothing(live: QuotaMount) -> None:
    """Runs after the fuzzers (file order): the live mount is the same daemon, serving."""
    _assert_serving(live)
    info = find_mount(live.path)
    assert info is not None and info.is_quotafs
    assert live.faults() == []
