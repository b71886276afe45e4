"""`quotafs sweep --crash-points -- CMD` on real mounts: a saver that reports records as
saved before they are durable is caught at exactly the cut points where it loses them,
the careful one at none, under both models; the cut kills CMD at once; --points picks a
seeded few; --jobs; bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_sweep import sweep_cli
from tests.conftest import fuse_unusable_reason

pytestmark = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")

RECORDS = 4
RECORD = 100  # bytes

# Both create `log` and fsync the directory (durability op 1), then write RECORDS records
# of RECORD bytes, each reported as saved in $QUOTAFS_SWEEP_NOTES/saved. The careful one
# fsyncs each record before reporting it (ops 2..5); the careless one reports each at
# once and fsyncs after every second record (ops 2 and 3): its reports run ahead of the
# disk. "stubborn" is careless and, after an error of the dead device, sleeps: the cut
# must kill it.
SAVER = f"""
import os, sys, time
mode = sys.argv[1]
notes = os.path.join(os.environ["QUOTAFS_SWEEP_NOTES"], "saved")
failed = False
def failure(exc):
    global failed
    if mode != "stubborn":
        sys.exit(f"saver: {{exc}}")
    failed = True
fd = os.open("log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
d = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
try:
    os.fsync(d)
except OSError as exc:
    failure(exc)
def report(i):
    with open(notes, "a") as f:
        f.write(f"{{i}}\\n")
for i in range({RECORDS}):
    try:
        os.write(fd, bytes([65 + i]) * {RECORD})
        if mode == "careful":
            os.fsync(fd)
        report(i)
        if mode != "careful" and i % 2 == 1:
            os.fsync(fd)
    except OSError as exc:
        failure(exc)
if failed:
    time.sleep(60)
"""
# The check: every record reported as saved is in `log`, whole and in order.
CHECK = f"""
import os, sys
notes = os.path.join(os.environ["QUOTAFS_SWEEP_NOTES"], "saved")
saved = len(open(notes).read().split()) if os.path.exists(notes) else 0
data = open("log", "rb").read() if os.path.exists("log") else b""
want = b"".join(bytes([65 + i]) * {RECORD} for i in range(saved))
if not data.startswith(want):
    sys.exit(f"check: {{saved}} records reported saved, log has {{len(data)}} bytes")
"""


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "saver.py").write_text(SAVER)
    (tmp_path / "check.py").write_text(CHECK)
    workdir = tmp_path / "work"
    workdir.mkdir()
    return {"saver": str(tmp_path / "saver.py"),
            "check": f"{sys.executable} {tmp_path / 'check.py'}", "workdir": str(workdir)}


def crash_sweep(scripts: dict[str, str], mode: str, *options: str) -> dict[str, Any]:
    result = sweep_cli("--crash-points", "--json", "-q", "--workdir", scripts["workdir"],
                       "--check", scripts["check"], *options, "--", sys.executable,
                       scripts["saver"], mode)
    assert result.returncode in (0, 1), result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (1 if any(p["verdict"] != "ok" for p in report["points"])
                                 else 0)
    assert os.listdir(scripts["workdir"]) == []  # every copy and mount point removed
    assert result.stderr == ""  # -q: no progress; and no daemon complained
    assert all(p["daemon_log"] == "" for p in report["points"])
    return report


@pytest.mark.parametrize("model", ["posix", "ext4"])
def test_a_saver_that_reports_before_fsync_loses_data_at_exactly_those_cuts(
        scripts: dict[str, str], model: str) -> None:
    report = crash_sweep(scripts, "careless", "--model", model, "--seed", "5")
    assert (report["crash_points"], report["model"], report["torn"]) == (True, model, False)
    assert report["baseline"]["durability_ops"] == 3  # the directory, two fsyncs
    points = report["points"]
    assert [(p["cut_after"], p["cut_at_end"]) for p in points] == [
        (0, False), (1, False), (2, False), (3, True)]
    # At the fsync of records 0-1 (op 2) and of 2-3 (op 3), two reported records are lost.
    assert [p["verdict"] for p in points] == ["ok", "data lost at the cut",
                                              "data lost at the cut", "ok"]
    for point in points[1:3]:
        assert point["cut_killed"]  # the cut's EIO stopped it, or the sweep killed it first
        assert point["exit_code"] == 1 or point["signal"] == "SIGKILL"
        assert "check: 2 records reported saved" in point["check_stderr_tail"] or \
            "check: 4 records reported saved" in point["check_stderr_tail"]
        assert {"path": "/log", "kind": "data", "bytes": 2 * RECORD} in point["lost"]
        assert point["lost_bytes"] == 2 * RECORD
    # The cut at the first op (the directory's fsync) loses log's unsynced name.
    assert {"path": "/log", "kind": "created", "bytes": 0} in [
        {**item, "bytes": 0} for item in points[0]["lost"]]
    assert points[3]["exit_code"] == 0 and not points[3]["cut_killed"]


def test_a_careful_saver_passes_every_cut(scripts: dict[str, str]) -> None:
    report = crash_sweep(scripts, "careful", "--jobs", "2", "--torn")
    assert report["baseline"]["durability_ops"] == 1 + RECORDS
    assert [p["cut_after"] for p in report["points"]] == list(range(RECORDS + 2))
    assert [p["verdict"] for p in report["points"]] == ["ok"] * (RECORDS + 2)
    assert [p["cut_killed"] for p in report["points"]] == [True] * (RECORDS + 1) + [False]
    assert report["points"][-1]["exit_code"] == 0


def test_the_cut_kills_a_program_that_ignores_the_dead_device(
        scripts: dict[str, str]) -> None:
    report = crash_sweep(scripts, "stubborn", "--points", "2", "--timeout", "30")
    cut, end = report["points"]
    assert (cut["cut_after"], end["cut_at_end"]) == (0, True)
    # Killed at the cut (SIGKILL, with its group), not after its 60 s sleep or the timeout.
    assert (cut["signal"], cut["timed_out"], cut["cut_killed"]) == ("SIGKILL", False, True)
    assert cut["wall_s"] < 10
    assert cut["verdict"] == "ok"


# A program that goes on after the dead device's first EIO: what it writes and makes
# durable after the cut must not be in the post-crash state (the reviewer's case).
AFTER_THE_CUT = """
import os
fd = os.open("data", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"d" * 100)
try:
    os.fsync(fd)
except OSError:
    try:
        late = os.open("written-after-the-cut", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(late, b"x" * 100)
        os.fsync(late)
        d = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(d)
    except OSError:
        pass
"""


def test_nothing_the_program_does_after_the_cut_survives_it(
        scripts: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "after.py").write_text(AFTER_THE_CUT)
    for _ in range(3):  # a race lost once in a while would show here
        report = crash_sweep({**scripts, "saver": str(tmp_path / "after.py"),
                              "check": "test ! -e written-after-the-cut"}, "-")
        assert [(p["cut_after"], p["cut_at_end"]) for p in report["points"]] == [
            (0, False), (1, True)]
        assert [p["verdict"] for p in report["points"]] == ["ok", "ok"]
        assert report["points"][0]["cut_killed"]


def test_points_n_runs_a_seeded_choice_first_and_last_kept(scripts: dict[str, str]) -> None:
    first = crash_sweep(scripts, "careful", "--points", "3", "--seed", "11")
    again = crash_sweep(scripts, "careful", "--points", "3", "--seed", "11")
    chosen = [p["cut_after"] for p in first["points"]]
    assert chosen == [p["cut_after"] for p in again["points"]]
    assert len(chosen) == 3 and chosen[0] == 0 and chosen[-1] == RECORDS + 1


def test_the_table_says_where_each_cut_was_and_what_it_lost(scripts: dict[str, str]) -> None:
    result = sweep_cli("--crash-points", "--workdir", scripts["workdir"], "--check",
                       scripts["check"], "--seed", "3", "--", sys.executable,
                       scripts["saver"], "careless")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("baseline (no limit): exit 0, check exit 0; ")
    assert "3 durability ops" in lines[0]
    assert lines[1] == "seed 3, model posix"
    rows = [line for line in lines if line.startswith("    ")]
    assert rows[1].startswith("    2  cut at durability op 2 ")
    assert "DATA LOST AT THE CUT" in rows[1] and "lost 200 B, 0 names (data" in rows[1]
    assert rows[3].startswith("    4  cut at the end (after op 3) ")
    assert "DATA LOST AT THE CUT at 2 point(s) (points 2, 3)" in result.stdout
    assert result.stderr.splitlines()[-1].startswith("sweep: 4/4 points, 2 failed")


@pytest.mark.parametrize(("args", "message"), [
    (["--crash-points", "--each-write"], "--each-write: not with --crash-points"),
    (["--crash-points", "--max-runs", "2"], "--max-runs: not with --crash-points"),
    (["--torn"], "--torn: only with --crash-points"),
    (["--model", "ext4"], "--model: only with --crash-points"),
])
def test_bad_crash_sweep_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = sweep_cli(*args, "--", "true")
    assert result.returncode == 2
    assert result.stderr.startswith(f"quotafs: {message}")
    assert len(result.stderr.splitlines()) == 1
