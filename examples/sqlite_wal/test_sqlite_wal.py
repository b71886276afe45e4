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

import re
import sys
from pathlib import Path

import pytest
from orders import BATCHES

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
