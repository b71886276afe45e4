"""`quotafs compare -- CMD`: a user's program on the reference and on quotafs, side by side.

For each target (the reference — a loop-ext4 or a tmpfs —, quotafs, quotafs --mmap-sigbus)
a fresh empty directory on it becomes the program's working directory and its
$QUOTAFS_MOUNT; --setup runs there first, then CMD, then --check. Every quotafs target
gets the reference's room (limit and root's reserve, as runner.run_compare does), so a
difference in how CMD ends is a difference between quotafs and the kernel's filesystem.
The command line is quotafs/cli/compare.py; the report's text is compare/cmdreport.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from quotafs.client.api import QuotaMount, check_fuse, mounted_with
from quotafs.compare.program import (
    DEFAULT_TARGETS,
    DEFAULT_TIMEOUT,
    NOT_FOR_TARGETS,
    Outcome,
    check_reachable,
    run_argv,
    run_shell,
)
from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import signals_deferred
from quotafs.options import MountOptions
from quotafs.protocol import Event
from quotafs.reference.base import KINDS, Launch, Reference
from quotafs.reference.opener import check_kind, open_reference
from quotafs.units import format_size, parse_size
from quotafs.users import passwd_entry

QUOTAFS_TARGETS = DEFAULT_TARGETS[1:]
FAITHFUL = "quotafs-sigbus"  # the ext4-faithful target: --expect-same compares it
RUN_DIR = "run"  # the fresh directory on each target


@dataclass(frozen=True)
class TargetRun:
    """One run of CMD on one target (the JSON keys of `compare --json`'s "runs")."""

    target: str
    exit_code: int | None
    signal: str | None
    timed_out: bool
    check_exit_code: int | None  # None: no --check, or it died by a signal or hung
    used_bytes: int  # the target's usage at the end, minus what it used before the run
    files: int  # entries other than directories in the run's directory, at the end
    dir_bytes: int  # their apparent sizes, summed
    wall_s: float  # of CMD alone
    events: list[dict[str, Any]]  # quotafs's ENOSPCs and faults: op, path, errno, time
    ended: str  # "exit 0", "killed by SIGBUS", "hung (killed after 5s)"
    check_ended: str | None
    check_signal: str | None
    check_timed_out: bool
    stdout_tail: str
    stderr_tail: str
    check_stderr_tail: str | None

    def cmd_key(self) -> tuple[Any, ...]:
        """How CMD ended, as two runs compare it."""
        return (self.exit_code, self.signal, self.timed_out)

    def check_key(self) -> tuple[Any, ...]:
        """How CHECK ended, as two runs compare it."""
        return (self.check_exit_code, self.check_signal, self.check_timed_out)

    def outcome_key(self) -> tuple[Any, ...]:
        """What two runs must share to count as "the same" for --expect-same."""
        return self.cmd_key() + self.check_key()


@dataclass(frozen=True)
class CommandReport:
    """The result of compare_command: the reference, one TargetRun per target, and how
    they differ from the reference."""

    argv: tuple[str, ...]
    setup: str | None
    check: str | None
    timeout: float
    user: str | None
    limit_requested: int
    quotafs_limit: int
    quotafs_reserve: int
    reference: dict[str, Any]
    runs: list[TargetRun]
    differences: list[str]  # one sentence each: which target ended unlike the reference
    same: bool | None  # CMD and CHECK ended alike on the reference and quotafs-sigbus
    kernel: str = field(default_factory=platform.release)

    def run(self, target: str) -> TargetRun:
        """The run on `target` ("reference" names the reference whatever its kind)."""
        name = self.reference["kind"] if target == "reference" else target
        for r in self.runs:
            if r.target == name:
                return r
        raise KeyError(target)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["argv"] = list(self.argv)
        out["reference"] = {**self.reference, "quotafs_limit": self.quotafs_limit,
                            "quotafs_reserve": self.quotafs_reserve,
                            "limit_requested": self.limit_requested}
        return out


# -- checking the request -------------------------------------------------------------------

def parse_targets(names: Sequence[str] | str, kind: str) -> list[str]:
    """Target names, in order: "reference" (or the reference's kind) and the quotafs ones."""
    given = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    given = [n for n in given if n]
    out: list[str] = []
    for name in given:
        resolved = kind if name == "reference" else name
        if resolved not in (kind, *QUOTAFS_TARGETS):
            other = " (the reference is " + kind + ": --reference chooses it)" \
                if name in KINDS else ""
            raise QuotafsError(f"unknown target {name!r}{other}: choose from reference, "
                               f"{', '.join(QUOTAFS_TARGETS)}", ExitCode.USAGE)
        if resolved in out:
            raise QuotafsError(f"target {name!r} given twice", ExitCode.USAGE)
        out.append(resolved)
    if not out:
        raise QuotafsError("--targets is empty: choose from reference, "
                           f"{', '.join(QUOTAFS_TARGETS)}", ExitCode.USAGE)
    return out


def check_program(argv: Sequence[str]) -> tuple[str, ...]:
    """CMD must be there and executable, before any reference is built. Returns argv with
    a relative program path (./my-program) made absolute: it runs in another directory."""
    if not argv:
        raise QuotafsError("compare --: no command after --", ExitCode.USAGE)
    name = argv[0]
    path = name if "/" in name else shutil.which(name)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        why = "not found" if path is None or not os.path.exists(path) else "not executable"
        raise QuotafsError(f"compare --: cannot run {name}: {why}", ExitCode.USAGE)
    return (os.path.abspath(name) if "/" in name else name, *argv[1:])


def target_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The quotafs mount options given for the targets, minus those that are the
    compare's own business (NOT_FOR_TARGETS: a clear refusal)."""
    for name in options:
        if name in NOT_FOR_TARGETS:
            raise QuotafsError(f"compare -- CMD: {name.replace('_', '-')}: "
                               f"{NOT_FOR_TARGETS[name]}", ExitCode.USAGE)
    return dict(options)


def default_reference() -> str:
    """ext4 as root (the real thing), tmpfs otherwise (needs no root)."""
    return "ext4" if os.geteuid() == 0 else "tmpfs"


# -- one run --------------------------------------------------------------------------------

def _measure_dir(path: str) -> tuple[int, int]:
    """(entries other than directories, their apparent bytes) below path."""
    files = size = 0
    for root, dirs, names in os.walk(path):
        for name in names:
            files += 1
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(root, name)).st_size
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return files, size


def _event_dict(event: Event, start: float) -> dict[str, Any]:
    return {"op": event.op, "path": event.path, "errno": event.errno,
            "time": round(event.time - start, 3), "kind": event.kind, "effect": event.effect}


@dataclass(frozen=True)
class _Site:
    """Where one target's run happens: the directory as the program sees it and as we
    reach it, how programs start there, its usage now and its events."""

    name: str
    inside: str
    outside: str
    launch: Launch
    used: Callable[[], int]
    events: Callable[[], list[Event]]


def _reference_site(ref: Reference, user: str | None) -> _Site:
    return _Site(ref.kind, os.path.join(ref.inside_path, RUN_DIR),
                 os.path.join(ref.outside_path, RUN_DIR), ref.launch(user), ref.used_bytes,
                 list)


def _quotafs_site(name: str, mount: QuotaMount, user: str | None) -> _Site:
    path = os.path.join(mount.path, RUN_DIR)
    return _Site(name, path, path, Launch(user=user), lambda: mount.status().used,
                 mount.events)


@dataclass(frozen=True)
class Request:
    """What to run on every target, and as whom."""

    argv: tuple[str, ...]
    setup: str | None = None
    check: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    as_user: str | None = None


def run_on(site: _Site, req: Request, progress: Callable[[str], None]) -> TargetRun:
    """setup, CMD and check in a fresh directory of `site`; what came of them."""
    before = site.used()
    os.mkdir(site.outside)
    if req.as_user is not None:
        entry = passwd_entry(req.as_user)
        os.chown(site.outside, entry.pw_uid, entry.pw_gid)
    env = {**os.environ, "QUOTAFS_MOUNT": site.inside, "QUOTAFS_TARGET": site.name}
    # Programs start with their cwd on the outside path: that chdir happens in our own
    # namespace, and the tmpfs reference's launch prefix (nsenter --wd=.) takes it inside.
    if req.setup is not None:
        progress(f"{site.name:<15} setup")
        setup = run_shell(req.setup, site.outside, env, req.timeout, site.launch)
        if not setup.ok:
            last = (setup.stderr_tail.splitlines() or [""])[-1]
            raise QuotafsError(f"--setup failed on {site.name} ({setup.ended()})"
                               + (f": {last}" if last else ""), ExitCode.FAILURE)
    progress(f"{site.name:<15} running {req.argv[0]}")
    start = time.time()
    outcome = run_argv(req.argv, site.outside, env, req.timeout, site.launch)
    checked: Outcome | None = None
    if req.check is not None:
        progress(f"{site.name:<15} check")
        checked = run_shell(req.check, site.outside, env, req.timeout, site.launch)
    files, size = _measure_dir(site.outside)
    run = TargetRun(
        target=site.name, exit_code=outcome.exit_code, signal=outcome.signal,
        timed_out=outcome.timed_out,
        check_exit_code=checked.exit_code if checked else None,
        used_bytes=max(0, site.used() - before), files=files, dir_bytes=size,
        wall_s=outcome.wall_s, events=[_event_dict(e, start) for e in site.events()],
        ended=outcome.ended(), check_ended=checked.ended() if checked else None,
        check_signal=checked.signal if checked else None,
        check_timed_out=checked.timed_out if checked else False,
        stdout_tail=outcome.stdout_tail, stderr_tail=outcome.stderr_tail,
        check_stderr_tail=checked.stderr_tail if checked else None)
    progress(f"{site.name:<15} {run.ended}"
             + (f"; check {run.check_ended}" if checked else "")
             + f"; {format_size(run.used_bytes)} used")
    return run


# -- the comparison -------------------------------------------------------------------------

def differences(runs: Sequence[TargetRun], kind: str) -> list[str]:
    """One sentence per target whose CMD or CHECK ended unlike on the reference."""
    ref = next((r for r in runs if r.target == kind), None)
    if ref is None:
        return []
    out = []
    for r in runs:
        if r is ref:
            continue
        if r.cmd_key() != ref.cmd_key():
            out.append(f"{r.target}: CMD {r.ended}, {kind}: {ref.ended}")
        if r.check_key() != ref.check_key():
            out.append(f"{r.target}: CHECK {r.check_ended}, {kind}: {ref.check_ended}")
    return out


def _quotafs_options(name: str, ref: Reference, scratch: str, as_user: str | None,
                     options: Mapping[str, Any]) -> MountOptions:
    values: dict[str, Any] = {"limit": ref.quotafs_limit, "reserve": ref.quotafs_reserve,
                              **options}
    values.update(backing=os.path.join(scratch, name), mmap_sigbus=name == FAITHFUL,
                  allow_other=as_user is not None)
    made = MountOptions.from_values(values)
    if ref.kind == "tmpfs" and made.accounting in (None, "blocks"):
        # The fresh run directory takes a block on quotafs (as on ext4), nothing on tmpfs
        # (no metadata blocks): give it back, so the program has the same room on both.
        values["limit"] = ref.quotafs_limit + made.block_bytes
        made = MountOptions.from_values(values)
    return made


def _scratch(workdir: str | None, as_user: str | None) -> str:
    with signals_deferred():  # so no interrupt lands between mkdtemp and its cleanup
        scratch = tempfile.mkdtemp(prefix="quotafs-compare-", dir=workdir or "/var/tmp")
    if as_user is not None:
        os.chmod(scratch, 0o755)  # the program's user must reach the mount points below
    return scratch


def _run_quotafs(name: str, ref: Reference, req: Request, scratch: str,
                 options: Mapping[str, Any], progress: Callable[[str], None]) -> TargetRun:
    mount_options = _quotafs_options(name, ref, scratch, req.as_user, options)
    backing = mount_options.backing_dir
    os.makedirs(backing)
    os.makedirs(backing + "-mnt")
    with mounted_with(mount_options, backing + "-mnt") as mount:
        return run_on(_quotafs_site(name, mount, req.as_user), req, progress)


def compare_command(argv: Sequence[str], *, limit: int | str = "120M",
                    reference: str | None = None,
                    targets: Sequence[str] | str = DEFAULT_TARGETS,
                    setup: str | None = None, check: str | None = None,
                    timeout: float = DEFAULT_TIMEOUT, as_user: str | None = None,
                    workdir: str | None = None,
                    progress: Callable[[str], None] | None = None,
                    **options: Any) -> CommandReport:
    """Run argv once per target (the reference — "ext4" as root, else "tmpfs" —, quotafs,
    quotafs-sigbus), each in a fresh empty directory that is its working directory and its
    $QUOTAFS_MOUNT: `setup` (a shell command) first, then argv, then `check` (a shell
    command), each killed after `timeout` seconds (reported as hung). `limit`: the free
    space of the reference; the quotafs targets get its room (limit and root's reserve).
    `options`: mount options of the quotafs targets (reserve, block_size, accounting,
    inodes, no_cache, rules, seed, ...). Everything made is removed on any exit."""
    kind = check_kind(reference if reference is not None else default_reference())
    names = parse_targets(targets, kind)
    room = parse_size(limit) if isinstance(limit, str) else limit
    req = Request(check_program(argv), setup, check, float(timeout), as_user)
    extra = target_options(options)
    MountOptions.from_values({"limit": room, **extra})  # bad options: before anything is made
    if req.timeout <= 0:
        raise QuotafsError(f"--timeout must be positive, got {timeout}", ExitCode.USAGE)
    if not math.isfinite(req.timeout):  # nan and inf pass "> 0"; nan would never time out
        raise QuotafsError(f"--timeout must be a finite number of seconds, got {timeout}",
                           ExitCode.USAGE)
    if as_user is not None:
        if os.geteuid() != 0:
            raise QuotafsError("--as-user needs root (it switches to that user); without "
                               "it the program runs as you", ExitCode.PERMISSION)
        check_reachable(as_user, workdir or "/var/tmp")
    if workdir is not None and not os.path.isdir(workdir):
        raise QuotafsError(f"--workdir {workdir}: no such directory", ExitCode.USAGE)
    if workdir is not None:  # $QUOTAFS_MOUNT must name the directory from anywhere
        workdir = os.path.abspath(workdir)
    say = progress or (lambda line: None)
    runs: list[TargetRun] = []
    scratch = _scratch(workdir, as_user)
    try:  # from here on every exit removes scratch; the mounts below are gone by then
        with open_reference(kind, room, workdir=workdir) as ref:
            if any(name in QUOTAFS_TARGETS for name in names):
                check_fuse()  # before CMD runs on the reference, for nothing
            say(f"{kind} reference: {format_size(ref.quotafs_limit)} writable, "
                f"{format_size(ref.quotafs_reserve)} of it root's; quotafs limit "
                f"{ref.quotafs_limit:,} bytes, reserve {ref.quotafs_reserve:,}")
            described = ref.describe()
            for name in names:
                if name == kind:
                    runs.append(run_on(_reference_site(ref, as_user), req, say))
                else:
                    runs.append(_run_quotafs(name, ref, req, scratch, extra, say))
            limit_, reserve = ref.quotafs_limit, ref.quotafs_reserve
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    by = {r.target: r for r in runs}
    same = (by[kind].outcome_key() == by[FAITHFUL].outcome_key()
            if kind in by and FAITHFUL in by else None)
    return CommandReport(argv=req.argv, setup=setup, check=check, timeout=req.timeout,
                         user=as_user, limit_requested=room, quotafs_limit=limit_,
                         quotafs_reserve=reserve, reference=described, runs=runs,
                         differences=differences(runs, kind), same=same)
