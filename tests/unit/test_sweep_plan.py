"""quotafs.sweeps.plan: which points a sweep runs, the verdict of a point, the report."""

from __future__ import annotations

import json
from typing import Any

import pytest

from quotafs.errors import ExitCode, QuotafsError
from quotafs.sweeps.plan import (
    CHECK_FAILED,
    CHECK_FAILED_AFTER_SUCCESS,
    CRASHED,
    DATA_LOST,
    HUNG,
    OK,
    Baseline,
    Ended,
    PointResult,
    SweepReport,
    check_crash_choice,
    choose_crash_points,
    choose_points,
    crash_verdict,
    fractions,
    verdict,
)

KIB = 1024
EXIT0, EXIT1 = Ended(0, None, False), Ended(1, None, False)
KILLED, TIMED_OUT = Ended(None, "SIGSEGV", False), Ended(None, None, True)


def test_fractions_start_at_a_full_disk_and_stop_short_of_the_peak() -> None:
    assert fractions(4) == [0, 0.25, 0.5, 0.75]
    assert fractions(1) == [0]


def test_points_are_whole_blocks_below_the_peak_each_once() -> None:
    # 64 KiB of growth, 20 points: steps of 3.2 KiB round to every block from 0 to 60 KiB.
    points = choose_points(64 * KIB, 16, 4096)
    assert [p.room for p in points] == [k * 4096 for k in range(16)]
    assert [p.index for p in points] == list(range(1, 17))
    assert all(p.nth_write is None for p in points)
    # Four points of 10 blocks: 0, 2.5, 5, 7.5 blocks -> 0, 2, 5, 7 blocks.
    assert [p.room for p in choose_points(40 * KIB, 10, 4096, points=4)] == \
        [0, 8 * KIB, 20 * KIB, 28 * KIB]
    assert [p.fraction for p in choose_points(40 * KIB, 10, 4096, points=4)] == \
        [0, 0.25, 0.5, 0.75]


def test_every_size_up_to_the_peak() -> None:
    assert [p.room for p in choose_points(20 * KIB, 5, 4096, points=None, every=8 * KIB)] == \
        [0, 8 * KIB, 16 * KIB]
    # a step below a block rounds to blocks, each once
    assert [p.room for p in choose_points(8 * KIB, 2, 4096, points=None, every=1000)] == \
        [0, 4096]


def test_each_write_is_one_point_per_allocating_write() -> None:
    points = choose_points(64 * KIB, 5, 4096, points=None, each_write=True)
    assert [(p.index, p.nth_write, p.room) for p in points] == \
        [(k, k, None) for k in range(1, 6)]


def test_max_runs_spreads_evenly_keeping_the_first_and_last() -> None:
    points = choose_points(0, 100, 4096, points=None, each_write=True, max_runs=5)
    assert [p.nth_write for p in points] == [1, 26, 51, 75, 100]
    assert [p.index for p in points] == [1, 2, 3, 4, 5]
    assert [p.nth_write for p in choose_points(0, 9, 4096, points=None, each_write=True,
                                               max_runs=1)] == [1]
    assert len(choose_points(0, 3, 4096, points=None, each_write=True, max_runs=10)) == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"points": 0}, "--points: must be at least 1, got 0"),
    ({"points": None, "every": 0}, "--every: must be at least 1, got 0"),
    ({"max_runs": 0}, "--max-runs: must be at least 1, got 0"),
    ({"points": 5, "every": 4096}, "--points and --every: choose one way to pick the points"),
    ({"points": None, "every": 4096, "each_write": True},
     "--every and --each-write: choose one way to pick the points"),
])
def test_bad_choices_are_one_line_usage_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(QuotafsError) as info:
        choose_points(64 * KIB, 16, 4096, **kwargs)  # type: ignore[arg-type]
    assert (str(info.value), info.value.code) == (message, ExitCode.USAGE)


@pytest.mark.parametrize(("run", "check", "expected"), [
    (EXIT0, EXIT0, OK),
    (EXIT1, EXIT0, OK),  # it reported the failure and its data is sound
    (EXIT0, None, OK),
    (EXIT1, None, OK),
    (KILLED, EXIT0, CRASHED),
    (KILLED, None, CRASHED),
    (TIMED_OUT, EXIT0, HUNG),
    (EXIT1, EXIT1, CHECK_FAILED),
    (KILLED, EXIT1, CHECK_FAILED),
    (TIMED_OUT, KILLED, CHECK_FAILED),
    (EXIT0, EXIT1, CHECK_FAILED_AFTER_SUCCESS),
    (EXIT0, TIMED_OUT, CHECK_FAILED_AFTER_SUCCESS),
])
def test_verdicts(run: Ended, check: Ended | None, expected: str) -> None:
    assert verdict(run, check) == expected


def _result(index: int, verdict_name: str) -> PointResult:
    return PointResult(index=index, limit=8192 + index * 4096, nth_write=None,
                       room=index * 4096, exit_code=0, signal=None, timed_out=False,
                       check_exit_code=0 if verdict_name == OK else 1, check_signal=None,
                       check_timed_out=False, verdict=verdict_name, wall_s=0.1,
                       used_bytes=8192, enospc_count=1, faults_fired=0)


def test_report_json_keys_and_exit_code() -> None:
    base = Baseline(start_bytes=8192, peak_bytes=65536, allocating_writes=16, block_size=4096,
                    exit_code=0, signal=None, timed_out=False, check_exit_code=0, wall_s=0.2)
    good = SweepReport(("./upd",), base, (_result(1, OK),), seed=7)
    assert good.exit_code == 0 and good.failures == []
    bad = SweepReport(("./upd",), base, (_result(1, OK), _result(2, CHECK_FAILED_AFTER_SUCCESS)),
                      seed=7)
    assert bad.exit_code == 1 and [p.index for p in bad.failures] == [2]
    doc = json.loads(json.dumps(bad.to_dict()))
    assert {"peak_bytes", "allocating_writes", "start_bytes"} <= set(doc["baseline"])
    assert doc["baseline"]["peak_bytes"] == 65536
    for point in doc["points"]:
        assert {"limit", "nth_write", "exit_code", "signal", "timed_out", "check_exit_code",
                "verdict"} <= set(point)
    assert doc["summary"][CHECK_FAILED_AFTER_SUCCESS] == 1 and doc["summary"][OK] == 1


def test_points_and_ends_describe_themselves() -> None:
    room = choose_points(8192, 2, 4096, points=2)[1]
    nth = choose_points(8192, 2, 4096, points=None, each_write=True)[1]
    assert room.describe() == "limit start + 4096 bytes"
    assert nth.describe() == "ENOSPC from allocating write 2 on"
    assert [e.describe() for e in (EXIT0, EXIT1, KILLED, TIMED_OUT)] == [
        "exit 0", "exit 1", "SIGSEGV", "hung"]


# -- crash points -------------------------------------------------------------------------


def test_crash_points_are_every_cut_from_none_to_the_end() -> None:
    points = choose_crash_points(4, None, seed=1)
    assert [(p.index, p.cut_after, p.cut_at_end) for p in points] == \
        [(1, 0, False), (2, 1, False), (3, 2, False), (4, 3, False), (5, 4, True)]
    assert all(p.room is None and p.nth_write is None for p in points)
    assert [p.describe() for p in points[:2]] == ["cut at durability op 1",
                                                  "cut at durability op 2"]
    assert points[-1].describe() == "cut at the end (after op 4)"
    # A program that never syncs has one point: the cut when it has ended.
    (only,) = choose_crash_points(0, None, seed=1)
    assert (only.cut_after, only.cut_at_end, only.describe()) == (0, True, "cut at the end")
    # --points N at least N+1 runs them all.
    assert choose_crash_points(4, 5, seed=1) == points == choose_crash_points(4, 50, seed=1)


def test_some_crash_points_keep_the_first_and_last_and_a_seeded_choice() -> None:
    chosen = [p.cut_after for p in choose_crash_points(100, 6, seed=7)]
    assert len(chosen) == 6 and len(set(chosen)) == 6 and chosen == sorted(chosen)
    assert chosen[0] == 0 and chosen[-1] == 100
    assert chosen == [p.cut_after for p in choose_crash_points(100, 6, seed=7)]
    others = {tuple(p.cut_after for p in choose_crash_points(100, 6, seed=s))
              for s in range(10)}
    assert len(others) > 5  # the seed chooses
    (one,) = choose_crash_points(100, 1, seed=7)
    assert one.index == 1 and 0 <= (one.cut_after or 0) <= 100
    with pytest.raises(QuotafsError, match="--points: must be at least 1, got 0"):
        choose_crash_points(3, 0, seed=1)


@pytest.mark.parametrize(("flags", "message"), [
    ({"every": 4096}, "--every: not with --crash-points"),
    ({"each_write": True}, "--each-write: not with --crash-points"),
    ({"max_runs": 3}, "--max-runs: not with --crash-points"),
])
def test_crash_points_refuse_the_disk_full_ways_to_pick(flags: dict[str, Any],
                                                        message: str) -> None:
    args: dict[str, Any] = {"every": None, "each_write": False, "max_runs": None, **flags}
    with pytest.raises(QuotafsError, match=message) as info:
        check_crash_choice(**args)
    assert info.value.code == ExitCode.USAGE


CUT = Ended(None, "SIGKILL", False)  # killed by the sweep at the cut


@pytest.mark.parametrize(("run", "check", "cut_killed", "expected"), [
    (CUT, EXIT0, True, OK),  # cut mid-run, the data it reported as saved is there
    (CUT, EXIT1, True, DATA_LOST),
    (EXIT1, EXIT0, False, OK),  # the cut's EIO made it stop by itself, data sound
    (EXIT1, EXIT1, False, DATA_LOST),
    (EXIT0, EXIT1, False, CHECK_FAILED_AFTER_SUCCESS),  # the cut at its end
    (EXIT0, EXIT0, False, OK),
    (KILLED, EXIT0, False, CRASHED),  # a signal of its own, before the cut
    (TIMED_OUT, EXIT0, False, HUNG),
    (CUT, None, True, OK),
    (KILLED, EXIT0, True, OK),  # the dead device ended it first (SQLite's -shm: SIGBUS)
    (EXIT0, EXIT1, True, CHECK_FAILED_AFTER_SUCCESS),  # it exited 0 despite the cut's EIO
])
def test_crash_verdicts(run: Ended, check: Ended | None, cut_killed: bool,
                        expected: str) -> None:
    assert crash_verdict(run, check, cut_killed) == expected
