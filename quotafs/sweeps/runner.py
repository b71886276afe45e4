"""`quotafs sweep`, the runs: the starting state, the baseline, one point, all points on
`jobs` threads — each run on a fresh quotafs mount over a fresh copy of the starting
state, all of it inside one temporary directory that is removed on any exit.

    plan = plan_sweep(["./updater"], check="./check", setup="./make-old-version")
    with plan:                       # the starting state and its copies live until close()
        result = run_point(plan, 3)  # one point (a pytest item per point does this)
    report = sweep([...], ...)       # plan + every point + close, in one call

A crash sweep (crash_points=True) runs every mount with --crash-sim; a point adds a
--crash rule on its (k+1)-th durability request (fsync, fsyncdir, rename: what Status
durability_ops counts), watches for the cut while CMD runs (every STOP_POLL_S), kills CMD
with its process group once it happened (the power is gone; the cut left the device
down, EIO to every request, so nothing CMD does after it lands), revives the device, or
cuts at CMD's end if it never came; then the check runs on the post-crash state. Every
run has a directory of notes outside its mount ($QUOTAFS_SWEEP_NOTES), which no cut
touches: where a program writes down what it reported as saved, for its check to compare.

Ctrl-C and SIGTERM (as KeyboardInterrupt in the main thread) set a cancel event that
each worker's running program sees within 0.1 s (compare.program.run_argv); each worker
then unmounts and removes its copy, and the main thread waits for them before it
re-raises.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from quotafs.client.api import QuotaMount, check_fuse
from quotafs.compare.program import DEFAULT_TIMEOUT, Outcome, Program, run_argv, run_shell
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.interrupts import signals_deferred
from quotafs.options import MountOptions
from quotafs.protocol import CrashReport
from quotafs.reference.base import AS_CALLER, Launch
from quotafs.reference.tools import find_tool, last_line, run_tool
from quotafs.sweeps.plan import (
    Baseline,
    CrashPlan,
    Ended,
    Point,
    PointResult,
    SweepReport,
    check_choice,
    check_crash_choice,
    choose_crash_points,
    choose_points,
    crash_verdict,
    verdict,
)
from quotafs.users import passwd_entry

# Mount options a sweep sets itself, or that cannot hold across its runs.
NOT_FOR_SWEEP = {
    "limit": "the sweep sets the limit of each run itself",
    "backing": "each run gets a fresh copy of the starting state (use from_dir)",
    "keep_backing": "each run's copy is removed after it",
    "like_ext4": "it sets a limit, and the sweep sets the limit of each run itself",
    "reserve": "a reserve needs a limit, and the baseline runs without one",
    "rules": "the sweep's --each-write adds its own rule",
    "rules_file": "the sweep's --each-write adds its own rule",
    "log_file": "each run's daemon logs to a file of its own, shown when not empty",
    "allow_other": "as_user sets it where it is needed",
}
# The requests a crash sweep counts (Status.durability_ops) and cuts at: fault rules name
# fsync and fdatasync both "fsync".
DURABILITY_OPS = ["fsync", "fsyncdir", "rename"]
NOTES = "notes"  # each run's directory of notes, beside its mount: $QUOTAFS_SWEEP_NOTES

Progress = Callable[[int, int, int, PointResult], None]  # done, total, failed, the last


def _ended(o: Outcome) -> Ended:
    return Ended(o.exit_code, o.signal, o.timed_out)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one run on a fresh mount gave."""

    start: int
    limit: int | None
    run: Outcome
    check: Outcome | None
    used: int
    peak: int
    allocating_writes: int
    enospc_count: int
    faults_fired: int
    block_size: int
    daemon_log: str
    durability_ops: int = 0
    cut: CrashReport | None = None  # the crash point's power cut
    cut_in_run: bool = False  # it came while CMD ran (the rule's), not after CMD ended


class SweepPlan:
    """The starting state, the baseline and the points of a sweep; close() (or the end of
    a `with` block) unmounts nothing — each run unmounts itself — but removes the starting
    state and the temporary directory."""

    def __init__(self, program: Program, options: MountOptions, root: str, start: str,
                 seed: int, launch: Launch = AS_CALLER, crash: CrashPlan | None = None) -> None:
        self.program = program
        self.crash = crash  # a crash sweep: how its points cut (None: disk-full points)
        self.launch = launch  # how CMD, --setup and --check start (as_user: as that user)
        self.options = options
        self.root = root  # the sweep's temporary directory: every run's copy is below it
        self.start = start  # the starting state, copied for each run
        self.seed = seed
        self.baseline: Baseline | None = None
        self.points: list[Point] = []
        self._closed = False

    def __enter__(self) -> SweepPlan:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            shutil.rmtree(self.root, ignore_errors=True)

    def run_point(self, index: int, cancel: threading.Event | None = None) -> PointResult:
        """Run point `index` (1-based, as in `points`) and return its result."""
        if self.baseline is None:
            raise QuotafsError("the sweep has no baseline yet", ExitCode.USAGE)
        if not 1 <= index <= len(self.points):
            raise QuotafsError(f"no point {index}: the sweep has points 1 to "
                               f"{len(self.points)}", ExitCode.USAGE)
        point = self.points[index - 1]
        got = _run_once(self, f"point-{index}", point, cancel)
        check = _ended(got.check) if got.check is not None else None
        cut = got.cut
        if point.cut_after is not None:
            judged = crash_verdict(_ended(got.run), check, got.cut_in_run)
        else:
            judged = verdict(_ended(got.run), check)
        return PointResult(
            index=index, limit=got.limit, nth_write=point.nth_write,
            room=None if got.limit is None else got.limit - got.start,
            exit_code=got.run.exit_code, signal=got.run.signal, timed_out=got.run.timed_out,
            check_exit_code=got.check.exit_code if got.check else None,
            check_signal=got.check.signal if got.check else None,
            check_timed_out=got.check.timed_out if got.check else False,
            verdict=judged,
            wall_s=got.run.wall_s, used_bytes=got.used, enospc_count=got.enospc_count,
            faults_fired=got.faults_fired, stderr_tail=got.run.stderr_tail,
            check_stderr_tail=got.check.stderr_tail if got.check else "",
            daemon_log=got.daemon_log, cut_after=point.cut_after,
            cut_at_end=point.cut_at_end, cut_killed=got.cut_in_run,
            lost=cut.lost if cut else (), lost_bytes=cut.lost_bytes if cut else 0,
            lost_names=cut.lost_names if cut else 0)


def run_point(plan: SweepPlan, index: int, cancel: threading.Event | None = None) -> PointResult:
    """One point of a plan (plan_sweep), alone: a fresh mount and copy, CMD, the check."""
    return plan.run_point(index, cancel)


# -- one run ------------------------------------------------------------------------------

def _copy_tree(source: str, target: str) -> None:
    """cp -a: modes, owners, times, links, xattrs and holes kept, as a copy of a real
    directory needs (shutil.copytree fills holes and loses hard links)."""
    result = run_tool([find_tool("cp", code=ExitCode.FAILURE), "-a", "--", source, target])
    if result.returncode != 0:
        raise QuotafsError(f"cannot copy the starting state {source}: {last_line(result)}",
                           ExitCode.FAILURE)


def _env(program: Program, mountpoint: str, name: str,
         notes: str | None = None) -> dict[str, str]:
    env = {**os.environ, **program.extra_env, "QUOTAFS_MOUNT": mountpoint,
           "QUOTAFS_SWEEP_RUN": name}
    if notes is not None:
        env["QUOTAFS_SWEEP_NOTES"] = notes
    return env


def _notes_dir(rundir: str, launch: Launch) -> str:
    """The run's notes directory, outside its mount (a cut never reaches it), CMD's and
    its check's: as_user's, if given."""
    notes = os.path.join(rundir, NOTES)
    os.mkdir(notes, 0o700)
    if launch.user is not None:
        entry = passwd_entry(launch.user)
        os.chown(notes, entry.pw_uid, entry.pw_gid)
    return notes


def _arm_cut(mount: QuotaMount, point: Point | None, crash: CrashPlan | None) -> None:
    """A crash point: the cut on its (k+1)-th durability request."""
    if crash is not None and point is not None and point.cut_after is not None:
        mount.add_fault(DURABILITY_OPS, crash=True, crash_model=crash.model,
                        crash_torn=crash.torn, nth=point.cut_after + 1)


def _finish_cut(mount: QuotaMount, point: Point | None, crash: CrashPlan | None,
                seed: int) -> CrashReport | None:
    """After CMD of a crash point (its process group gone): the rule's cut, which left
    the device down so that nothing CMD did after it landed, and the device back; or
    (CMD ended first) the cut now."""
    if crash is None or point is None or point.cut_after is None:
        return None
    if mount.status().crashes:
        mount.revive()
        return mount.last_crash()
    return mount.crash(crash.model, crash.torn, seed=seed)


def _read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4096:].strip()
    except FileNotFoundError:
        return ""


def _run_once(plan: SweepPlan, name: str, point: Point | None,
              cancel: threading.Event | None) -> _Run:
    """A fresh copy of the starting state on a fresh mount; the disk full as `point`
    says (after the copy is mounted, before CMD); CMD; then room again and the check."""
    program = plan.program
    rundir = tempfile.mkdtemp(prefix=f"{name}-", dir=plan.root)
    os.chmod(rundir, 0o711)  # as_user's programs pass through to the mount point
    try:
        data, mnt, log = (os.path.join(rundir, n) for n in ("data", "mnt", "daemon.log"))
        _copy_tree(plan.start, data)
        os.mkdir(mnt)
        notes = _notes_dir(rundir, plan.launch)
        options = dataclasses.replace(plan.options, backing=data, log_file=log)
        mount = QuotaMount.start_with(options, mnt)
        try:
            before = mount.status()
            start, limit = before.used, None
            if point is not None and point.room is not None:
                limit = start + point.room
                mount.set_limit(limit)
            if point is not None and point.nth_write is not None:
                mount.add_fault("write", allocating=True, errno="ENOSPC",
                                from_nth=point.nth_write)
            _arm_cut(mount, point, plan.crash)
            env = _env(program, mount.path, name, notes)
            cutting = plan.crash is not None and point is not None
            run = run_argv(program.argv, mount.path, env, program.timeout, plan.launch,
                           cancel, stop=(lambda: mount.status().crashes > 0) if cutting
                           else None)
            cut_in_run = cutting and mount.status().crashes > 0
            cut = _finish_cut(mount, point, plan.crash, plan.seed)
            after = mount.status()
            mount.set_limit(None)
            mount.clear_faults()
            check = (run_shell(program.check, mount.path, env, program.timeout, plan.launch,
                               cancel) if program.check is not None else None)
        finally:
            mount.close()
        return _Run(start=start, limit=limit, run=run, check=check, used=after.used,
                    peak=after.peak_used - start,
                    allocating_writes=after.allocating_writes - before.allocating_writes,
                    enospc_count=after.enospc_count - before.enospc_count,
                    faults_fired=after.faults_fired, block_size=after.block_size,
                    daemon_log=_read_log(log),
                    durability_ops=after.durability_ops - before.durability_ops, cut=cut,
                    cut_in_run=cut_in_run)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- the plan -----------------------------------------------------------------------------

def _starting_state(program: Program, from_dir: str | None, root: str, launch: Launch) -> str:
    """workdir/start: a copy of from_dir (or an empty directory), then --setup in it.
    With as_user, the directory itself (each run's mount root) is that user's."""
    start = os.path.join(root, "start")
    if from_dir is not None:
        _copy_tree(from_dir, start)
    else:
        os.mkdir(start)
    if launch.user is not None:
        entry = passwd_entry(launch.user)
        os.chown(start, entry.pw_uid, entry.pw_gid)
    if program.setup is not None:
        done = run_shell(program.setup, start, _env(program, start, "setup"),
                         program.timeout, launch)
        if not done.ok:
            raise QuotafsError(f"--setup {done.ended()}: "
                               f"{_last(done.stderr_tail) or 'no output'}", ExitCode.FAILURE)
    return start


def _resolved(program: Program, start: str) -> Program:
    """CMD runs in each run's copy of the starting state: a relative program path
    (./updater) names a file there if the starting state has one, else the caller's file
    (made absolute, as compare -- CMD does); in neither, one line before the baseline."""
    name = program.argv[0]
    if "/" not in name or os.path.isabs(name) or os.path.lexists(os.path.join(start, name)):
        return program
    if not os.path.exists(name):
        raise QuotafsError(f"cannot run {name}: neither the starting state nor the current "
                           "directory has it", ExitCode.USAGE)
    return dataclasses.replace(program, argv=(os.path.abspath(name), *program.argv[1:]))


def _last(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def _check_from(from_dir: str | None) -> str | None:
    if from_dir is None:
        return None
    if not os.path.isdir(from_dir):
        why = "does not exist" if not os.path.lexists(from_dir) else "is not a directory"
        raise QuotafsError(f"--from {from_dir} {why}", ExitCode.USAGE)
    return os.path.abspath(from_dir)


def sweep_options(values: Mapping[str, Any]) -> MountOptions:
    """The mount options of every run, checked; those a sweep sets itself are refused."""
    for name, why in NOT_FOR_SWEEP.items():
        if values.get(name) not in (None, False, ()):
            raise QuotafsError(f"{name.replace('_', '-')}: not for sweep: {why}",
                               ExitCode.USAGE)
    return MountOptions.from_values(values)


def _baseline(plan: SweepPlan) -> Baseline:
    """CMD with room: what it allocates; a failure here is the user's to fix first."""
    got = _run_once(plan, "baseline", None, None)
    base = Baseline(start_bytes=got.start, peak_bytes=got.peak,
                    allocating_writes=got.allocating_writes, block_size=got.block_size,
                    exit_code=got.run.exit_code, signal=got.run.signal,
                    timed_out=got.run.timed_out,
                    check_exit_code=got.check.exit_code if got.check else None,
                    wall_s=got.run.wall_s, stderr_tail=got.run.stderr_tail,
                    check_stderr_tail=got.check.stderr_tail if got.check else "",
                    durability_ops=got.durability_ops)
    if not got.run.ok:
        raise QuotafsError(f"the baseline run (no limit) {got.run.ended()}: "
                           f"{_last(got.run.stderr_tail) or 'no output'}; sweep needs a "
                           "program that works when it has room", ExitCode.FAILURE)
    if got.check is not None and not got.check.ok:
        raise QuotafsError(f"the check after the baseline run (no limit) "
                           f"{got.check.ended()}: {_last(got.check.stderr_tail) or 'no output'}"
                           "; sweep needs a check that passes when the program had room",
                           ExitCode.FAILURE)
    if got.peak <= 0 and plan.crash is None:  # a crash sweep cuts what it wrote, or not
        raise QuotafsError("the baseline run allocated nothing above the starting state: "
                           "no point at which the disk could fill", ExitCode.FAILURE)
    return base


def plan_sweep(argv: Sequence[str], *, setup: str | None = None, from_dir: str | None = None,
               check: str | None = None, points: int | None = None, every: int | None = None,
               each_write: bool = False, max_runs: int | None = None,
               timeout: float = DEFAULT_TIMEOUT, seed: int | None = None,
               workdir: str | None = None, env: Mapping[str, str] | None = None,
               note: Callable[[str], None] | None = None, as_user: str | None = None,
               crash_points: bool = False, model: str | None = None, torn: bool = False,
               **mount_options: Any) -> SweepPlan:
    """Check everything, make the starting state, run the baseline, choose the points.

    argv: the program (its working directory is the mount: $QUOTAFS_MOUNT); setup: a
    shell command run once in the empty starting directory (after from_dir is copied
    there, if given); check: a shell command run after each run, with room again;
    points (default 20) / every (bytes) / each_write: how the points are chosen, at most
    max_runs of them; timeout: seconds for each command; seed: the fault engine's;
    workdir: where the sweep's temporary directory goes (default $TMPDIR); env: added to
    the environment; note: told (a line) when the baseline starts, once everything is
    checked; as_user: run CMD, setup and check as this user (name or uid; needs root);
    mount_options: those of `quotafs mount` that hold for every run
    (accounting, block_size, inodes, mmap_sigbus, no_cache, debug...);
    crash_points: a crash sweep instead (every mount with crash_sim): a power cut after
    CMD's k-th durability operation for k = 0 .. N (points: N of them, seeded), cut as
    `quotafs crash --model model --torn` would (model "posix" by default, or "ext4").

    Use the plan in a `with` block (or close() it): it holds the starting state.
    """
    program = _program(argv, setup, check, timeout, env)
    crash = _crash_plan(crash_points, model, torn, every, each_write, max_runs)
    if crash is not None:
        mount_options = {**mount_options, "crash_sim": True}
    else:
        check_choice(points, every, each_write, max_runs)
    source = _check_from(from_dir)
    if seed is None:
        seed = random.getrandbits(32)
    options = sweep_options({**mount_options, "seed": seed})
    launch = _launch(as_user)
    if as_user is not None:  # the user reaches a mount served by root
        options = dataclasses.replace(options, allow_other=True)
    if workdir is not None and not os.path.isdir(workdir):
        raise QuotafsError(f"--workdir {workdir} is not a directory", ExitCode.USAGE)
    check_fuse()  # before --setup and the baseline run
    root = tempfile.mkdtemp(prefix="quotafs-sweep-", dir=workdir)
    plan = SweepPlan(program, options, root, os.path.join(root, "start"), seed, launch,
                     crash)
    try:
        os.chmod(root, 0o711)
        plan.start = _starting_state(program, source, root, launch)
        plan.program = program = _resolved(program, plan.start)
        if note is not None:
            note(f"baseline: {printable(shlex.join(argv))} with no limit")
        plan.baseline = base = _baseline(plan)
        if crash is not None:
            plan.points = choose_crash_points(base.durability_ops, points, seed)
        else:
            plan.points = choose_points(base.peak_bytes, base.allocating_writes,
                                        base.block_size, points=points, every=every,
                                        each_write=each_write, max_runs=max_runs)
        if not plan.points:  # --each-write of a program that allocates by other means
            raise QuotafsError("the baseline run made no allocating write request (its "
                               "space came from others, such as a growing truncate in "
                               "apparent accounting): --each-write has no point; use "
                               "--points or --every", ExitCode.FAILURE)
    except BaseException:
        plan.close()
        raise
    return plan


def _crash_plan(crash_points: bool, model: str | None, torn: bool, every: int | None,
                each_write: bool, max_runs: int | None) -> CrashPlan | None:
    """The crash sweep's settings, checked; None for a disk-full sweep (which refuses
    --model and --torn)."""
    if not crash_points:
        for name, value in (("--model", model), ("--torn", torn or None)):
            if value is not None:
                raise QuotafsError(f"{name}: only with --crash-points (how its power cuts "
                                   "are made)", ExitCode.USAGE)
        return None
    check_crash_choice(every, each_write, max_runs)
    return CrashPlan(model or "posix", torn)


def _launch(as_user: str | None) -> Launch:
    if as_user is None:
        return AS_CALLER
    if os.geteuid() != 0:
        raise QuotafsError("--as-user needs root (run the sweep as root, or leave it out to "
                           "run as yourself)", ExitCode.PERMISSION)
    passwd_entry(as_user)  # an unknown user: one line, before anything is made
    return Launch(user=as_user)


def _program(argv: Sequence[str], setup: str | None, check: str | None, timeout: float,
             env: Mapping[str, str] | None) -> Program:
    if isinstance(argv, str):
        raise QuotafsError("argv: give the command as a list of words, e.g. "
                           '["./updater", "--out", "data"]', ExitCode.USAGE)
    if not argv:
        raise QuotafsError("no command: give the program to sweep after --, e.g. "
                           "quotafs sweep --check ./check -- ./updater", ExitCode.USAGE)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise QuotafsError(f"--timeout: must be a number of seconds above 0, got {timeout!r}",
                           ExitCode.USAGE)
    return Program(tuple(argv), setup=setup, check=check, timeout=float(timeout),
                   extra_env=dict(env or {}))


# -- every point --------------------------------------------------------------------------

def check_jobs(jobs: int) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise QuotafsError(f"--jobs: must be at least 1, got {jobs!r}", ExitCode.USAGE)


def run_points(plan: SweepPlan, jobs: int = 1, progress: Progress | None = None,
               indices: Sequence[int] | None = None) -> list[PointResult]:
    """Run the points (all, or `indices`) on `jobs` threads, each run on its own mount;
    results in point order. KeyboardInterrupt (Ctrl-C, SIGTERM) stops every run, waits
    until each has unmounted and removed its copy, then propagates."""
    check_jobs(jobs)
    todo = list(indices if indices is not None else range(1, len(plan.points) + 1))
    todo.reverse()  # popped from the end: in point order
    results: dict[int, PointResult] = {}
    errors: list[BaseException] = []
    cancel = threading.Event()
    lock = threading.Lock()
    total = len(todo)

    def work(done: threading.Event) -> None:
        try:
            run_each()
        finally:
            done.set()

    def run_each() -> None:
        while not cancel.is_set():
            with lock:
                if not todo:
                    return
                index = todo.pop()
            try:
                result = plan.run_point(index, cancel)
            except KeyboardInterrupt:
                return  # cancelled: the run cleaned up after itself
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                cancel.set()
                return
            with lock:
                results[index] = result
                if progress is not None:
                    progress(len(results), total,
                             sum(r.failed for r in results.values()), result)

    # Each worker's own "done" event, waited on instead of Thread.join: a join that Ctrl-C
    # interrupts marks a live thread as ended (CPython 3.11, bpo-45274's fix), and a later
    # join returns at once while that run still unmounts and removes its copy.
    done = [threading.Event() for _ in range(min(jobs, total))]
    threads = [threading.Thread(target=work, args=(finished,), name=f"quotafs-sweep-{n}")
               for n, finished in enumerate(done)]
    try:
        for thread in threads:
            thread.start()
        for finished in done:
            while not finished.wait(0.2):  # a timed wait: Ctrl-C reaches this thread
                pass
    except BaseException:
        cancel.set()
        with signals_deferred(reraise=False):  # the user asked to stop already
            for thread, finished in zip(threads, done, strict=True):
                if thread.ident is not None:  # started
                    finished.wait()
        raise
    if errors:
        raise errors[0]
    return [results[i] for i in sorted(results)]


def sweep(argv: Sequence[str], *, setup: str | None = None, from_dir: str | None = None,
          check: str | None = None, points: int | None = None, every: int | None = None,
          each_write: bool = False, max_runs: int | None = None, jobs: int = 1,
          timeout: float = DEFAULT_TIMEOUT, seed: int | None = None,
          workdir: str | None = None, env: Mapping[str, str] | None = None,
          progress: Progress | None = None, as_user: str | None = None,
          **mount_options: Any) -> SweepReport:
    """The whole sweep: plan_sweep(...) (same arguments, crash_points, model and torn
    among them), every point on `jobs` parallel mounts, and the report; nothing is left
    behind. report.exit_code is 0 when every point is ok, report.failures the others."""
    check_jobs(jobs)
    began = time.monotonic()
    with plan_sweep(argv, setup=setup, from_dir=from_dir, check=check, points=points,
                    every=every, each_write=each_write, max_runs=max_runs, timeout=timeout,
                    seed=seed, workdir=workdir, env=env, as_user=as_user,
                    **mount_options) as plan:
        results = run_points(plan, jobs, progress)
        assert plan.baseline is not None
        return SweepReport(argv=tuple(argv), baseline=plan.baseline, points=tuple(results),
                           seed=plan.seed, wall_s=round(time.monotonic() - began, 3),
                           crash=plan.crash)

