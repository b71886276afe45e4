"""Does an SQLite database in WAL mode survive a full disk at every point?

    pytest examples/sqlite_wal         (quotafs installed: its pytest plugin is loaded)

orders.py adds 30 transactions of 10 orders (1000 bytes each) to a WAL-mode database,
fsynced commits (`synchronous=FULL`). Each point of the sweep fills the disk at a
different moment of that; then, with room again, `orders.py check` opens the database as
the program's next start would (SQLite recovers from the WAL) and asks for
`pragma integrity_check` and for whole transactions only.

The plugin's marker makes one test item per point; `pytest -n 2` spreads them over two
cores (pytest-xdist), each worker running the baseline once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quotafs.testing import SweepPoint

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
ORDERS = HERE / "orders.py"
SETUP = f"{PYTHON} {ORDERS} setup"
CHECK = f"{PYTHON} {ORDERS} check"


@pytest.mark.quotafs_sweep(cmd=[PYTHON, str(ORDERS), "write"], setup=SETUP, check=CHECK,
                           points=10)
def test_no_disk_full_point_corrupts_the_database(sweep_point: SweepPoint) -> None:
    sweep_point.assert_ok()


def test_the_full_disk_loses_no_committed_transaction() -> None:
    done = subprocess.run(
        [PYTHON, "-m", "quotafs", "sweep", "--json", "--points", "8", "--setup", SETUP,
         "--check", CHECK, "--", PYTHON, str(ORDERS), "write"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    points = json.loads(done.stdout)["points"]
    assert [p["verdict"] for p in points] == ["ok"] * 8
    full = [p for p in points if p["exit_code"] == 1]
    assert full, "the disk never filled"
    for p in full:
        # orders.py said how many transactions it had committed when the disk filled;
        # all of them (and never a partial one) are there when it starts again.
        said = re.search(r"after (\d+) transactions", p["stderr_tail"])
        found = re.search(r"check: ok, (\d+) transactions", p["check_stderr_tail"])
        assert said and found, p
        assert int(found.group(1)) == int(said.group(1)), p
