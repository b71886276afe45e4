"""The benchmark runs and reports: `bench/run.py --smoke` on this machine.

A benchmark is a command, not a timed test: this checks that every target x workload
produced a record with numeric ratios, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import fuse_unusable_reason, run_capture

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: the native target is a loop-ext4 on a tmpfs"),
    pytest.mark.skipif(fuse_unusable_reason() is not None, reason=fuse_unusable_reason() or ""),
    pytest.mark.skipif(not (shutil.which("losetup") or os.path.exists("/sbin/losetup"))
                       or not (shutil.which("mkfs.ext4") or os.path.exists("/sbin/mkfs.ext4")),
                       reason="needs losetup and mkfs.ext4"),
]

ALWAYS = {"native", "quotafs", "quotafs-nolimit"}  # targets that may never be skipped
NO_DATA = {"pyfuse3-null", "pyfuse3-null-xattr"}  # reads return zeros: ...
READS_BACK = {"sqlite-wal", "sqlite-rollback", "tar", "git-clone"}  # ... these cannot run


def test_smoke_run_reports_every_target_and_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    csv_out = tmp_path / "bench.csv"
    # run_capture: an interrupted test run lets the bench tear its mounts down.
    proc = run_capture(
        [sys.executable, "bench/run.py", "--smoke", "--json", str(out), "--csv", str(csv_out)],
        cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x native" in proc.stdout  # the table was printed

    data = json.loads(out.read_text())
    workloads = {w["name"] for w in data["workloads"]}
    assert workloads == {"seqwrite", "randwrite", "seqread", "seqread-warm", "files", "walk",
                         "mmap", "sqlite-wal", "sqlite-rollback", "tar", "git-clone"}
    targets = {t["name"]: t for t in data["targets"]}
    assert set(targets) == {"native", "pyfuse3-passthrough", "pyfuse3-passthrough-xattr",
                            "pyfuse3-null", "pyfuse3-null-xattr", "pyfuse3-mem-xattr",
                            "quotafs-nolimit",
                            "quotafs", "quotafs-rule", "quotafs-nocache", "quotafs-noxattr",
                            "quotafs-crashsim"}
    for name, target in targets.items():
        if target["status"] != "ok":
            assert name not in ALWAYS, f"{name} skipped: {target['note']}"
            assert target["note"], f"{name} skipped without saying why"

    records = {(r["target"], r["workload"]): r for r in data["results"]}
    assert set(records) == {(t, w) for t in targets for w in workloads}
    for (target, workload), r in records.items():
        if targets[target]["status"] != "ok":
            assert r["status"] == "skipped"
            continue
        if target in NO_DATA and workload in READS_BACK:
            assert r["status"] == "skipped" and "reads return zeros" in r["note"]
            continue
        assert r["status"] == "ok", (target, workload, r["note"])
        for key in ("median", "min", "max", "ratio_to_native"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, \
                (target, workload, key, r[key])
        if target == "native":
            assert r["ratio_to_native"] == 1.0
        else:
            assert isinstance(r["daemon_cpu_us_per_op"], float)

    if targets["quotafs-rule"]["status"] == "ok":
        baselines = {(c["target"], c["workload"]) for c in data["comparisons"]}
        assert {("quotafs-rule", w) for w in workloads} <= baselines
    assert {("quotafs", w) for w in workloads} <= {
        (c["target"], c["workload"]) for c in data["comparisons"]}
    if targets["quotafs-crashsim"]["status"] == "ok":  # its cost against quotafs, no goal
        crashsim = [c for c in data["comparisons"] if c["target"] == "quotafs-crashsim"]
        assert {c["workload"] for c in crashsim} == workloads
        assert {(c["baseline"], c["goal"], c["meets"]) for c in crashsim} == {
            ("quotafs", None, None)}
    # The write goals, each against its anchor, round by round (bench/run.py WRITE_GOALS).
    goals = {(c["target"], c["baseline"], c["workload"]): c["goal"]
             for c in data["comparisons"]}
    for target, against, workload, goal in (
            ("quotafs-noxattr", "pyfuse3-passthrough", "randwrite", 1.0),
            ("quotafs", "pyfuse3-passthrough", "mmap", 1.0),
            ("quotafs", "pyfuse3-null-xattr", "randwrite", 0.9),
            ("quotafs", "pyfuse3-passthrough-xattr", "seqwrite", 1.0),
            ("pyfuse3-passthrough-xattr", "pyfuse3-null-xattr", "randwrite", None)):
        if targets[target]["status"] == targets[against]["status"] == "ok":
            assert goals[(target, against, workload)] == goal, (target, against, workload)
    assert ("quotafs", "pyfuse3-null-xattr", "seqwrite") not in goals
    for c in data["comparisons"]:
        assert math.isfinite(c["ratio"]) and c["ratio"] > 0

    scale_rows = data["scale"]["rows"]
    assert {r["files"] for r in scale_rows if r["target"] == "quotafs"} == {200, 2000}
    for r in scale_rows:
        assert r["mount_cold_s"] > 0 and r["rss_after_lookups_mib"] > 0
    assert data["scale"]["checks"]
    assert csv_out.read_text().startswith("target,workload,")


def test_baseline_target_runs_the_other_tree(tmp_path: Path) -> None:
    """--baseline DIR: the quotafs-baseline target is that tree's quotafs, compared with
    this tree's workload by workload."""
    base = tmp_path / "base"
    shutil.copytree(ROOT / "quotafs", base / "quotafs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = base / "quotafs" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+base-'))
    out = tmp_path / "bench.json"
    proc = run_capture(
        [sys.executable, "bench/run.py", "--smoke", "--skip-scale", "--targets", "quotafs",
         "--workloads", "randwrite,files", "--baseline", str(base), "--json", str(out)],
        cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    targets = {t["name"]: t for t in data["targets"]}
    assert targets["quotafs-baseline"]["status"] == "ok"
    assert "quotafs 9.9.9+base-" in targets["quotafs-baseline"]["note"]
    assert str(base) in targets["quotafs-baseline"]["note"]
    assert "9.9.9" not in targets["quotafs"]["note"]
    ratios = {(c["target"], c["baseline"], c["workload"]) for c in data["comparisons"]}
    assert ratios >= {("quotafs", "quotafs-baseline", "randwrite"),
                      ("quotafs", "quotafs-baseline", "files")}


def test_baseline_needs_a_quotafs_tree(tmp_path: Path) -> None:
    for argv, message in ((["--baseline", str(tmp_path)], "not a quotafs source tree"),
                          (["--targets", "quotafs-baseline"], "needs --baseline DIR")):
        proc = run_capture([sys.executable, "bench/run.py", "--smoke", *argv], cwd=ROOT)
        assert proc.returncode == 2
        assert message in proc.stderr and "Traceback" not in proc.stderr
