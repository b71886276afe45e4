"""Does an SQLite database in WAL mode survive a full disk at every point?

    pytest examples/sqlite_wal         (quotafs installed: its pytest plugin is loaded)

orders.py adds 30 transactions of 10 orders (1000 bytes each) to a WAL-mode database,
fsynced commits (`synchronous=FULL`). Each point of the sweep fills the disk at a
different moment of that; then, with room again, `orders.py check` opens the database as
the program's next start would (SQLite recovers from the WAL) and asks for
`pragma integrity_check` and for whole transactions only.

The plugin's marker makes one test item per point; `pytest -n 2` spreads them over two
cores (pytest-xdist), each worker running the baseline once. Beyond the check's verdict,
each item compares what orders.py said it had committed with what the check found.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from orders import BATCHES

import quotafs
from quotafs.errors import QuotafsError
from quotafs.testing import SweepPoint

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
ORDERS = HERE / "orders.py"
SETUP = f"{PYTHON} {ORDERS} setup"
CHECK = f"{PYTHON} {ORDERS} check"


@pytest.mark.quotafs_sweep(cmd=[PYTHON, str(ORDERS), "write"], setup=SETUP, check=CHECK,
                           points=10)
def test_no_disk_full_point_corrupts_the_database(sweep_point: SweepPoint) -> None:
    sweep_point.assert_ok()  # integrity_check ok, whole transactions only
    point = sweep_point.result
    # orders.py says how many transactions it had committed when the disk filled; all of
    # them, and no other, are there when it starts again.
    found = re.search(r"check: ok, (\d+) transactions", point.check_stderr_tail)
    assert found, point.check_stderr_tail
    if point.exit_code == 0:
        assert int(found.group(1)) == BATCHES
    else:
        said = re.search(r"orders: (database or disk is full|disk I/O error).* after (\d+) "
                         "transactions", point.stderr_tail)
        assert said, point.stderr_tail
        assert int(found.group(1)) == int(said.group(2))
    if sweep_point.index == 1:  # no room at all above the start: the disk fills at once
        assert (point.exit_code, int(found.group(1))) == (1, 0)
    assert point.daemon_log == ""


# -- power cuts -----------------------------------------------------------------------------
#
# A crash sweep cuts the power after each of the writer's durability operations (its fsyncs
# of the WAL and of the directory; 34 with this SQLite), one test item per cut; then
# `orders.py check` opens the database as the next start would. orders.py notes each
# COMMIT that returned in $QUOTAFS_SWEEP_NOTES, outside the mount, and the check fails if
# one of them is missing: under ext4's model every cut keeps every reported transaction.
# posix's model, which keeps only what was fsynced, holds too (SQLite fsyncs the directory
# after creating the WAL): a seeded few of its cuts run here; `quotafs sweep
# --crash-points --model posix` runs them all (docs/sweep.md#crash-points).


def assert_reported_transactions_survived(sweep_point: SweepPoint) -> None:
    sweep_point.assert_ok()  # integrity_check ok, whole transactions, none reported lost
    point = sweep_point.result
    found = re.search(r"check: ok, (\d+) transactions, (\d+) reported committed",
                      point.check_stderr_tail)
    assert found, point.check_stderr_tail
    present, reported = int(found.group(1)), int(found.group(2))
    assert present >= reported  # every transaction reported committed is there
    assert present <= reported + 1  # at most the one whose COMMIT the cut interrupted
    if point.cut_at_end:
        assert (point.exit_code, reported) == (0, BATCHES)
    else:
        assert point.cut_killed  # the cut came while it ran
    assert point.daemon_log == ""


@pytest.mark.quotafs_sweep(cmd=[PYTHON, str(ORDERS), "write"], setup=SETUP, check=CHECK,
                           crash_points=True, model="ext4", points=40)
def test_no_power_cut_loses_a_committed_transaction_ext4(sweep_point: SweepPoint) -> None:
    assert_reported_transactions_survived(sweep_point)


@pytest.mark.quotafs_sweep(cmd=[PYTHON, str(ORDERS), "write"], setup=SETUP, check=CHECK,
                           crash_points=True, model="posix", points=6, seed=2026)
def test_no_power_cut_loses_a_committed_transaction_posix(sweep_point: SweepPoint) -> None:
    assert_reported_transactions_survived(sweep_point)


@pytest.mark.parametrize("model", ["posix", "ext4"])
def test_synchronous_normal_loses_reported_transactions_at_the_checkpoint_cut(
        model: str, tmp_path: Path) -> None:
    # synchronous=NORMAL in WAL mode fsyncs at checkpoints only (SQLite's documentation:
    # "a transaction committed in WAL mode with synchronous=NORMAL might roll back
    # following a power loss"). The sweep finds the cut: the checkpoint's fsync of the
    # WAL at close, when all 30 transactions were reported and none is on disk.
    try:
        quotafs.check_fuse()
    except QuotafsError as exc:
        pytest.skip(f"FUSE is not usable here: {exc}")
    report = quotafs.sweep([PYTHON, str(ORDERS), "write", "NORMAL"], setup=SETUP,
                           check=CHECK, crash_points=True, model=model, seed=7,
                           workdir=str(tmp_path))
    # At that cut SQLite may still close and exit 0 before the sweep stops it (the
    # checkpoint's failed fsync is not reported by close): "check failed after success"
    # then, "data lost at the cut" if the stop came first. Both say the check failed.
    lost = [p for p in report.points
            if p.verdict in ("data lost at the cut", "check failed after success")]
    assert lost, [(p.cut_after, p.verdict) for p in report.points]
    for point in lost:
        assert not point.cut_at_end and point.cut_killed
        assert (f"check: the writer reported {BATCHES} transactions committed, the "
                "database holds 0") in point.check_stderr_tail
        assert any(item.path == "/orders.db-wal" and item.kind == "data"
                   for item in point.lost)
    assert report.points[-1].cut_at_end and report.points[-1].verdict == "ok"
    assert report.exit_code == 1
    assert os.listdir(tmp_path) == []
