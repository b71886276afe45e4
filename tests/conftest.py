"""Shared fixtures: real mounts served by a daemon in a child process, made by the project's
own pytest plugin (quotafs.testing.plugin: quotafs_factory, quota_mount), as a user's
suite would make them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

import quotafs
from quotafs import QuotaMount, controlsocket, statedir
from quotafs.client import lifecycle
from quotafs.options import MountOptions
from quotafs.protocol import request_line
from quotafs.testing import QuotafsFactory, ext4_unusable_reason, fuse_unusable_reason

# The plugin comes in through its pytest11 entry point, as in a user's suite (naming it in
# pytest_plugins as well would register it twice).

needs_fuse = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def raw_control(mountpoint: str, name: str = "", args: dict[str, Any] | None = None,
                line: bytes | None = None, owner: int = 0, timeout: float = 10) -> Any:
    """One request on the control socket of the mount at `mountpoint` (mounted by
    `owner`), as this process's uid: the daemon's reply, decoded. `line`: these bytes
    instead of a well-formed request (what a careless client may send)."""
    with controlsocket.connect(mountpoint, owner, timeout) as sock:
        raw = controlsocket.exchange(
            sock, request_line(name, args) if line is None else line, timeout)
    return json.loads(raw)


def loop_ext4_unusable_reason() -> str | None:
    """Why a test cannot mount quotafs beside a loop-ext4 reference here, or None."""
    return ext4_unusable_reason() or fuse_unusable_reason()


needs_fuse_and_loop_ext4 = pytest.mark.skipif(loop_ext4_unusable_reason() is not None,
                                              reason=loop_ext4_unusable_reason() or "")

MountFactory = Callable[..., QuotaMount]


@pytest.fixture
def mount_factory(quotafs_factory: QuotafsFactory) -> MountFactory:
    """make(limit=..., **options) -> a live mount, unmounted at the end of the test: the
    plugin's quotafs_factory, with quotafs.mounted()'s default of no limit."""
    def make(limit: int | str | None = None, **options: Any) -> QuotaMount:
        return quotafs_factory(limit, **options)

    return make


@pytest.fixture
def qmount(mount_factory: MountFactory) -> QuotaMount:
    """A 1 MiB quota mount with a private backing directory."""
    return mount_factory("1M")


# -- the fast lane: `pytest -m "not mount"` runs the layers that need no /dev/fuse -----------

# Where the tests run without a mount: the pure model, and QuotaFS driven in-process.
_NO_MOUNT_DIRS = ("unit", "operations")
_TESTS = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    # Many tests check what a program does on Ctrl-C, with SIGINT sent to it or to this
    # process. A suite started with SIGINT ignored (a script's background job, nohup)
    # passes that on to every child across exec, so they would ignore it and the tests
    # hang or leak; a handler, unlike SIG_IGN, is reset to the default by exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test outside tests/unit and tests/operations gets the `mount` marker."""
    no_mount = [_TESTS / d for d in _NO_MOUNT_DIRS]
    for item in items:
        if not any(item.path.is_relative_to(d) for d in no_mount):
            item.add_marker(pytest.mark.mount)


# -- lines for the terminal summary (e.g. how many differential examples ran) -----------

_SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture
def terminal_summary(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """add(line): print `line` in pytest's terminal summary, after the test results."""
    return request.config.stash.setdefault(_SUMMARY, []).append


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("quotafs")
        for line in lines:
            terminalreporter.write_line(line)
    orphans = config.stash.get(_ORPHAN_RECORDS, [])
    if orphans:
        terminalreporter.section("quotafs daemons logged outside any test", red=True)
        for record in orphans:
            terminalreporter.write_line(record)


# -- the daemons' logs: a test whose daemon logged a warning or an error fails ----------
#
# As s3ql's pytest_checklogs: every daemon this process starts (quotafs.mounted, the
# plugin's fixtures, open_quota_mount) logs to a file of its own, and after each test the
# records it added are checked. "unexpected error in ...; answering EIO" is one of them.
# A test that provokes one on purpose says so: expect_daemon_log(r"regex").

# The first line of a record as daemon.main formats it: "DATE TIME quotafs[PID] LEVEL ...".
_RECORD = re.compile(r"^\S+ \S+ quotafs\[\d+\] (?P<level>[A-Z]+) ")
_CHECKED_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
_ORPHAN_RECORDS = pytest.StashKey[list[str]]()
_EXPECTED = pytest.StashKey[list[re.Pattern[str]]]()
_LOGS = pytest.StashKey["DaemonLogs"]()


class DaemonLogs:
    """The log files of the session's daemons and how far each was checked."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._numbers = itertools.count(1)
        self.checked: dict[Path, int] = {}  # log file -> bytes read so far
        self.between_tests: list[str] = []  # logged while no test ran (module teardown)

    def assign(self, config: MountOptions) -> MountOptions:
        if config.log_file is not None:
            return config  # a test that reads its daemon's log itself
        path = self.directory / f"daemon-{next(self._numbers)}.log"
        self.checked[path] = 0
        return dataclasses.replace(config, log_file=str(path))

    def new_records(self) -> list[str]:
        """WARNING-and-up records (with their traceback lines) logged since the last call."""
        records: list[str] = []
        for path, offset in self.checked.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:  # the daemon has not logged anything (yet)
                continue
            self.checked[path] = offset + len(data)
            keep = False
            for line in data.decode(errors="replace").splitlines():
                match = _RECORD.match(line)
                if match is not None:
                    keep = match["level"] in _CHECKED_LEVELS
                    if keep:
                        records.append(f"{path.name}: {line}")
                elif keep:
                    records[-1] += "\n" + line
        return records


@pytest.fixture(scope="session", autouse=True)
def daemon_logs(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonLogs]:
    logs = DaemonLogs(tmp_path_factory.mktemp("daemon-logs"))
    request.config.stash[_LOGS] = logs
    start = lifecycle.start_daemon

    def start_logged(config: MountOptions, *args: Any, **kwargs: Any) -> lifecycle.Daemon:
        return start(logs.assign(config), *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lifecycle, "start_daemon", start_logged)
        yield logs


def pytest_sessionfinish(session: pytest.Session) -> None:
    # After the session fixtures' teardown: what module-scoped daemons logged between
    # tests or at their unmount fails the run too.
    logs = session.config.stash.get(_LOGS, None)
    if logs is None:
        return
    orphans = logs.between_tests + logs.new_records()
    session.config.stash[_ORPHAN_RECORDS] = orphans
    if orphans and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def expect_daemon_log(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """expect(regex): a daemon record matching regex (re.search) is this test's intent."""
    expected = request.node.stash.setdefault(_EXPECTED, [])
    return lambda pattern: expected.append(re.compile(pattern))


def detached_logs(roots: tuple[str, ...]) -> list[str]:
    """What the detached daemons of the tests' own mount points (below `roots`) left in
    the state directory's logs (a daemon removes an empty log), read and removed: the
    daemons `quotafs mount` starts log there, not to a file of the session's."""
    lines: list[str] = []
    directory = Path(statedir.state_dir())
    for log in directory.glob("*.log"):
        mountpoint = urllib.parse.unquote(log.name[:-len(".log")])
        if not mountpoint.startswith(roots):
            continue
        text = log.read_text(errors="replace")
        log.unlink()
        lines += [f"{log.name}: {line}" for line in text.splitlines()
                  if "Traceback" in line or ((m := _RECORD.match(line)) is not None
                                             and m["level"] in _CHECKED_LEVELS)]
    return lines


@pytest.fixture(autouse=True)
def _check_daemon_logs(request: pytest.FixtureRequest, daemon_logs: DaemonLogs,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    daemon_logs.between_tests += daemon_logs.new_records()
    roots = (str(tmp_path_factory.getbasetemp()), os.path.join(tempfile.gettempdir(),
                                                              "quotafs-"))
    yield
    expected = request.node.stash.get(_EXPECTED, [])
    unexpected = [r for r in daemon_logs.new_records() + detached_logs(roots)
                  if not any(p.search(r) for p in expected)]
    if unexpected:
        pytest.fail("the quotafs daemon logged during this test:\n" + "\n".join(unexpected),
                    pytrace=False)


# -- an interpreter that nobody may run (the project's venv may sit below /root) -----------

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class NobodyEnv:
    top: Path  # everything of the test lives here, readable by nobody
    python: str  # the venv's interpreter, executable by nobody
    src: Path  # PYTHONPATH: the copy of the package


def _nobody_setup_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a mount namespace and a device node"
    for tool in ("unshare", "setpriv", "fusermount3", "mount", "df"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing"
    return None


def run_capture(cmd: list[str], timeout: float = 600,
                cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd` to its end, output captured. If the test run is interrupted meanwhile
    (Ctrl-C, SIGTERM turned into an exception, a timeout), the child gets SIGINT and a
    minute to clean up, as it would from a terminal's Ctrl-C: subprocess.run would kill it
    at once and leave its mounts and daemons behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def backing_names(backing: str, stashed: bool = False) -> list[str]:
    """A --crash-sim backing directory's names but the daemon's stash, which must hold
    only its mark (or, `stashed`, something more too)."""
    from quotafs.daemon.crashsim import STASH, STASH_MARK  # the daemon's names

    names = sorted(os.listdir(backing))
    assert STASH.decode() in names, names
    stash = os.listdir(os.path.join(backing, STASH.decode()))
    assert (stash != [STASH_MARK.decode()]) == stashed, stash
    return [n for n in names if n != STASH.decode()]


def interrupt_when(cmd: list[str], ready: Callable[[], bool], sig: int,
                   wait: float = 60, poll: float = 0.1, **popen: Any
                   ) -> subprocess.CompletedProcess[str]:
    """Start `cmd` (output captured as text; `popen` as for subprocess.Popen), send it
    `sig` once `ready()` holds, and wait (up to a minute) for it to end. It must not end
    by itself before then, nor take longer than `wait` seconds to get there; whatever
    happens, it is killed and reaped before this returns or raises."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(cmd, text=True, **popen)
    try:
        deadline = time.monotonic() + wait
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(poll)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def nobody_env() -> Iterator[NobodyEnv]:
    """For tests that run quotafs as nobody: a venv of /usr/bin/python3 with the project's
    pyfuse3 and trio and a copy of the package, made once per session (a pip install:
    pyfuse3 may compile against libfuse3-dev)."""
    reason = _nobody_setup_reason()
    if reason is not None:
        pytest.skip(reason)
    top = Path(tempfile.mkdtemp(prefix="quotafs-nobody-"))
    try:
        top.chmod(0o755)
        venv = top / "venv"
        made  = run_capture([SYSTEM_PYTHON, "-m", "venv", str(venv)])
        assert made.returncode == 0, f"{SYSTEM_PYTHON} -m venv failed: {made.stderr}"
        pins = [f"pyfuse3=={version('pyfuse3')}", f"trio=={version('trio')}"]
        pip  = run_capture([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input",
                    "--disable-pip-version-check", "-q", *pins])
        assert pip.returncode == 0, f"pip install {' '.join(pins)} failed:\n{pip.stderr}"
        src = top / "src"
        shutil.copytree(Path(quotafs.__file__).parent, src / "quotafs",
                        ignore=shutil.ignore_patterns("__pycache__"))
        run_capture(["chmod", "-R", "a+rX", str(top)])
        yield NobodyEnv(top, str(venv / "bin" / "python"), src)
    finally:
        shutil.rmtree(top, ignore_errors=True)
