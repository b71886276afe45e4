"""What the workloads run against: a loop-ext4 on tmpfs (native) and FUSE mounts over it.

    tmpfs (ours)  ->  quotafs's ext4 reference (quotafs/reference/loopext4.py) of a fixed
                      image size: sparse ext4.img, losetup, mkfs.ext4, mount
                                                                              |
        native/             the native target: workloads run on ext4 itself   |
        backing-<target>/   backing directories of the FUSE targets, same ext4

Every step registers its undo on an ExitStack right after it succeeds, and the undo finds
what to remove from the system (`losetup -j IMAGE`, /proc/self/mountinfo), not only from
our own bookkeeping, so an interrupt between two steps leaks nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.system import (
    BenchError,
    is_mounted,
    log,
    pid_alive,
    run,
    tool,
    unmount_retrying,
    wait_pid_gone,
)
from quotafs import reap
from quotafs.errors import QuotafsError
from quotafs.reference import loopext4

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


class TargetUnavailable(Exception):
    """A target cannot run here; the message is the note printed in its place."""


# -- the loop-ext4 on tmpfs -------------------------------------------------------------------

@dataclass
class Ext4:
    root: str  # our temp dir: tmpfs/ (holding the reference), mnt/
    image: str
    device: str
    mountpoint: str
    image_size: int

    def subdir(self, name: str) -> str:
        path = os.path.join(self.mountpoint, name)
        os.makedirs(path, exist_ok=True)
        return path

    def mountpoint_for(self, name: str) -> str:
        path = os.path.join(self.root, "mnt", name)
        os.makedirs(path, exist_ok=True)
        return path


def _prefault(mountpoint: str) -> None:
    """Write the ext4's free space once and delete it, so that every block of the sparse
    image has its tmpfs page: no target pays tmpfs's first-touch allocation later."""
    st = os.statvfs(mountpoint)
    free = st.f_bavail * st.f_frsize
    amount = max(0, free - 64 * MiB)
    path = os.path.join(mountpoint, ".prefault")
    chunk = b"\0" * (4 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < amount:
            written += os.write(fd, chunk[:min(len(chunk), amount - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    os.sync()


@contextlib.contextmanager
def open_ext4(image_size: int, inodes: int, prefault: bool = True) -> Iterator[Ext4]:
    """A tmpfs we mount, and on it quotafs's loop-ext4 reference with an image of
    `image_size` and `inodes` inodes, mounted; all undone."""
    if os.geteuid() != 0:
        raise BenchError("the native target needs root (tmpfs, losetup, mount)")
    with contextlib.ExitStack() as stack:
        root = tempfile.mkdtemp(prefix="quotafs-bench-")
        stack.callback(shutil.rmtree, root, True)
        tmpfs = os.path.join(root, "tmpfs")
        os.makedirs(tmpfs)
        os.makedirs(os.path.join(root, "mnt"))
        stack.callback(unmount_retrying, tmpfs)
        # Only a cap: tmpfs takes pages as they are written. The reference wants room for
        # the image and its overhead.
        size = max(image_size + 64 * MiB, loopext4.room_needed(image_size))
        run([tool("mount"), "-t", "tmpfs", "-o", f"size={size},mode=0700", "quotafs-bench",
             tmpfs])
        # Inode tables and journal initialised now: no ext4lazyinit thread writing in the
        # background while we measure.
        mkfs = ["-N", str(inodes), "-E", "lazy_itable_init=0,lazy_journal_init=0"]
        try:
            loop = stack.enter_context(loopext4.open_ext4_loop(
                loopext4.MIN_FREE, workdir=tmpfs, image_size=image_size, mkfs_options=mkfs))
        except QuotafsError as exc:
            raise BenchError(str(exc)) from None
        if prefault:
            _prefault(loop.mountpoint)
        yield Ext4(root, loop.image, loop.device, loop.mountpoint, image_size)


# -- targets ----------------------------------------------------------------------------------

@dataclass
class Target:
    """Something the workloads run in: `path` is a directory; `pid` the daemon, if any."""

    name: str
    description: str
    path: str = ""
    pid: int | None = None
    mount_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_fuse(self) -> bool:
        return False

    @property
    def stores_data(self) -> bool:
        """Does it read back what was written? (bench/nullfs.py without --keep-data: no)"""
        return True

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def before_sample(self) -> None:
        """Called right before every sample (also warm-up ones)."""

    def after_sample(self) -> None:
        """Called after every sample, also one that failed."""


class NativeTarget(Target):
    def __init__(self, ext4: Ext4) -> None:
        super().__init__("native", "the loop-ext4 itself")
        self._ext4 = ext4

    def start(self) -> None:
        self.path = self._ext4.subdir("native")

    def stop(self) -> None:
        pass


def quotafs_command(tree: str | None = None) -> tuple[list[str], dict[str, str], str | None]:
    """The `quotafs` command of this Python environment, or of the source tree `tree` (an
    earlier commit's checkout), with its environment variables and working directory."""
    env = dict(os.environ)
    if tree is not None:
        # cwd too: `python -m` puts the working directory first on sys.path, before
        # PYTHONPATH; the daemon that `quotafs mount` starts inherits both.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
        return [sys.executable, "-m", "quotafs"], env, tree
    script = Path(sys.executable).parent / "quotafs"
    if script.exists():
        return [str(script)], env, None
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "quotafs"], env, None


def _quotafs(*args: str, timeout: float = 120.0, check: bool = True,
             tree: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd, env, cwd = quotafs_command(tree)
    # Its own session: a Ctrl-C in the terminal must not stop `quotafs mount` half-way,
    # after its daemon was started but before we know about it.
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=timeout, stdin=subprocess.DEVNULL, check=False,
                            start_new_session=True)
    if check and result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise BenchError(f"quotafs {' '.join(args)}: "
                         f"{lines[-1] if lines else result.returncode}")
    return result


def crash_sim_support() -> str | None:
    """None if `quotafs mount` has --crash-sim, else why the crashsim target is skipped."""
    if "--crash-sim" not in _quotafs("mount", "--help", check=False).stdout:
        return "skipped: `quotafs mount --crash-sim` does not exist yet in this quotafs"
    return None


def fault_support() -> str | None:
    """None if `quotafs fault add` exists, else why the rule target is skipped."""
    result = _quotafs("fault", "add", "--help", check=False)
    if result.returncode != 0:
        return "skipped: `quotafs fault add` does not exist yet in this quotafs"
    return None


# A rule that every request evaluates (all operations) and none matches (no such path):
# the rule engine's cost without any of its effects.
IDLE_RULE = ["--op", "all", "--path", "/.quotafs-bench/never/matches", "--errno", "EIO"]


class QuotafsTarget(Target):
    """`quotafs mount [--limit SIZE] --backing DIR MOUNTPOINT`, stopped by `quotafs umount`."""

    def __init__(self, name: str, description: str, backing: str, mountpoint: str,
                 limit: int | None, rule: list[str] | None = None,
                 extra: list[str] | None = None, tree: str | None = None) -> None:
        super().__init__(name, description)
        self.tree = tree  # run from this source tree instead of this environment's
        self.backing = backing
        self.mountpoint = mountpoint
        self.limit = limit
        self.rule = rule
        self.extra = extra or []

    @property
    def is_fuse(self) -> bool:
        return True

    def quotafs(self, *args: str, timeout: float = 120.0,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """A `quotafs` command of this target's tree."""
        return _quotafs(*args, timeout=timeout, check=check, tree=self.tree)

    def start(self) -> None:
        args = ["mount", "-q", "--backing", self.backing, *self.extra]
        if self.limit is not None:
            args += ["--limit", str(self.limit)]
        if self.tree is not None:  # which code this is, in the report
            version = self.quotafs("--version").stdout.strip()
            self.notes.append(f"{version} from {self.tree}")
        begin = time.perf_counter()
        self.quotafs(*args, self.mountpoint)
        self.mount_seconds = time.perf_counter() - begin
        try:
            status = json.loads(self.quotafs("status", "--json", self.mountpoint).stdout)
            self.pid = int(status["pid"])
            if self.rule is not None:
                result = self.quotafs("fault", "add", self.mountpoint, *self.rule, check=False)
                if result.returncode != 0:
                    message = (result.stderr.strip().splitlines() or ["failed"])[-1]
                    raise TargetUnavailable(f"skipped: quotafs fault add failed: {message}")
                self.notes.append(f"rule: quotafs fault add MOUNT {' '.join(self.rule)}")
        except BaseException:
            self.stop()
            raise
        self.path = self.mountpoint

    def stop(self) -> None:
        """Safe to call at any point, also if start() was interrupted or never ran."""
        if self.pid is None and is_mounted(self.mountpoint):
            with contextlib.suppress(Exception):
                status = json.loads(self.quotafs("status", "--json", self.mountpoint).stdout)
                self.pid = int(status["pid"])
        if is_mounted(self.mountpoint):
            result = self.quotafs("umount", self.mountpoint, check=False, timeout=90)
            if result.returncode != 0:
                unmount_retrying(self.mountpoint)
        if self.pid is not None and not wait_pid_gone(self.pid, 30):
            log(f"{self.name}: daemon {self.pid} still running after unmount: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
        self.pid = None


class SettingsVariant(Target):
    """Another setting of a running quotafs target's daemon, switched on before each of
    its samples and back off after: `limit` (None: no limit) and an optional fault rule.

    The quota and idle-rule comparisons are 5% questions, and two daemons running the
    same code differ by more than that from process to process on this VM (10-15% in
    whole runs: memory placement, which vCPU they land on). Switching settings on one
    daemon takes that difference out of the comparison.
    """

    def __init__(self, name: str, description: str, base: QuotafsTarget,
                 limit: int | None, rule: list[str] | None = None) -> None:
        super().__init__(name, description)
        self.base = base
        self.limit = limit
        self.rule = rule

    @property
    def is_fuse(self) -> bool:
        return True

    def start(self) -> None:
        if self.base.pid is None:
            raise TargetUnavailable(f"skipped: {self.base.name} is not running")
        if self.rule is not None:  # once, to fail early on a rule quotafs refuses
            self._add_rule()
            _quotafs("fault", "clear", self.base.path)
            self.notes.append(f"rule: quotafs fault add MOUNT {' '.join(self.rule)}")
        self.path, self.pid = self.base.path, self.base.pid
        self.notes.append(f"the {self.base.name} daemon with "
                          + ("no limit" if self.limit is None else f"limit {self.limit}")
                          + (" and the rule" if self.rule is not None else "")
                          + ", switched per sample")

    def _add_rule(self) -> None:
        assert self.rule is not None
        result = _quotafs("fault", "add", self.base.path, *self.rule, check=False)
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or ["failed"])[-1]
            raise TargetUnavailable(f"skipped: quotafs fault add failed: {message}")

    def stop(self) -> None:
        self.pid = None

    def before_sample(self) -> None:
        if self.limit != self.base.limit:
            _quotafs("set", self.base.path, "--limit", _limit_arg(self.limit))
        if self.rule is not None:
            self._add_rule()

    def after_sample(self) -> None:
        if self.rule is not None:
            _quotafs("fault", "clear", self.base.path)
        if self.limit != self.base.limit:
            _quotafs("set", self.base.path, "--limit", _limit_arg(self.base.limit))


def _limit_arg(limit: int | None) -> str:
    return "none" if limit is None else str(limit)


# -- the bare pyfuse3 passthrough (pyfuse3's own example, downloaded) ---------------------

def fetch_passthrough_example(cache_dir: Path) -> Path:
    """pyfuse3's examples/passthroughfs.py from the source distribution of the installed
    pyfuse3 version, downloaded with pip into the cache directory on first use."""
    from importlib.metadata import version

    pyfuse3_version = version("pyfuse3")
    dest = cache_dir / f"pyfuse3-{pyfuse3_version}" / "passthroughfs.py"
    if dest.exists():
        return dest
    sdist_dir = cache_dir / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    sdist = sdist_dir / f"pyfuse3-{pyfuse3_version}.tar.gz"
    if not sdist.exists():
        log(f"downloading the pyfuse3 {pyfuse3_version} source distribution (pip download)")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pyfuse3",
             "--disable-pip-version-check", "-d", str(sdist_dir),
             f"pyfuse3=={pyfuse3_version}"],
            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
            check=False)
        if result.returncode != 0 or not sdist.exists():
            last = (result.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise TargetUnavailable(f"skipped: pip download of pyfuse3=={pyfuse3_version} "
                                    f"failed: {last}")
    member_name = f"pyfuse3-{pyfuse3_version}/examples/passthroughfs.py"
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(member_name)
        if member is None:
            raise TargetUnavailable(f"skipped: {member_name} not in {sdist.name}")
        data = member.read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def check_passthrough_argv(script: Path) -> None:
    """The example must take `SOURCE MOUNTPOINT` (as pyfuse3 3.x's does)."""
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    usage = result.stdout.split("\n\n", 1)[0]
    if result.returncode != 0 or "source mountpoint" not in usage:
        raise TargetUnavailable(f"skipped: {script.name} does not take SOURCE MOUNTPOINT "
                                f"(usage: {usage.strip()!r})")


class ChildDaemonTarget(Target):
    """A FUSE daemon run as `argv` (a child in its own session: Ctrl-C of the bench must
    not kill it before we unmount), mounted on `mountpoint`; stopped by unmounting."""

    def __init__(self, name: str, description: str, argv: list[str], mountpoint: str,
                 log_path: str, stores_data: bool = True) -> None:
        super().__init__(name, description)
        self._stores_data = stores_data
        self.argv = argv
        self.mountpoint = mountpoint
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def is_fuse(self) -> bool:
        return True

    @property
    def stores_data(self) -> bool:
        return self._stores_data

    def start(self) -> None:
        begin = time.perf_counter()
        with open(self.log_path, "ab") as logf:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        self.pid = self._process.pid
        deadline = time.monotonic() + 60
        while not is_mounted(self.mountpoint):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.name} did not mount (log: {self.log_path})")
            time.sleep(0.01)
        while not os.path.ismount(self.mountpoint):  # answers: the loop is serving
            time.sleep(0.01)
        self.mount_seconds = time.perf_counter() - begin
        self.path = self.mountpoint

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None and is_mounted(self.mountpoint):
            unmount_retrying(self.mountpoint)
        if process is not None:
            reap(process, 30)
        if is_mounted(self.mountpoint):
            unmount_retrying(self.mountpoint)
        self._process = None
        self.pid = None

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)


def passthrough_target(script: Path, backing: str, mountpoint: str, log_path: str,
                       xattr: bool = False) -> ChildDaemonTarget:
    """pyfuse3's example as `python passthroughfs.py SOURCE MOUNTPOINT`, through
    bench/pyfuse3_example.py, which adds the fsync handler the example lacks; with `xattr`
    a getxattr that passes through to the backing too."""
    wrapper = Path(__file__).with_name("pyfuse3_example.py")
    name, added = (("pyfuse3-passthrough-xattr", "fsync and getxattr handlers") if xattr
                   else ("pyfuse3-passthrough", "an fsync handler"))
    return ChildDaemonTarget(name, f"pyfuse3's examples/{script.name} with {added}",
                             [sys.executable, str(wrapper), str(script),
                              *(["--xattr"] if xattr else []), backing, mountpoint],
                             mountpoint, log_path)


def null_target(name: str, description: str, mountpoint: str, log_path: str,
                xattr: bool, keep_data: bool = False) -> ChildDaemonTarget:
    """bench/nullfs.py: the ceiling of any pyfuse3 daemon (no I/O at all); with `xattr`,
    of one that supports extended attributes (as quotafs must); with `keep_data`, of one
    that reads back what was written (data in memory)."""
    argv = [sys.executable, str(Path(__file__).with_name("nullfs.py")), mountpoint,
            *(["--xattr"] if xattr else []), *(["--keep-data"] if keep_data else [])]
    return ChildDaemonTarget(name, description, argv, mountpoint, log_path,
                             stores_data=keep_data)
