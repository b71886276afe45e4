"""`quotafs sweep`, the pure part: which points to run after the baseline, the verdict of
a point, and the report's typed results — no mounts, no processes.

A point is one way for the disk to be full: a limit `room` bytes above the starting
usage (`--points N`, `--every SIZE`), or ENOSPC from the k-th allocating write on
(`--each-write`). With `--crash-points`, a point is a power cut instead: after CMD's k-th
durability operation (fsync, fdatasync, fsyncdir, rename), for k = 0 .. N, N the
baseline's count; k = N is a cut at the end of CMD. docs/usage.md#sweep is the user's
reference, docs/sweep.md#crash-points the guide.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import asdict, dataclass
from typing import Any

from quotafs.errors import ExitCode, QuotafsError
from quotafs.protocol import CRASH_MODELS, LostItem
from quotafs.units import format_size

DEFAULT_POINTS = 20

# Verdicts, from the best to the worst.
OK = "ok"
CRASHED = "crashed"  # CMD was killed by a signal; the check passed (or there is none)
HUNG = "hung"  # CMD ran past --timeout and was killed; the check passed (or none)
CHECK_FAILED = "check failed"  # CMD reported a failure (or crashed), its data is bad
CHECK_FAILED_AFTER_SUCCESS = "check failed after success"  # CMD exited 0, data is bad
# A crash point whose check failed: after the power cut, data the program had reported as
# saved is gone (the check's judgement); at the end of CMD that exited 0, it is the above.
DATA_LOST = "data lost at the cut"
VERDICTS = (OK, CRASHED, HUNG, CHECK_FAILED, DATA_LOST, CHECK_FAILED_AFTER_SUCCESS)


@dataclass(frozen=True)
class Ended:
    """How a program ended (compare.program.Outcome, without its run-time details)."""

    exit_code: int | None
    signal: str | None
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        """A table cell: "exit 1", "SIGBUS" (killed by it), "hung"."""
        if self.timed_out:
            return "hung"
        if self.signal is not None:
            return self.signal
        return f"exit {self.exit_code}"


def verdict(run: Ended, check: Ended | None) -> str:
    """A point's verdict. A failed check decides (the data is what users lose), loudest
    when CMD had exited 0; CMD exiting non-zero with a passing check is ok: it reported
    the failure and left its data sound."""
    if check is not None and not check.ok:
        return CHECK_FAILED_AFTER_SUCCESS if run.ok else CHECK_FAILED
    if run.timed_out:
        return HUNG
    if run.signal is not None:
        return CRASHED
    return OK


def crash_verdict(run: Ended, check: Ended | None, cut_killed: bool) -> str:
    """A crash point's verdict. `cut_killed`: the cut came while CMD ran, so CMD ended
    with it however it did (killed by the sweep, or by the dead device's EIO or SIGBUS
    first) — the point, not a failure of CMD's own; only the check counts then. A failed
    check is data lost at the cut, loudest when CMD exited 0 (the cut at its end, or a
    CMD that ignored the dead device's errors); a CMD that crashed or hung before the
    cut is judged as verdict() does."""
    if check is not None and not check.ok:
        return CHECK_FAILED_AFTER_SUCCESS if run.ok else DATA_LOST
    if cut_killed:
        return OK
    return verdict(run, None)


# -- choosing the points ----------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One run of the sweep: the disk full `room` bytes above the starting usage, or
    from the `nth_write`-th allocating write on (exactly one of the two is set)."""

    index: int  # 1-based, in the order of the report
    room: int | None = None
    nth_write: int | None = None
    fraction: float | None = None  # --points: the fraction of the way to the peak
    cut_after: int | None = None  # --crash-points: the cut after this many durability ops
    cut_at_end: bool = False  # --crash-points: k = N, the cut when CMD has ended

    def describe(self) -> str:
        if self.cut_after is not None:
            return cut_where(self.cut_after, self.cut_at_end)
        if self.nth_write is not None:
            return f"ENOSPC from allocating write {self.nth_write} on"
        return f"limit start + {self.room} bytes"


def fractions(points: int) -> list[float]:
    """--points N: i/N for i = 0 .. N-1. 0 is a disk already full at the start; the peak
    itself (1) is left out, as the baseline showed that CMD fits there."""
    return [i / points for i in range(points)]


def _spread(items: list[Point], max_runs: int | None) -> list[Point]:
    """At most max_runs of the items, evenly spread, the first and the last kept."""
    if max_runs is None or len(items) <= max_runs:
        return items
    if max_runs == 1:
        return items[:1]
    last = len(items) - 1
    picked = sorted({round(i * last / (max_runs - 1)) for i in range(max_runs)})
    return [items[i] for i in picked]


def _numbered(points: list[Point]) -> list[Point]:
    return [dataclasses.replace(p, index=i) for i, p in enumerate(points, start=1)]


def cut_where(cut_after: int, at_end: bool) -> str:
    """Where a crash point cuts, in a few words."""
    if at_end:
        return f"cut at the end (after op {cut_after})" if cut_after else "cut at the end"
    return f"cut at durability op {cut_after + 1}"


def choose_crash_points(durability_ops: int, points: int | None, seed: int) -> list[Point]:
    """--crash-points: a cut after the k-th durability operation for each k = 0 .. N (N =
    the baseline's durability_ops; k = N is the end of CMD), or `points` of them: the
    first and the last, and a choice among the others seeded by `seed` (the sweep's), so
    that --seed repeats the sweep."""
    if points is not None and (isinstance(points, bool) or not isinstance(points, int)
                               or points < 1):
        raise QuotafsError(f"--points: must be at least 1, got {points!r}", ExitCode.USAGE)
    every = list(range(durability_ops + 1))
    chosen = every
    if points is not None and points < len(every):
        rng = random.Random(f"quotafs-crash-points:{seed}")
        if points == 1:
            chosen = [rng.choice(every)]
        else:
            chosen = sorted([0, durability_ops, *rng.sample(every[1:-1], points - 2)])
    return _numbered([Point(0, cut_after=k, cut_at_end=k == durability_ops)
                      for k in chosen])


@dataclass(frozen=True)
class CrashPlan:
    """How a crash sweep cuts: the model and torn writes, as `quotafs crash` takes them."""

    model: str = "posix"
    torn: bool = False

    def __post_init__(self) -> None:
        if self.model not in CRASH_MODELS:
            raise QuotafsError(f"--model: must be {' or '.join(CRASH_MODELS)}, got "
                               f"{self.model!r}", ExitCode.USAGE)
        if not isinstance(self.torn, bool):
            raise QuotafsError(f"--torn: must be True or False, got {self.torn!r}",
                               ExitCode.USAGE)


def check_crash_choice(every: int | None, each_write: bool, max_runs: int | None) -> None:
    """--crash-points picks its points itself: the disk-full ways to pick are refused."""
    for name, value in (("--every", every), ("--each-write", each_write or None),
                        ("--max-runs", max_runs)):
        if value is not None:
            raise QuotafsError(f"{name}: not with --crash-points (its points are the "
                               "durability operations; --points N runs N of them)",
                               ExitCode.USAGE)


def choose_points(growth: int, allocating_writes: int, block_size: int, *,
                  points: int | None = DEFAULT_POINTS, every: int | None = None,
                  each_write: bool = False, max_runs: int | None = None) -> list[Point]:
    """The points to run after a baseline that grew usage by `growth` bytes above the
    start in `allocating_writes` allocating writes.

    Rooms are rounded down to whole blocks (the quota charges blocks, so a limit between
    two blocks acts as the lower one), and a room that two fractions round to is run once.
    """
    check_choice(points, every, each_write, max_runs)
    chosen: list[Point] = []
    if each_write:
        chosen = [Point(0, nth_write=k) for k in range(1, allocating_writes + 1)]
    else:
        candidates: list[tuple[int, float | None]]
        if every is not None:
            candidates = [(k * every, None) for k in range(ceil_div(growth, every))]
        else:
            candidates = [(int(f * growth), f) for f in fractions(points or DEFAULT_POINTS)]
        seen: set[int] = set()
        for room, frac in candidates:
            room -= room % block_size
            if room < growth and room not in seen:
                seen.add(room)
                chosen.append(Point(0, room=room, fraction=frac))
    return _numbered(_spread(chosen, max_runs))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_choice(points: int | None, every: int | None, each_write: bool,
                 max_runs: int | None) -> None:
    """The point options, checked before anything runs: one line, exit 2."""
    given = [name for name, value in (("--points", points), ("--every", every),
                                      ("--each-write", each_write or None))
             if value is not None]
    if len(given) > 1:
        raise QuotafsError(f"{' and '.join(given)}: choose one way to pick the points",
                           ExitCode.USAGE)
    for name, value in (("--points", points), ("--every", every), ("--max-runs", max_runs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise QuotafsError(f"{name}: must be at least 1, got {value!r}", ExitCode.USAGE)


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """The run without a limit: what CMD allocates. peak_bytes is the peak usage above
    the starting content (start_bytes), the most CMD needed at once."""

    start_bytes: int
    peak_bytes: int
    allocating_writes: int
    block_size: int
    exit_code: int | None
    signal: str | None
    timed_out: bool
    check_exit_code: int | None
    wall_s: float
    stderr_tail: str = ""
    check_stderr_tail: str = ""
    durability_ops: int = 0  # fsync, fdatasync, fsyncdir, renames (--crash-points)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PointResult:
    """One point's run: where the disk was full, how CMD and the check ended, the verdict."""

    index: int
    limit: int | None  # the quota during CMD (bytes), or None (an --each-write point)
    nth_write: int | None
    room: int | None  # limit - start_bytes
    exit_code: int | None
    signal: str | None
    timed_out: bool
    check_exit_code: int | None
    check_signal: str | None
    check_timed_out: bool
    verdict: str
    wall_s: float
    used_bytes: int  # usage when CMD ended
    enospc_count: int  # ENOSPCs the quota answered during CMD
    faults_fired: int  # ENOSPCs the --each-write rule answered during CMD
    stderr_tail: str = ""
    check_stderr_tail: str = ""
    daemon_log: str = ""  # what the daemon logged (warnings, errors): empty when healthy
    # --crash-points: the cut after this many durability ops (None: a disk-full point),
    # at the end of CMD or not; whether it killed CMD; what it lost (CrashReport's).
    cut_after: int | None = None
    cut_at_end: bool = False
    cut_killed: bool = False  # the cut came while CMD ran: CMD ended with it
    lost: tuple[LostItem, ...] = ()
    lost_bytes: int = 0
    lost_names: int = 0

    @property
    def failed(self) -> bool:
        return self.verdict != OK

    @property
    def run(self) -> Ended:
        return Ended(self.exit_code, self.signal, self.timed_out)

    @property
    def check(self) -> Ended | None:
        if self.check_exit_code is None and self.check_signal is None \
                and not self.check_timed_out:
            return None
        return Ended(self.check_exit_code, self.check_signal, self.check_timed_out)

    def where(self) -> str:
        """Where the disk was full, in a few words: "room 12.0 KiB" or "write 3"; where
        the power was cut: "cut at durability op 3"."""
        if self.cut_after is not None:
            return cut_where(self.cut_after, self.cut_at_end)
        if self.nth_write is not None:
            return f"allocating write {self.nth_write}"
        return f"limit {format_size(self.limit or 0)} (start + {format_size(self.room or 0)})"

    def cmd_ended(self) -> str:
        """The CMD cell of the report: "cut" when the sweep killed it at the cut, else how
        it ended ("SIGBUS (cut)": the dead device ended it first)."""
        if self.cut_killed and self.signal == "SIGKILL":
            return "cut"
        return self.run.describe() + (" (cut)" if self.cut_killed else "")

    def lost_summary(self) -> str:
        """What the cut lost, in a few words ("" for a disk-full point)."""
        if self.cut_after is None:
            return ""
        if not self.lost:
            return "nothing lost"
        kinds = sorted({item.kind for item in self.lost})
        return (f"lost {format_size(self.lost_bytes)}, {self.lost_names} names "
                f"({', '.join(kinds)})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepReport:
    """A whole sweep: the baseline, every point's result in point order, the seed."""

    argv: tuple[str, ...]
    baseline: Baseline
    points: tuple[PointResult, ...]
    seed: int
    wall_s: float = 0.0
    crash: CrashPlan | None = None  # a --crash-points sweep: how it cut

    @property
    def failures(self) -> list[PointResult]:
        return [p for p in self.points if p.failed]

    @property
    def exit_code(self) -> int:
        """0 when every point is ok, 1 otherwise (docs/exit-codes.md)."""
        return int(ExitCode.FAILURE) if self.failures else int(ExitCode.OK)

    def count(self, verdict_name: str) -> int:
        return sum(p.verdict == verdict_name for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "seed": self.seed, "wall_s": self.wall_s,
                "crash_points": self.crash is not None,
                "model": self.crash.model if self.crash else None,
                "torn": self.crash.torn if self.crash else False,
                "baseline": self.baseline.to_dict(),
                "points": [p.to_dict() for p in self.points],
                "summary": {v: self.count(v) for v in VERDICTS}}
