"""pytest plugin: quotafs fixtures for any test suite (pytest11 entry point "quotafs").

Installing quotafs is enough; `-p no:quotafs` turns it off, `-p quotafs.testing.plugin` turns it on
under PYTEST_DISABLE_PLUGIN_AUTOLOAD.

    @pytest.mark.quotafs(limit="1M")
    def test_app_survives_a_full_disk(quota_mount):
        ...  # quota_mount.path is a fresh 1 MiB mount; .usage(), .set_limit(), .add_fault()

Fixtures:
  quota_mount      a fresh mount per test; size and options from @pytest.mark.quotafs(...)
  quotafs_factory  make(limit="100M", **options) -> QuotaMount, as many as wanted
  ext4_loop        the real loop-ext4 reference (root), with the marker's limit as free space

Where FUSE cannot be used the fixtures skip the test, with the reason. When a test fails, its
report gets a section per mount: usage, ENOSPC count, fault seed and the recorded events.
A mount still busy at teardown is left mounted, with a QuotafsLeakWarning naming the test,
and removed (lazily) at the end of the session. Docs: docs/testing.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from quotafs.errors import ExitCode, QuotafsError
from quotafs.options import OPTION_NAMES as OPTION_NAMES
from quotafs.options import validate as validate_options
from quotafs.units import format_size, parse_size

if TYPE_CHECKING:
    from quotafs.client.api import Ext4Mount, QuotaMount

__all__ = [
    "DEFAULT_LIMIT",
    "FORCE_NO_FUSE_ENV",
    "FORCE_NO_LOOP_ENV",
    "MARKER",
    "OptionError",
    "QuotafsFactory",
    "QuotafsLeakWarning",
    "ext4_unusable_reason",
    "fuse_unusable_reason",
    "mount_options",
]

MARKER = "quotafs"
DEFAULT_LIMIT = "100M"  # quota_mount and quotafs_factory without a limit; ext4_loop's free space
# Set to anything but "" or "0": the fixtures behave as if FUSE (or loop devices) were
# missing, so a suite's skip path can be tested on a machine that has them.
FORCE_NO_FUSE_ENV = "QUOTAFS_TESTING_FORCE_NO_FUSE"
FORCE_NO_LOOP_ENV = "QUOTAFS_TESTING_FORCE_NO_LOOP"
REPORT_EVENTS = 20  # newest events shown in a failure report
_BUSY_TRIES = 5  # polite unmounts at teardown (busy right after a child exits), ~1 s in all

class QuotafsLeakWarning(UserWarning):
    """A mount made by a fixture outlived its test (busy at teardown, or never torn down)."""


class OptionError(ValueError):
    """An invalid mount option or marker argument; the message is one line for the user."""


# -- options ------------------------------------------------------------------------------

def mount_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate mount options given as keywords (as quotafs.mounted() takes them) and return
    them with sizes in bytes; raise OptionError with one clear line. The check is
    quotafs.options.validate, the one the CLI and the API use."""
    try:
        return validate_options(values)
    except QuotafsError as exc:
        raise OptionError(str(exc)) from None


_MARKER_OPTIONS = pytest.StashKey[dict[str, Any]]()


def _marker_options(item: pytest.Item) -> dict[str, Any]:
    """The item's @pytest.mark.quotafs options, validated; the closest marker wins per key
    (a function's marker over its class's and module's). A bad one fails the test at setup
    with one line, no traceback."""
    if _MARKER_OPTIONS in item.stash:
        return item.stash[_MARKER_OPTIONS]
    merged: dict[str, Any] = {}
    try:
        for mark in reversed(list(item.iter_markers(MARKER))):
            if len(mark.args) > 1:
                raise OptionError("takes one positional argument (the limit) at most, got "
                                  + ", ".join(repr(a) for a in mark.args))
            if mark.args and "limit" in mark.kwargs:
                raise OptionError("limit given twice, as positional and as keyword argument")
            if mark.args:
                merged["limit"] = mark.args[0]
            merged.update(mark.kwargs)
        options = mount_options(merged)
    except OptionError as exc:
        raise pytest.fail.Exception(f"@pytest.mark.{MARKER} on {item.nodeid}: {exc}",
                                    pytrace=False) from None
    item.stash[_MARKER_OPTIONS] = options
    return options


# -- can we? ------------------------------------------------------------------------------

def _forced(env: str) -> bool:
    return os.environ.get(env, "") not in ("", "0")


def fuse_unusable_reason() -> str | None:
    """Why quotafs cannot mount here, or None if it can (checked by opening /dev/fuse)."""
    if _forced(FORCE_NO_FUSE_ENV):
        return f"{FORCE_NO_FUSE_ENV} is set"
    try:
        from quotafs.client import lifecycle
    except ImportError as exc:  # pyfuse3 missing or broken
        return f"quotafs cannot be imported: {exc}"
    try:
        lifecycle.check_fuse()
    except QuotafsError as exc:
        return str(exc)
    return None


def ext4_unusable_reason() -> str | None:
    """Why the loop-ext4 reference cannot be built here, or None if it can."""
    if _forced(FORCE_NO_LOOP_ENV):
        return f"{FORCE_NO_LOOP_ENV} is set"
    if os.geteuid() != 0:
        return "the ext4 reference needs root (it attaches a loop device and mounts ext4)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices here (/dev/loop-control is missing)"
    from quotafs.reference import loopext4
    try:
        loopext4._find_tools()
    except QuotafsError as exc:
        return str(exc)
    return None


def _skip_without_fuse() -> None:
    reason = fuse_unusable_reason()
    if reason is not None:
        pytest.skip(f"quotafs: FUSE is not usable here: {reason}")


# -- the registry of mounts made by fixtures ----------------------------------------------

@dataclass
class _Entry:
    mount: QuotaMount
    own_mountpoint: bool
    remove_backing: bool
    nodeid: str
    made_by: str
    busy: str | None = None  # why teardown left it mounted


_REGISTRY = pytest.StashKey[dict[int, _Entry]]()
_LEAKS = pytest.StashKey[list[str]]()
_ITEM_HANDLES = pytest.StashKey[list["QuotaMount | Ext4Mount"]]()


def _registry(config: pytest.Config) -> dict[int, _Entry]:
    return config.stash.setdefault(_REGISTRY, {})


def _show_to_report(item: pytest.Item, handle: QuotaMount | Ext4Mount) -> None:
    item.stash.setdefault(_ITEM_HANDLES, []).append(handle)


def _mount(request: pytest.FixtureRequest, made_by: str, limit: int | None,
           options: dict[str, Any]) -> _Entry:
    from quotafs.client import api
    opts = dict(options)
    backing = opts.pop("backing", None)
    try:
        mount, own = api._start(limit, backing, None, opts)
    except QuotafsError as exc:
        if exc.code == ExitCode.NO_FUSE:
            raise pytest.skip.Exception(f"quotafs: FUSE is not usable here: {exc}") from None
        raise pytest.fail.Exception(f"{made_by}: cannot mount quotafs: {exc}",
                                    pytrace=False) from None
    entry = _Entry(mount, own, remove_backing=backing is None and not opts.get("keep_backing"),
                   nodeid=request.node.nodeid, made_by=made_by)
    _registry(request.config)[id(entry)] = entry
    _show_to_report(request.node, mount)
    return entry


def _busy_unmount(path: str) -> str | None:
    """Unmount politely; return why not if the mount stays busy, else None (unmounted, or a
    failure other than busy, which api._stop handles with a lazy unmount)."""
    from quotafs.client import lifecycle
    for attempt in range(_BUSY_TRIES):
        try:
            lifecycle.unmount(path)
            return None
        except QuotafsError as exc:
            if lifecycle.find_mount(path) is None:
                return None
            if exc.code != ExitCode.MOUNTPOINT:
                return None
            if attempt == _BUSY_TRIES - 1:
                return str(exc).rsplit(": ", 1)[-1].rstrip(".")  # "target is busy"
            time.sleep(0.1 * (attempt + 1))
    return None


def _release(config: pytest.Config, entry: _Entry) -> None:
    """Fixture teardown: unmount and reap the daemon. A dead daemon's mount (ENOTCONN) is
    unmounted lazily; a busy mount of a live daemon is left for the end of the session."""
    from quotafs.client import api, lifecycle
    mount = entry.mount
    if lifecycle.find_mount(mount.path) is not None:
        if not mount.is_alive():
            with contextlib.suppress(QuotafsError):
                lifecycle.unmount(mount.path, lazy=True)
        else:
            reason = _busy_unmount(mount.path)
            if reason is not None:
                entry.busy = reason
                leak = QuotafsLeakWarning(
                    f"quotafs mount {mount.path} made by {entry.made_by} in {entry.nodeid} "
                    f"is still busy at teardown ({reason}); it stays mounted until the end "
                    "of the session")
                try:
                    warnings.warn(leak, stacklevel=1)
                except QuotafsLeakWarning:  # the user's filters make it an error: one line
                    raise pytest.fail.Exception(f"QuotafsLeakWarning: {leak}",
                                                pytrace=False) from None
                return
    try:
        api._stop(mount, entry.own_mountpoint)
    finally:
        if lifecycle.find_mount(mount.path) is None:  # else the end of the session retries
            _registry(config).pop(id(entry), None)
            if entry.remove_backing:
                shutil.rmtree(mount.backing, ignore_errors=True)


def _reap(entry: _Entry) -> None:
    """End of session: stop the daemon, unmount lazily, remove what the fixture made."""
    from quotafs.client import lifecycle
    mount = entry.mount
    process = mount._process
    if process is not None and process.poll() is None:
        process.terminate()  # the daemon unmounts (lazily, as libfuse does) and exits
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if lifecycle.find_mount(mount.path) is not None:
        with contextlib.suppress(QuotafsError):
            lifecycle.unmount(mount.path, lazy=True)
    if entry.own_mountpoint:
        with contextlib.suppress(OSError):
            os.rmdir(mount.path)
    if entry.remove_backing:
        shutil.rmtree(mount.backing, ignore_errors=True)


# -- fixtures -----------------------------------------------------------------------------

def _default_limit(options: dict[str, Any]) -> int | None:
    """100M, unless like_ext4 gives the limit."""
    return None if options.get("like_ext4") is not None else parse_size(DEFAULT_LIMIT)


_UNSET: Any = object()  # quotafs_factory's limit when not given


@pytest.fixture
def quota_mount(request: pytest.FixtureRequest) -> Iterator[QuotaMount]:
    """A fresh quotafs mount for this test (limit 100M unless @pytest.mark.quotafs says
    otherwise), unmounted after it. Skipped where FUSE cannot be used."""
    options = dict(_marker_options(request.node))
    limit = options.pop("limit") if "limit" in options else _default_limit(options)
    _skip_without_fuse()
    entry = _mount(request, "quota_mount", limit, options)
    yield entry.mount
    _release(request.config, entry)


class QuotafsFactory:
    """quotafs_factory(limit="100M", **options) -> a new live QuotaMount; options as for
    quotafs.mounted() (inodes, accounting, block_size, mmap_sigbus, seed, rules, ...).
    Every mount it made is unmounted when the test ends."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._entries: list[_Entry] = []

    def __call__(self, limit: int | str | None = _UNSET, **options: Any) -> QuotaMount:
        if limit is _UNSET:  # 100M, unless like_ext4 gives the limit
            limit = DEFAULT_LIMIT if options.get("like_ext4") is None else None
        try:
            checked = mount_options({"limit": limit, **options})
        except OptionError as exc:
            raise pytest.fail.Exception(f"quotafs_factory: {exc}", pytrace=False) from None
        entry = _mount(self._request, "quotafs_factory", checked.pop("limit"), checked)
        self._entries.append(entry)
        return entry.mount

    def __repr__(self) -> str:
        return f"<quotafs_factory: {len(self._entries)} mounts: {self.mounts!r}>"

    @property
    def mounts(self) -> list[QuotaMount]:
        """The mounts made so far, oldest first."""
        return [entry.mount for entry in self._entries]

    def _release_all(self) -> None:
        errors: list[BaseException] = []
        for entry in reversed(self._entries):
            try:
                _release(self._request.config, entry)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def quotafs_factory(request: pytest.FixtureRequest) -> Iterator[QuotafsFactory]:
    """make(limit=..., **options) -> QuotaMount, as many as the test wants. Skipped where
    FUSE cannot be used. The marker does not apply: each call says what it wants."""
    _skip_without_fuse()
    factory = QuotafsFactory(request)
    yield factory
    factory._release_all()


@pytest.fixture
def ext4_loop(request: pytest.FixtureRequest) -> Iterator[Ext4Mount]:
    """The real loop-ext4 reference with the marker's limit (default 100M) as free space, torn
    down after the test. Root only: skipped, with the reason, elsewhere."""
    options = _marker_options(request.node)
    reason = ext4_unusable_reason()
    if reason is not None:
        pytest.skip(f"quotafs: no ext4 reference here: {reason}")
    free = options.get("limit")
    free = _default_limit(options) if free is None else free
    image = options.get("like_ext4")  # the recipe's image of that size, as --like-ext4 has
    from quotafs.client import api
    from quotafs.reference.loopext4 import MIN_FREE

    if image is None and free is not None and free < MIN_FREE:
        pytest.fail(f"ext4_loop: the ext4 reference needs at least {format_size(MIN_FREE)} "
                    f"free; the quotafs marker asks for {format_size(free)}", pytrace=False)
    with contextlib.ExitStack() as stack:
        try:
            handle = stack.enter_context(api.ext4_loop(free, image_size=image))
        except QuotafsError as exc:
            if "no free loop device" in str(exc):
                raise pytest.skip.Exception(f"quotafs: no ext4 reference here: {exc}") from None
            raise pytest.fail.Exception(f"ext4_loop: {exc}", pytrace=False) from None
        _show_to_report(request.node, handle)
        yield handle


# -- hooks --------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(limit='{DEFAULT_LIMIT}', **options): size and mount options of the "
        "quota_mount fixture (inodes, accounting, block_size, mmap_sigbus, seed, rules, ...); "
        "limit is also the ext4_loop fixture's free space. See quotafs docs/testing.md")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A bad marker fails its test at setup, even one that uses none of our fixtures.
    if item.get_closest_marker(MARKER) is not None:
        _marker_options(item)


def _describe_quotafs(mount: QuotaMount) -> str:
    if not mount.is_alive():
        process = mount._process
        status = process.returncode if process is not None else "?"
        return (f"the daemon is gone (exit status {status}): no usage to show; requests on "
                "the mount fail with ENOTCONN")
    s = mount.status()
    limit = "no limit" if s["limit"] is None else format_size(s["limit"])
    free = "" if s["limit"] is None else f" ({format_size(s['free'])} free)"
    fired = s.get("faults_fired", 0)
    lines = [f"used {format_size(s['used'])} of {limit}{free}, {s['enospc_count']} ENOSPC from "
             f"the quota, {fired} fault{'' if fired == 1 else 's'} fired "
             f"(fault seed {s.get('seed')})"]
    inodes = f" of {s['inode_limit']}" if s.get("inode_limit") is not None else ""
    lines.append(f"inodes used {s['inodes_used']}{inodes}; accounting {s['accounting']}, "
                 f"mmap_sigbus {s['mmap_sigbus']}; backing {s['backing']}")
    events = mount.events()
    if events:
        shown = events[-REPORT_EVENTS:]
        newest = f", the newest {len(shown)}" if len(shown) < len(events) else ""
        lines.append(f"events ({len(events)}{newest}):")
        from quotafs.client.control import event_line

        lines += ["  " + event_line(e) for e in shown]
    else:
        lines.append("events: none")
    return "\n".join(lines)


def _describe_ext4(handle: Ext4Mount) -> str:
    u = handle.usage()
    return (f"used {format_size(u['used'])} of {format_size(u['limit'])} free at mkfs "
            f"({format_size(u['available'])} for users but root, "
            f"{format_size(u['free'])} free now), inodes used {u['inodes_used']}; "
            f"write capacity hint {format_size(handle.write_capacity_hint)}; "
            f"device {handle.loop.device}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        from quotafs.client.api import QuotaMount

        for handle in item.stash.get(_ITEM_HANDLES, []):
            kind = "quotafs" if isinstance(handle, QuotaMount) else "ext4"
            try:
                text = (_describe_quotafs(handle) if isinstance(handle, QuotaMount)
                        else _describe_ext4(handle))
            except Exception as exc:  # never let the report hide the test's own failure
                text = f"could not read its usage: {exc}"
            report.sections.append((f"{kind} {handle.path}", text))
    return report


@pytest.hookimpl(trylast=True)  # after the runner tore down the last fixtures
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    entries = list(_registry(config).values())
    _registry(config).clear()
    lines = config.stash.setdefault(_LEAKS, [])
    for entry in entries:
        why = (f"busy at teardown: {entry.busy}" if entry.busy is not None
               else "not unmounted by its teardown")
        try:
            _reap(entry)
            done = "daemon stopped, unmounted lazily"
        except Exception as exc:
            done = f"cleanup failed: {exc}"
        line = f"{entry.mount.path} ({entry.made_by} of {entry.nodeid}): {why}; {done}"
        lines.append(line)
        if entry.busy is not None:
            continue  # warned about at its teardown already
        try:
            warnings.warn(QuotafsLeakWarning(f"leaked quotafs mount {line}"), stacklevel=1)
        except QuotafsLeakWarning:
            # filterwarnings=error: tests are over, so fail the session instead.
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(_LEAKS, [])
    if lines:
        terminalreporter.write_sep("=", "quotafs: leaked mounts cleaned up at session end",
                                   yellow=True)
        for line in lines:
            terminalreporter.write_line(line)
