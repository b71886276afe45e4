"""Does replacing a file by a new version survive a full disk at every point?

    pytest examples/atomic_update      (quotafs installed: its pytest plugin is loaded)

versions.py sets up data.txt (version 1, 32 KiB) and checks it afterwards (a complete
version 1 or 2, nothing else). careless_update.py ignores write errors; careful_update.py
checks them, fsyncs and renames only a complete file. `quotafs sweep` runs an updater with
the disk full at each point and the check after it, with room again:

- the careless one is caught at exactly the points where the disk fills while it writes
  the 64 KiB of version 2: it renames a short file over the good one and reports success
  (the worst verdict); where only its report no longer fits, no harm is done;
- the careful one passes everywhere: where it cannot update it says so and leaves
  version 1, and the check passes.

The careless sweep runs through `quotafs sweep --json`, as on the command line; the careful
one through the plugin's marker, one test item per point (`pytest -n 2` spreads them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from versions import CHUNK, REPORT_SIZE, SIZES

from quotafs.testing import SweepPoint

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
SETUP = f"{PYTHON} {HERE / 'versions.py'} setup"
CHECK = f"{PYTHON} {HERE / 'versions.py'} check"
NEW_BYTES = SIZES[2]


def sweep(updater: str, *flags: str) -> tuple[int, dict[str, Any]]:
    """`quotafs sweep --json` of an updater: its exit status and its report."""
    done = subprocess.run(
        [PYTHON, "-m", "quotafs", "sweep", "--json", "--setup", SETUP, "--check", CHECK,
         *flags, "--", PYTHON, str(HERE / updater)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    assert [p["daemon_log"] for p in report["points"]] == [""] * len(report["points"])
    return done.returncode, report


def test_sweep_catches_the_careless_updater_where_the_disk_fills_mid_write() -> None:
    status, report = sweep("careless_update.py", "--points", "10")
    verdicts = {p["room"]: p["verdict"] for p in report["points"]}
    assert len(verdicts) == 10
    # Room for less than the whole new version: a short data.txt, and exit 0.
    mid_write = {room: "check failed after success" for room in verdicts if room < NEW_BYTES}
    # Room for version 2, only its report cut short: harmless.
    after = {room: "ok" for room in verdicts if room >= NEW_BYTES}
    assert verdicts == mid_write | after
    assert mid_write and after
    assert status == 1


def test_each_write_catches_it_at_every_write_of_the_new_version() -> None:
    status, report = sweep("careless_update.py", "--each-write", "--jobs", "2")
    writes = report["baseline"]["allocating_writes"]
    data_writes = NEW_BYTES // CHUNK  # then the report's writes
    verdicts = {p["nth_write"]: p["verdict"] for p in report["points"]}
    assert sorted(verdicts) == list(range(1, writes + 1))
    assert writes > data_writes
    assert verdicts == {k: "check failed after success" if k <= data_writes else "ok"
                        for k in verdicts}
    assert status == 1


@pytest.mark.quotafs_sweep(cmd=[PYTHON, str(HERE / "careful_update.py")], setup=SETUP,
                           check=CHECK, points=10)
def test_the_careful_updater_survives_every_point(sweep_point: SweepPoint) -> None:
    sweep_point.assert_ok()  # data.txt is version 1 or 2, whole
    # Every point has less room than the update and its report need (the peak): the
    # careful updater says what it could not do, and exits 1.
    point = sweep_point.result
    assert point.room is not None and point.room < NEW_BYTES + REPORT_SIZE
    assert point.exit_code == 1
    said = "not updated" if point.room < NEW_BYTES else "updated to version 2, but no report"
    assert f"careful_update: {'data.txt ' if said == 'not updated' else ''}{said}" \
        in point.stderr_tail
