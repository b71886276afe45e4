"""`quotafs sweep [options] -- CMD [ARG...]`: its arguments, the progress line on stderr,
the summary table or --json; the sweep itself is quotafs.sweeps.runner."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from quotafs.cli.crashopts import add_crash_model_options
from quotafs.cli.mountopts import add_mount_options
from quotafs.compare.program import DEFAULT_TIMEOUT
from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import sigterm_as_interrupt
from quotafs.sweeps.plan import (
    CHECK_FAILED_AFTER_SUCCESS,
    DATA_LOST,
    DEFAULT_POINTS,
    VERDICTS,
    Baseline,
    PointResult,
    SweepReport,
)
from quotafs.units import format_size, parse_size

# The mount flags that hold for every run of a sweep (cli/mountopts.py defines them).
SWEEP_MOUNT_OPTIONS = ("accounting", "block_size", "inodes", "mmap_sigbus", "no_cache",
                       "debug", "crash_sim")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="run a program with the disk full at each point, check its data",
        description="Run CMD once with room (the baseline: what it allocates), then once "
                    "per point with the disk full there — a limit part of the way from the "
                    "starting usage to the baseline's peak, or ENOSPC from the k-th "
                    "allocating write on — each on a fresh mount and a fresh copy of the "
                    "starting state; after each run, room again and --check. Exit 1 when "
                    "any point is not ok. See docs/usage.md#sweep.")
    p.add_argument("--setup", metavar="CMD",
                   help="shell command that makes the starting state, run once in an empty "
                        "directory (after --from is copied there, if given)")
    p.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="copy DIR as the starting state (cp -a)")
    p.add_argument("--check", metavar="CMD",
                   help="shell command run after each run in the same directory, with room "
                        "again: exit 0 when the data is sound (an integrity check, a restart)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--points", type=_count(), default=None, metavar="N",
                      help=f"limits at i/N of the way from the starting usage to the peak, "
                           f"i = 0..N-1, rounded down to blocks (default {DEFAULT_POINTS})")
    pick.add_argument("--every", type=_size, default=None, metavar="SIZE",
                      help="a limit every SIZE above the starting usage, up to the peak")
    pick.add_argument("--each-write", action="store_true",
                      help="ENOSPC from the k-th allocating write on, for each k = 1..W "
                           "(W: the baseline's allocating writes)")
    p.add_argument("--crash-points", action="store_true",
                   help="power cuts instead of a full disk: each run is cut after CMD's "
                        "k-th durability operation (fsync, fdatasync, fsyncdir, rename), "
                        "k = 0..N from the baseline; with --points N, N of them (seeded); "
                        "mounts with --crash-sim. See docs/sweep.md#crash-points")
    add_crash_model_options(p, needs="--crash-points", keep_fraction=False)
    p.add_argument("--max-runs", type=_count(), default=None, metavar="N",
                   help="run at most N points, evenly spread (the first and last kept)")
    p.add_argument("--jobs", "-j", type=_count(), default=1, metavar="N",
                   help="points run in parallel, each on its own mount (default 1)")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds for each run of CMD and of the check; a run past it is "
                        f"killed and reported hung (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--seed", type=_count(minimum=0), default=None,
                   help="the fault engine's seed on every mount (default: random, printed)")
    p.add_argument("--workdir", metavar="DIR",
                   help="where the sweep's temporary directory goes: the starting state and "
                        "each run's copy and mount point (default $TMPDIR or /tmp)")
    p.add_argument("--as-user", metavar="USER",
                   help="run CMD, --setup and --check as USER (name or uid; root only): "
                        "the starting directory is USER's, the mounts let USER in")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    add_mount_options(p, only=SWEEP_MOUNT_OPTIONS)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                   help="the program; its working directory is the mount ($QUOTAFS_MOUNT)")
    p.set_defaults(func=cmd_sweep)


def _count(minimum: int = 1) -> Any:
    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, "
                                             f"got {text!r}")
        return int(text)
    return parse


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except QuotafsError as exc:  # raised out of parse_args, it would be a traceback
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return size


def _seconds(text: str) -> float:
    try:
        value = float(text) if text.isascii() else -1.0
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


# -- progress -----------------------------------------------------------------------------

class _Progress:
    """points done / total, failures so far, time left: an updating line on a tty, plain
    lines in a log."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.began = time.monotonic()

    def say(self, line: str) -> None:
        if self.enabled:
            clear = "\r\033[K" if self.tty else ""
            print(f"{clear}sweep: {line}", file=sys.stderr, end="" if self.tty else "\n",
                  flush=True)

    def point(self, done: int, total: int, failed: int, last: PointResult) -> None:
        elapsed = time.monotonic() - self.began
        left = elapsed / done * (total - done)
        worst = f" (point {last.index}: {last.verdict})" if last.failed else ""
        self.say(f"{done}/{total} points, {failed} failed{worst}, ~{left:.0f}s left")

    def end(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


# -- the report ---------------------------------------------------------------------------

def _baseline_line(b: Baseline, crash: bool = False) -> str:
    return (f"baseline (no limit): exit {b.exit_code}, check "
            f"{'none' if b.check_exit_code is None else f'exit {b.check_exit_code}'}; "
            f"start {format_size(b.start_bytes)}, peak +{format_size(b.peak_bytes)}, "
            f"{b.allocating_writes} allocating writes, "
            + (f"{b.durability_ops} durability ops, " if crash else "")
            + f"{b.wall_s:.1f}s")


def print_report(report: SweepReport) -> None:
    print(_baseline_line(report.baseline, report.crash is not None))
    crash = report.crash
    print(f"seed {report.seed}" + (f", model {crash.model}{' torn' if crash.torn else ''}"
                                   if crash else ""))
    where = "power cut" if crash else "disk full at"
    print(f"{'point':>5}  {where:<34} {'CMD':<10} {'check':<10} verdict")
    for p in report.points:
        check = "-" if p.check is None else p.check.describe()
        mark = "  <-- CMD said it succeeded" if p.verdict == CHECK_FAILED_AFTER_SUCCESS else ""
        what = f"  ({p.lost_summary()})" if crash else ""
        print(f"{p.index:>5}  {p.where():<34} {p.cmd_ended():<10} "
              f"{check:<10} {p.verdict.upper() if p.failed else p.verdict}{mark}{what}")
    counts = ", ".join(f"{report.count(v)} {v}" for v in VERDICTS if report.count(v))
    print(f"{len(report.points)} points in {report.wall_s:.1f}s: {counts}")
    lost = [p for p in report.points if p.verdict == DATA_LOST]
    if lost:
        print(f"DATA LOST AT THE CUT at {len(lost)} point(s) (points "
              f"{', '.join(str(p.index) for p in lost)}): the check failed after the cut")
    worst = [p for p in report.points if p.verdict == CHECK_FAILED_AFTER_SUCCESS]
    if worst:
        print(f"DATA LOST AFTER REPORTED SUCCESS at {len(worst)} point(s) (points "
              f"{', '.join(str(p.index) for p in worst)}): CMD exited 0, the check failed")
    for p in report.points:
        if p.daemon_log:
            print(f"point {p.index}: the daemon logged: {p.daemon_log.splitlines()[-1]}",
                  file=sys.stderr)


def cmd_sweep(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise QuotafsError("no command: give the program after --, e.g. quotafs sweep "
                           "--check ./check -- ./updater", ExitCode.USAGE)
    options = {name: getattr(args, name) for name in SWEEP_MOUNT_OPTIONS
               if hasattr(args, name)}
    progress = _Progress(not args.quiet)
    from quotafs.sweeps.runner import plan_sweep, run_points  # here: mounts, references

    with sigterm_as_interrupt():
        plan = plan_sweep(argv, setup=args.setup, from_dir=args.from_dir, check=args.check,
                          points=args.points, every=args.every, each_write=args.each_write,
                          max_runs=args.max_runs, timeout=args.timeout, seed=args.seed,
                          workdir=args.workdir, note=progress.say, as_user=args.as_user,
                          crash_points=args.crash_points, model=args.model, torn=args.torn,
                          **options)
        with plan:
            assert plan.baseline is not None
            progress.say(f"{_baseline_line(plan.baseline, plan.crash is not None)}; "
                         f"{len(plan.points)} points, "
                         f"seed {plan.seed}")
            progress.began = time.monotonic()
            try:
                results = run_points(plan, args.jobs, progress.point)
            finally:
                progress.end()
            report = SweepReport(argv=tuple(argv), baseline=plan.baseline,
                                 points=tuple(results), seed=plan.seed,
                                 wall_s=round(time.monotonic() - progress.began, 3),
                                 crash=plan.crash)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    return report.exit_code
