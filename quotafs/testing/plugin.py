"""pytest plugin: quotafs fixtures for any test suite (pytest11 entry point "quotafs").

Installing quotafs is enough; `-p no:quotafs` turns it off, `-p quotafs.testing.plugin` turns it on
under PYTEST_DISABLE_PLUGIN_AUTOLOAD.

    @pytest.mark.quotafs(limit="1M")
    def test_app_survives_a_full_disk(quota_mount):
        ...  # quota_mount.path is a fresh 1 MiB mount; .usage(), .set_limit(), .add_fault()

Fixtures (as pyfakefs's fs, fs_class, fs_module, fs_session: one per scope):
  quota_mount      a fresh mount per test; size and options from @pytest.mark.quotafs(...)
  quota_mount_class / _module / _session
                   one mount shared by the tests of a class / module / session; the marker
                   of that class or module applies (none for the session)
  quotafs_factory  make(limit="100M", **options) -> QuotaMount, as many as wanted
  quotafs_factory_class / _module / _session
                   the same, its mounts unmounted when the class / module / session ends
  ext4_loop        the real loop-ext4 reference (root), with the marker's limit as free space
  tmpfs_reference  its rootless sibling: a tmpfs of the marker's limit in a private namespace;
                   .path works from the test's own process, .launch_prefix() runs a program
                   inside (needed for getcwd)
  quotafs_target   the test once per target — reference (ext4_loop), quotafs, quotafs-sigbus —
                   each time with .name and .path, a fresh directory on that target
  sweep_point      one point of a disk-full sweep (@pytest.mark.quotafs_sweep(cmd=..., check=...,
                   points=N) makes N test items of the test, for pytest-xdist to spread)

Where FUSE cannot be used the fixtures skip the test, with the reason. When a test fails, its
report gets a section per mount it could see: usage, ENOSPC count, fault seed and the recorded
events. A mount still busy at teardown is left mounted, with a QuotafsLeakWarning naming the
test (or the module, class or session), and removed (lazily) at the end of the session.

The plugin stands on the public API only (quotafs.QuotaMount.start/.unmount/.close/
.terminate, quotafs.check_fuse, ...; tests/unit/test_plugin_public_api.py checks).
Docs: docs/testing.md.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import warnings
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

import quotafs
from quotafs.errors import ExitCode, QuotafsError, with_doctor_hint
from quotafs.interrupts import sigterm_as_interrupt
from quotafs.options import validate as validate_options
from quotafs.units import format_size, parse_size

if TYPE_CHECKING:
    from quotafs import Ext4Mount, PointResult, QuotaMount, SweepPlan, TmpfsMount

__all__ = [
    "DEFAULT_LIMIT",
    "FORCE_NO_FUSE_ENV",
    "FORCE_NO_LOOP_ENV",
    "FORCE_NO_TMPFS_ENV",
    "MARKER",
    "SWEEP_MARKER",
    "TARGETS",
    "OptionError",
    "QuotafsFactory",
    "QuotafsLeakWarning",
    "QuotafsTarget",
    "SweepPoint",
    "ext4_unusable_reason",
    "fuse_unusable_reason",
    "mount_options",
    "tmpfs_unusable_reason",
]

MARKER = "quotafs"
DEFAULT_LIMIT = "100M"  # quota_mount and quotafs_factory without a limit; ext4_loop's free space
# Set to anything but "" or "0": the fixtures behave as if FUSE (or loop devices) were
# missing, so a suite's skip path can be tested on a machine that has them.
FORCE_NO_FUSE_ENV = "QUOTAFS_TESTING_FORCE_NO_FUSE"
FORCE_NO_LOOP_ENV = "QUOTAFS_TESTING_FORCE_NO_LOOP"
FORCE_NO_TMPFS_ENV = "QUOTAFS_TESTING_FORCE_NO_TMPFS"
REPORT_EVENTS = 20  # newest events shown in a failure report

class QuotafsLeakWarning(UserWarning):
    """A mount made by a fixture outlived its test (busy at teardown, or never torn down)."""


class OptionError(ValueError):
    """An invalid mount option or marker argument; the message is one line for the user."""


# -- options ------------------------------------------------------------------------------

def mount_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate mount options given as keywords (as quotafs.mounted() takes them) and return
    them with sizes in bytes; raise OptionError with one clear line. The check is
    quotafs.options.MountOptions's, the one the CLI, the API and the daemon use."""
    try:
        return validate_options(values)
    except QuotafsError as exc:
        raise OptionError(str(exc)) from None


_MARKER_OPTIONS = pytest.StashKey[dict[str, Any]]()


def _marker_options(item: pytest.Item | pytest.Collector) -> dict[str, Any]:
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
        check = quotafs.check_fuse
    except ImportError as exc:  # pyfuse3 missing or broken
        return f"quotafs cannot be imported: {exc}"
    try:
        check()
    except QuotafsError as exc:
        return str(exc)
    return None


def ext4_unusable_reason() -> str | None:
    """Why the loop-ext4 reference cannot be built here, or None if it can."""
    if _forced(FORCE_NO_LOOP_ENV):
        return f"{FORCE_NO_LOOP_ENV} is set"
    try:
        quotafs.check_ext4_loop()
    except QuotafsError as exc:
        return str(exc)
    return None


def tmpfs_unusable_reason() -> str | None:
    """Why the tmpfs reference cannot be made here (no user namespaces for this user, a
    missing tool), or None if it can."""
    if _forced(FORCE_NO_TMPFS_ENV):
        return f"{FORCE_NO_TMPFS_ENV} is set"
    try:
        quotafs.check_tmpfs_reference()
    except QuotafsError as exc:
        return str(exc)
    return None


def _skip_without_fuse() -> None:
    reason = fuse_unusable_reason()
    if reason is not None:
        pytest.skip(with_doctor_hint(f"quotafs: FUSE is not usable here: {reason}"))


# -- the registry of mounts made by fixtures ----------------------------------------------

@dataclass
class _Entry:
    mount: QuotaMount
    nodeid: str  # the test, class, module or session ("") it was made for
    made_by: str
    busy: str | None = None  # why teardown left it mounted


_REGISTRY = pytest.StashKey[dict[int, _Entry]]()
_LEAKS = pytest.StashKey[list[str]]()
_NODE_HANDLES = pytest.StashKey[list["QuotaMount | Ext4Mount | TmpfsMount"]]()


def _registry(config: pytest.Config) -> dict[int, _Entry]:
    return config.stash.setdefault(_REGISTRY, {})


def _show_to_report(node: pytest.Item | pytest.Collector,
                    handle: QuotaMount | Ext4Mount | TmpfsMount) -> None:
    """A failing test below `node` (the test itself, or the class, module or session a wider
    fixture belongs to) reports on `handle`."""
    node.stash.setdefault(_NODE_HANDLES, []).append(handle)


def _owner(request: pytest.FixtureRequest) -> str:
    return request.node.nodeid or "the session"


def _mount(request: pytest.FixtureRequest, made_by: str, limit: int | None,
           options: dict[str, Any]) -> _Entry:
    opts = dict(options)
    backing = opts.pop("backing", None)
    try:
        mount = quotafs.QuotaMount.start(limit, backing, None, **opts)
    except QuotafsError as exc:
        if exc.code == ExitCode.NO_FUSE:
            raise pytest.skip.Exception(
                with_doctor_hint(f"quotafs: FUSE is not usable here: {exc}")) from None
        raise pytest.fail.Exception(f"{made_by}: cannot mount quotafs: {exc}",
                                    pytrace=False) from None
    entry = _Entry(mount, nodeid=_owner(request), made_by=made_by)
    _registry(request.config)[id(entry)] = entry
    _show_to_report(request.node, mount)
    return entry


def _warn_busy(entry: _Entry, reason: str) -> None:
    leak = QuotafsLeakWarning(
        f"quotafs mount {entry.mount.path} made by {entry.made_by} in {entry.nodeid} "
        f"is still busy at teardown ({reason}); it stays mounted until the end "
        "of the session")
    try:
        warnings.warn(leak, stacklevel=1)
    except QuotafsLeakWarning:  # the user's filters make it an error: one line
        raise pytest.fail.Exception(f"QuotafsLeakWarning: {leak}", pytrace=False) from None


def _release(config: pytest.Config, entry: _Entry) -> None:
    """Fixture teardown: unmount and reap the daemon. A dead daemon's mount (ENOTCONN) is
    unmounted lazily; a busy mount of a live daemon is left for the end of the session."""
    mount = entry.mount
    try:
        reason = mount.unmount(lazy=False)
    except QuotafsError:
        reason = None  # not busy but failing: close() tries lazily and raises what stays
    if reason is not None:
        entry.busy = reason
        _warn_busy(entry, reason)
        return
    try:
        mount.close()
    finally:
        if mount.closed:  # else the end of the session retries
            _registry(config).pop(id(entry), None)


def _reap(entry: _Entry) -> None:
    """End of session: stop the daemon (it unmounts lazily, as libfuse does), then remove
    what the fixture made."""
    entry.mount.terminate()
    entry.mount.close()


# -- fixtures -----------------------------------------------------------------------------

def _default_limit(options: dict[str, Any]) -> int | None:
    """100M, unless like_ext4 gives the limit."""
    return None if options.get("like_ext4") is not None else parse_size(DEFAULT_LIMIT)


_UNSET: Any = object()  # quotafs_factory's limit when not given


def _scope_suffix(scope: str) -> str:
    return "" if scope == "function" else f"_{scope}"


def _quota_mount(request: pytest.FixtureRequest) -> Iterator[QuotaMount]:
    """One mount for the fixture's scope: the marker of its node (the test; the class or
    module of a wider fixture; none for the session) gives size and options."""
    options = dict(_marker_options(request.node))
    limit = options.pop("limit") if "limit" in options else _default_limit(options)
    _skip_without_fuse()
    entry = _mount(request, "quota_mount" + _scope_suffix(request.scope), limit, options)
    yield entry.mount
    _release(request.config, entry)


class QuotafsFactory:
    """quotafs_factory(limit="100M", **options) -> a new live QuotaMount; options as for
    quotafs.mounted() (inodes, accounting, block_size, mmap_sigbus, crash_sim, seed, rules,
    ...).
    Every mount it made is unmounted when its scope (the test, by default) ends."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._made_by = "quotafs_factory" + _scope_suffix(request.scope)
        self._entries: list[_Entry] = []

    def __call__(self, limit: int | str | None = _UNSET, **options: Any) -> QuotaMount:
        if limit is _UNSET:  # 100M, unless like_ext4 gives the limit
            limit = DEFAULT_LIMIT if options.get("like_ext4") is None else None
        try:
            checked = mount_options({"limit": limit, **options})
        except OptionError as exc:
            raise pytest.fail.Exception(f"{self._made_by}: {exc}", pytrace=False) from None
        entry = _mount(self._request, self._made_by, checked.pop("limit"), checked)
        self._entries.append(entry)
        return entry.mount

    def __repr__(self) -> str:
        return f"<{self._made_by}: {len(self._entries)} mounts: {self.mounts!r}>"

    @property
    def mounts(self) -> list[QuotaMount]:
        """The mounts made so far, oldest first."""
        return [entry.mount for entry in self._entries]

    def close(self) -> None:
        """Unmount every mount made so far, newest first (the fixture's teardown does)."""
        errors: list[BaseException] = []
        entries, self._entries = self._entries, []
        for entry in reversed(entries):
            try:
                _release(self._request.config, entry)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def _quotafs_factory(request: pytest.FixtureRequest) -> Iterator[QuotafsFactory]:
    _skip_without_fuse()
    factory = QuotafsFactory(request)
    yield factory
    factory.close()


@pytest.fixture
def quota_mount(request: pytest.FixtureRequest) -> Iterator[QuotaMount]:
    """A fresh quotafs mount for this test (limit 100M unless @pytest.mark.quotafs says
    otherwise), unmounted after it. Skipped where FUSE cannot be used."""
    yield from _quota_mount(request)


@pytest.fixture(scope="class")
def quota_mount_class(request: pytest.FixtureRequest) -> Iterator[QuotaMount]:
    """One mount shared by the tests of a class, unmounted after the class; the marker on
    the class (or its module) gives size and options, a test's own marker does not."""
    yield from _quota_mount(request)


@pytest.fixture(scope="module")
def quota_mount_module(request: pytest.FixtureRequest) -> Iterator[QuotaMount]:
    """One mount shared by the tests of a module, unmounted after its last test; the
    module's marker (pytestmark) gives size and options, a test's own marker does not."""
    yield from _quota_mount(request)


@pytest.fixture(scope="session")
def quota_mount_session(request: pytest.FixtureRequest) -> Iterator[QuotaMount]:
    """One mount (100M) shared by every test of the session, unmounted at its end; no
    marker applies (quotafs_factory_session makes one with options)."""
    yield from _quota_mount(request)


@pytest.fixture
def quotafs_factory(request: pytest.FixtureRequest) -> Iterator[QuotafsFactory]:
    """make(limit=..., **options) -> QuotaMount, as many as the test wants. Skipped where
    FUSE cannot be used. The marker does not apply: each call says what it wants."""
    yield from _quotafs_factory(request)


@pytest.fixture(scope="class")
def quotafs_factory_class(request: pytest.FixtureRequest) -> Iterator[QuotafsFactory]:
    """quotafs_factory whose mounts last until the class ends."""
    yield from _quotafs_factory(request)


@pytest.fixture(scope="module")
def quotafs_factory_module(request: pytest.FixtureRequest) -> Iterator[QuotafsFactory]:
    """quotafs_factory whose mounts last until the module ends."""
    yield from _quotafs_factory(request)


@pytest.fixture(scope="session")
def quotafs_factory_session(request: pytest.FixtureRequest) -> Iterator[QuotafsFactory]:
    """quotafs_factory whose mounts last until the session ends."""
    yield from _quotafs_factory(request)


@pytest.fixture
def ext4_loop(request: pytest.FixtureRequest) -> Iterator[Ext4Mount]:
    """The real loop-ext4 reference with the marker's limit (default 100M) as free space, torn
    down after the test. Root only: skipped, with the reason, elsewhere."""
    options = _marker_options(request.node)
    reason = ext4_unusable_reason()
    if reason is not None:
        pytest.skip(with_doctor_hint(f"quotafs: no ext4 reference here: {reason}"))
    free = options.get("limit")
    free = _default_limit(options) if free is None else free
    image = options.get("like_ext4")  # the recipe's image of that size, as --like-ext4 has
    least = quotafs.Ext4Mount.MIN_FREE
    if image is None and free is not None and free < least:
        pytest.fail(f"ext4_loop: the ext4 reference needs at least {format_size(least)} "
                    f"free; the quotafs marker asks for {format_size(free)}", pytrace=False)
    with contextlib.ExitStack() as stack:
        try:
            handle = stack.enter_context(quotafs.ext4_loop(free, image_size=image))
        except QuotafsError as exc:
            if "no free loop device" in str(exc):
                raise pytest.skip.Exception(
                    with_doctor_hint(f"quotafs: no ext4 reference here: {exc}")) from None
            raise pytest.fail.Exception(f"ext4_loop: {exc}", pytrace=False) from None
        _show_to_report(request.node, handle)
        yield handle


@pytest.fixture
def tmpfs_reference(request: pytest.FixtureRequest) -> Iterator[TmpfsMount]:
    """ext4_loop's rootless sibling: a tmpfs of the marker's limit (default 100M) in a
    private mount namespace, torn down after the test (and gone if the run is killed).
    Skipped, with the reason, where this user cannot make user namespaces."""
    options = _marker_options(request.node)
    reason = tmpfs_unusable_reason()
    if reason is not None:
        pytest.skip(f"quotafs: no tmpfs reference here: {reason}")
    size = options.get("limit")
    size = parse_size(DEFAULT_LIMIT) if size is None else size
    with contextlib.ExitStack() as stack:
        try:
            handle = stack.enter_context(quotafs.tmpfs_reference(size))
        except QuotafsError as exc:
            raise pytest.fail.Exception(f"tmpfs_reference: {exc}", pytrace=False) from None
        _show_to_report(request.node, handle)
        yield handle


# -- quotafs_target: a test once per target, as `quotafs compare -- CMD` runs a program --

TARGETS = ("reference", "quotafs", "quotafs-sigbus")  # the quotafs_target parameters
TARGET_DIR = "target"  # the fresh directory a quotafs_target test gets on its target


@dataclass(frozen=True)
class QuotafsTarget:
    """Where a quotafs_target test runs: `name` is "ext4" or "tmpfs" (the reference),
    "quotafs" or "quotafs-sigbus" (--mmap-sigbus, the ext4-faithful mode); `path` a fresh
    empty directory on it; `mount` the mount itself (usage(), and on quotafs events())."""

    name: str
    path: str
    mount: QuotaMount | Ext4Mount | TmpfsMount

    @property
    def is_reference(self) -> bool:
        return self.name in ("ext4", "tmpfs")


@pytest.fixture(params=TARGETS)
def quotafs_target(request: pytest.FixtureRequest) -> Iterator[QuotafsTarget]:
    """The test runs once per target: the reference (the real loop-ext4 as root, else the
    rootless tmpfs; skipped with the reason where neither can be made), quotafs, and
    quotafs --mmap-sigbus. The marker's limit is the reference's
    free space and the quotafs targets' limit; its other options apply to quotafs."""
    mount: QuotaMount | Ext4Mount | TmpfsMount
    if request.param == "reference":
        # As `quotafs compare` picks its reference: the real ext4 where it can be built
        # (root), its rootless sibling elsewhere.
        name = "ext4" if ext4_unusable_reason() is None else "tmpfs"
        mount = request.getfixturevalue("ext4_loop" if name == "ext4" else "tmpfs_reference")
    else:
        options = dict(_marker_options(request.node))
        limit = options.pop("limit") if "limit" in options else _default_limit(options)
        options["mmap_sigbus"] = request.param == "quotafs-sigbus"
        factory: QuotafsFactory = request.getfixturevalue("quotafs_factory")
        mount, name = factory(limit, **options), request.param
    path = os.path.join(mount.path, TARGET_DIR)
    os.mkdir(path)
    yield QuotafsTarget(name, path, mount)
# -- sweep: one test item per disk-full point ---------------------------------------------
#
# @pytest.mark.quotafs_sweep(cmd=..., setup=..., check=..., points=20) on a test that takes
# the sweep_point fixture: pytest_generate_tests makes one item per point (known before any
# run, so that every pytest-xdist worker collects the same items); the baseline runs once per
# session (per worker under xdist), when the first item needs it; each item runs its point.

SWEEP_MARKER = "quotafs_sweep"
DEFAULT_SWEEP_POINTS = 20
SWEEP_TAIL_LINES = 10  # of each stderr, in a failing point's message
_SWEEP_POINT = pytest.StashKey["SweepPoint"]()


def _sweep_spec(node: pytest.Item) -> dict[str, Any]:
    """The closest @pytest.mark.quotafs_sweep's arguments, cmd as an argv list; a bad marker
    fails with one line."""
    mark = node.get_closest_marker(SWEEP_MARKER)
    where = f"@pytest.mark.{SWEEP_MARKER} on {node.nodeid}"
    if mark is None:
        raise pytest.fail.Exception(
            f"{node.nodeid}: the sweep_point fixture needs @pytest.mark.{SWEEP_MARKER}"
            "(cmd=..., check=..., points=N)", pytrace=False)
    if mark.args:
        raise pytest.fail.Exception(f"{where}: takes keyword arguments only", pytrace=False)
    spec = dict(mark.kwargs)
    cmd = spec.get("cmd")
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    if not cmd or not all(isinstance(a, str) for a in cmd):
        raise pytest.fail.Exception(f"{where}: cmd= is required: a command line (str) or "
                                    "an argv list", pytrace=False)
    spec["cmd"] = list(cmd)
    return spec


def _sweep_items(spec: dict[str, Any], where: str) -> int:
    """How many items: points=N (default 20), or max_runs=N for each_write and every, whose
    number of points only the baseline tells."""
    if spec.get("each_write") or spec.get("every") is not None:
        count = spec.get("max_runs")
        if count is None:
            raise pytest.fail.Exception(
                f"{where}: with each_write or every, give max_runs=N: the number of test "
                "items must be known before the baseline runs", pytrace=False)
    else:
        count = spec.get("points", DEFAULT_SWEEP_POINTS)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise pytest.fail.Exception(f"{where}: the number of points must be a positive "
                                    f"integer, got {count!r}", pytrace=False)
    return count


@dataclass(frozen=True)
class SweepPoint:
    """What the sweep_point fixture gives: one disk-full point of the sweep, already run."""

    index: int
    total: int  # points in the sweep
    plan: SweepPlan
    result: PointResult

    @property
    def verdict(self) -> str:
        return self.result.verdict

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def describe(self) -> str:
        """Several lines: where the disk was full, how CMD and the check ended, the
        verdict, and the tails of their stderr (and the daemon's log, if it said anything)."""
        r = self.result
        check = r.check
        lines = [f"quotafs sweep point {self.index} of {self.total}: {r.where()}",
                 f"CMD: {r.run.describe()}; check: "
                 + ("none" if check is None else check.describe()),
                 f"verdict: {r.verdict}"]
        for title, text in (("CMD stderr", r.stderr_tail), ("check stderr", r.check_stderr_tail),
                            ("daemon log", r.daemon_log)):
            if text:
                lines.append(f"{title} (tail):")
                lines += ["  " + line for line in text.splitlines()[-SWEEP_TAIL_LINES:]]
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Fail the test, with describe() as its message, unless the verdict is ok."""
        if not self.ok:
            raise pytest.fail.Exception(self.describe(), pytrace=False)


class _SweepPlans:
    """The session's sweep plans by marker arguments: each baseline runs once, when its
    first item needs it; a baseline that failed is kept as its error, so every item of
    that sweep fails with the same line without running it again."""

    def __init__(self) -> None:
        self._plans: dict[str, SweepPlan | QuotafsError] = {}

    def get(self, spec: dict[str, Any]) -> SweepPlan:
        key = repr(sorted(spec.items()))
        if key not in self._plans:
            options = dict(spec)
            argv = options.pop("cmd")
            try:
                with sigterm_as_interrupt():  # a kill cleans up as Ctrl-C does
                    self._plans[key] = quotafs.plan_sweep(argv, **options)
            except QuotafsError as exc:
                self._plans[key] = exc
        found = self._plans[key]
        if isinstance(found, QuotafsError):
            if found.code == ExitCode.NO_FUSE:
                raise pytest.skip.Exception(f"quotafs: FUSE is not usable here: {found}")
            raise pytest.fail.Exception(f"quotafs sweep: {found}", pytrace=False)
        return found

    def close(self) -> None:
        """Remove every plan's starting state (the points' mounts are gone already)."""
        plans, self._plans = self._plans, {}
        for plan in plans.values():
            if not isinstance(plan, QuotafsError):
                plan.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sweep_point" not in metafunc.fixturenames:
        return
    spec = _sweep_spec(metafunc.definition)
    count = _sweep_items(spec, f"@pytest.mark.{SWEEP_MARKER} on {metafunc.definition.nodeid}")
    width = len(str(count))
    numbers = range(1, count + 1)  # as the sweep's report numbers its points
    metafunc.parametrize("sweep_point", numbers, indirect=True,
                         ids=[f"point{i:0{width}d}" for i in numbers])


@pytest.fixture(scope="session")
def quotafs_sweep_plans() -> Iterator[_SweepPlans]:
    """The sweeps' plans (baselines and starting states) of this session, or of this
    pytest-xdist worker; removed at its end."""
    plans = _SweepPlans()
    yield plans
    plans.close()


@pytest.fixture
def sweep_point(request: pytest.FixtureRequest,
                quotafs_sweep_plans: _SweepPlans) -> SweepPoint:
    """One point of the test's @pytest.mark.quotafs_sweep(...), run on a fresh mount: the
    disk full there, then the check with room. Skipped where FUSE cannot be used."""
    spec = _sweep_spec(request.node)
    _skip_without_fuse()
    plan = quotafs_sweep_plans.get(spec)
    index: int = request.param
    total = len(plan.points)
    if index > total:  # rooms that round to the same block are run once
        pytest.skip(f"quotafs sweep: the baseline gives {total} points only")
    try:
        with sigterm_as_interrupt():  # the point's mount and copy go, then the session ends
            result = quotafs.run_point(plan, index)
    except QuotafsError as exc:
        raise pytest.fail.Exception(f"quotafs sweep, point {index}: {exc}",
                                    pytrace=False) from None
    point = SweepPoint(index, total, plan, result)
    request.node.stash[_SWEEP_POINT] = point
    return point


def _sweep_section(item: pytest.Item, report: pytest.TestReport) -> list[tuple[str, str]]:
    """A failing sweep item's point, unless the failure says it already (assert_ok)."""
    point = item.stash.get(_SWEEP_POINT, None)
    if point is None:
        return []
    text = point.describe()
    return [] if text in str(report.longrepr) else [("quotafs sweep point", text)]


# -- hooks --------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(limit='{DEFAULT_LIMIT}', **options): size and mount options of the "
        "quota_mount fixture (inodes, accounting, block_size, mmap_sigbus, seed, rules, ...); "
        "limit is also the ext4_loop fixture's free space and the tmpfs_reference fixture's "
        "size. See quotafs docs/testing.md")
    config.addinivalue_line(
        "markers",
        f"{SWEEP_MARKER}(cmd=..., setup=None, check=None, points={DEFAULT_SWEEP_POINTS}, "
        "**options): a disk-full sweep of cmd, one test item per point, for a test taking the "
        "sweep_point fixture (options as for quotafs.plan_sweep). See quotafs docs/testing.md")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A bad marker fails its test at setup, even one that uses none of our fixtures.
    if item.get_closest_marker(MARKER) is not None:
        _marker_options(item)


def _describe_quotafs(mount: QuotaMount) -> str:
    if not mount.is_alive():
        status = mount.returncode
        return (f"the daemon is gone (exit status {'?' if status is None else status}): no "
                "usage to show; requests on the mount fail with ENOTCONN")
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
        lines += ["  " + quotafs.format_event(e) for e in shown]
    else:
        lines.append("events: none")
    return "\n".join(lines)


def _describe_tmpfs(handle: TmpfsMount) -> str:
    u = handle.usage()
    return (f"used {format_size(u['used'])} of {format_size(handle.size)} (tmpfs size=), "
            f"inodes used {u['inodes_used']} of {u['inode_limit']}; inside the namespace "
            f"{handle.inside_path}, holder pid {handle.holder_pid}")


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
        # The test's own mounts, then those of its class, module and session fixtures.
        for node in reversed(item.listchain()):
            for handle in node.stash.get(_NODE_HANDLES, []):
                if isinstance(handle, quotafs.QuotaMount) and handle.closed:
                    continue  # a factory's mount closed early
                kind = ("quotafs" if isinstance(handle, quotafs.QuotaMount) else
                        "tmpfs" if isinstance(handle, quotafs.TmpfsMount) else "ext4")
                try:
                    if isinstance(handle, quotafs.QuotaMount):
                        text = _describe_quotafs(handle)
                    elif isinstance(handle, quotafs.TmpfsMount):
                        text = _describe_tmpfs(handle)
                    else:
                        text = _describe_ext4(handle)
                except Exception as exc:  # never let the report hide the test's own failure
                    text = f"could not read its usage: {exc}"
                report.sections.append((f"{kind} {handle.path}", text))
        report.sections += _sweep_section(item, report)
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
