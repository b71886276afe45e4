"""`quotafs sweep -- CMD` on real mounts: a careless updater is caught at exactly the points
where it breaks, the careful one at none; --each-write, --jobs, the API's one point; Ctrl-C
and SIGTERM leave nothing behind (with --crash-points too); bad input is one line and its
exit code."""

from __future__ import annotations

import json
import os
import pty
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import quotafs
from quotafs.cli.main import main
from quotafs.errors import QuotafsError
from tests.conftest import fuse_unusable_reason, interrupt_when

pytestmark = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")

BLOCK = 4096
JOURNAL = 2  # blocks the updaters first append to a journal, checking errors
NEW = 4  # blocks of the new version
OLD = b"O" * (2 * BLOCK)

# Both first append JOURNAL blocks to `journal`, stopping with exit 1 at an error (nothing
# else touched yet). Then the careless one writes the new version to data.tmp ignoring
# write errors and renames it over `data`; the careful one stops at an error, removes the
# temp file and exits 1, else fsyncs and renames.
UPDATER = f"""
import os, sys
careful = sys.argv[1] == "careful"
fd = os.open("journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
try:
    for _ in range({JOURNAL}):
        os.write(fd, b"j" * {BLOCK})
except OSError as exc:
    sys.exit(f"journal: {{exc}}")
finally:
    os.close(fd)
fd = os.open("data.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    for _ in range({NEW}):
        try:
            os.write(fd, b"N" * {BLOCK})
        except OSError:
            if careful:
                raise
    if careful:
        os.fsync(fd)
except OSError as exc:
    os.close(fd)
    os.unlink("data.tmp")
    sys.exit(f"update: {{exc}}")
os.close(fd)
os.rename("data.tmp", "data")
"""
# The check: `data` is a whole version, the old or the new.
CHECK = f"""
import sys
data = open("data", "rb").read()
sys.exit(0 if data in ({OLD!r}, b"N" * {NEW * BLOCK}) else f"torn: {{len(data)}} bytes")
"""


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "updater.py").write_text(UPDATER)
    (tmp_path / "check.py").write_text(CHECK)
    start = tmp_path / "start"
    start.mkdir()
    (start / "data").write_bytes(OLD)
    workdir = tmp_path / "work"
    workdir.mkdir()
    return {"updater": str(tmp_path / "updater.py"), "check": f"{sys.executable} "
            f"{tmp_path / 'check.py'}", "start": str(start), "workdir": str(workdir),
            "setup": f"cp {start / 'data'} data"}


def sweep_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotafs", "sweep", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def sweep_json(scripts: dict[str, str], kind: str, *options: str) -> dict[str, Any]:
    result = sweep_cli("--json", "-q", "--workdir", scripts["workdir"], "--check",
                       scripts["check"], *options, "--", sys.executable, scripts["updater"], kind)
    assert result.returncode in (0, 1), result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (1 if any(p["verdict"] != "ok" for p in report["points"])
                                 else 0)
    assert os.listdir(scripts["workdir"]) == []  # every copy and mount point removed
    assert result.stderr == ""  # -q: no progress; and no daemon complained
    return report


# The sizes make the expected points: the journal fills the first JOURNAL blocks of room,
# the new version the next NEW. Below JOURNAL blocks of room the updaters stop at the
# journal (exit 1, data untouched: ok); from there up to the peak the careless one renames
# a torn file over the old one and exits 0.
def breaks_at_room(room: int) -> bool:
    return JOURNAL * BLOCK <= room < (JOURNAL + NEW) * BLOCK


def test_careless_updater_is_caught_at_exactly_the_points_where_it_breaks(
        scripts: dict[str, str]) -> None:
    report = sweep_json(scripts, "careless", "--setup", scripts["setup"])
    base = report["baseline"]
    assert (base["start_bytes"], base["peak_bytes"], base["allocating_writes"]) == (
        len(OLD), (JOURNAL + NEW) * BLOCK, JOURNAL + NEW)
    # 20 fractions of 6 blocks, rounded down to blocks: every block count from 0 to 5 once
    assert [p["room"] for p in report["points"]] == [k * BLOCK for k in range(JOURNAL + NEW)]
    for point in report["points"]:
        assert point["limit"] == len(OLD) + point["room"]
        expected = "check failed after success" if breaks_at_room(point["room"]) else "ok"
        assert (point["room"], point["verdict"]) == (point["room"], expected)
        assert point["exit_code"] == (0 if breaks_at_room(point["room"]) else 1)
        assert point["enospc_count"] >= 1  # the quota refused a write at every point


def test_careful_updater_passes_every_point(scripts: dict[str, str]) -> None:
    # --from: the starting state copied from a directory (with --setup it runs after)
    report = sweep_json(scripts, "careful", "--from", scripts["start"])
    assert len(report["points"]) == JOURNAL + NEW
    assert [p["verdict"] for p in report["points"]] == ["ok"] * (JOURNAL + NEW)
    assert [p["exit_code"] for p in report["points"]] == [1] * (JOURNAL + NEW)
    assert [p["check_exit_code"] for p in report["points"]] == [0] * (JOURNAL + NEW)


def test_each_write_finds_the_same_points_with_two_jobs(scripts: dict[str, str]) -> None:
    report = sweep_json(scripts, "careless", "--setup", scripts["setup"], "--each-write",
                        "--jobs", "2")
    # ENOSPC from allocating write k on: k <= JOURNAL stops in the journal; after that the
    # update is torn (k = JOURNAL + 1 leaves an empty file)
    assert [(p["nth_write"], p["limit"], p["verdict"]) for p in report["points"]] == [
        (k, None, "check failed after success" if k > JOURNAL else "ok")
        for k in range(1, JOURNAL + NEW + 1)]
    assert [p["faults_fired"] for p in report["points"]] == [
        1 if k <= JOURNAL else JOURNAL + NEW - k + 1 for k in range(1, JOURNAL + NEW + 1)]
    serial = sweep_json(scripts, "careless", "--setup", scripts["setup"], "--each-write",
                        "--max-runs", "3")
    assert [(p["nth_write"], p["verdict"]) for p in serial["points"]] == [
        (1, "ok"), (3, "check failed after success"), (6, "check failed after success")]


def test_jobs_give_the_same_verdicts_and_the_table(scripts: dict[str, str]) -> None:
    result = sweep_cli("--jobs", "2", "--every", "8K", "--workdir", scripts["workdir"],
                       "--setup", scripts["setup"], "--check", scripts["check"], "--",
                       sys.executable, scripts["updater"], "careless")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("baseline (no limit): exit 0, check exit 0; start 8.0 KiB, "
                               "peak +24.0 KiB, 6 allocating writes")
    rows = [line for line in lines if line.startswith("    ")]  # the index, right-aligned
    # rooms 0, 8K, 16K: the journal stops the first, the other two are torn, said loudly
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    assert rows[0].endswith(" exit 1     exit 0     ok")
    for row in rows[1:]:
        assert row.endswith(" exit 0     exit 1     CHECK FAILED AFTER SUCCESS  <-- CMD said "
                            "it succeeded")
    assert "3 points in" in result.stdout and "1 ok, 2 check failed after success" in \
        result.stdout
    assert "DATA LOST AFTER REPORTED SUCCESS at 2 point(s) (points 2, 3)" in result.stdout
    # not a tty: plain progress lines on stderr, the last one at 3/3
    progress = result.stderr.splitlines()
    assert progress[-1].startswith("sweep: 3/3 points, 2 failed")
    assert os.listdir(scripts["workdir"]) == []


def test_api_plans_once_and_runs_one_point_alone(scripts: dict[str, str]) -> None:
    with quotafs.plan_sweep([sys.executable, scripts["updater"], "careless"],
                            setup=scripts["setup"], check=scripts["check"], points=3,
                            workdir=scripts["workdir"]) as plan:
        assert plan.baseline is not None and plan.baseline.peak_bytes == 6 * BLOCK
        assert [p.room for p in plan.points] == [0, 2 * BLOCK, 4 * BLOCK]
        last = quotafs.run_point(plan, 3)
        assert (last.verdict, last.limit, last.exit_code, last.check_exit_code) == (
            "check failed after success", len(OLD) + 4 * BLOCK, 0, 1)
        assert "torn" in last.check_stderr_tail
        assert last.daemon_log == ""  # the daemon warned of nothing
        first = plan.run_point(1)
        assert (first.verdict, first.exit_code) == ("ok", 1)
        assert "journal" in first.stderr_tail and "No space left" in first.stderr_tail
        with pytest.raises(QuotafsError, match="no point 4: the sweep has "
                                         "points 1 to 3"):
            plan.run_point(4)
    assert os.listdir(scripts["workdir"]) == []


def test_crashed_and_hung_points(tmp_path: Path) -> None:
    # Killed by SIGABRT when a write fails at the first point, hangs at the second.
    script = tmp_path / "fragile.py"
    script.write_text(
        "import os, signal, time\n"
        "fd = os.open('f', os.O_WRONLY | os.O_CREAT)\n"
        "try:\n"
        f"    for _ in range(4): os.write(fd, b'x' * {BLOCK})\n"
        "except OSError:\n"
        "    if os.path.getsize('f') == 0: os.kill(os.getpid(), signal.SIGABRT)\n"
        "    time.sleep(60)\n")
    report = quotafs.sweep([sys.executable, str(script)], check="true", points=2,
                           timeout=3, workdir=str(tmp_path))
    assert [(p.room, p.verdict, p.signal, p.timed_out) for p in report.points] == [
        (0, "crashed", "SIGABRT", False), (2 * BLOCK, "hung", None, True)]
    assert report.exit_code == 1
    assert os.listdir(tmp_path) == ["fragile.py"]


# -- Ctrl-C and SIGTERM -------------------------------------------------------------------

# The baseline allocates 2 blocks (the limits' range) and makes one durability op (2 cut
# points); in the points it names itself in the markers directory and sleeps, on its
# mount, before any durability op, until interrupted.
SLEEPER = f"""
import os, sys, time
from quotafs.client import control
name = os.environ["QUOTAFS_SWEEP_RUN"]
try:
    with open("f", "wb") as f:
        f.write(b"x" * {2 * BLOCK})
        if name == "baseline":
            f.flush()
            os.fsync(f.fileno())
except OSError:
    pass
if name != "baseline":
    daemon = control.read_status(os.environ["QUOTAFS_MOUNT"]).pid
    with open(os.path.join(sys.argv[1], name), "w") as f:
        f.write(f"{{os.getpid()}} {{daemon}} {{os.getcwd()}}")
    time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone too
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("points", [["--points", "4"], ["--crash-points"]],
                         ids=["limits", "crash-points"])
def test_a_signal_mid_sweep_leaves_no_mount_daemon_or_copy(tmp_path: Path, points: list[str],
                                                           signum: int) -> None:
    script, markers, workdir = tmp_path / "sleeper.py", tmp_path / "markers", tmp_path / "w"
    script.write_text(SLEEPER)
    markers.mkdir()
    workdir.mkdir()
    result = interrupt_when(
        [sys.executable, "-m", "quotafs", "sweep", *points, "--jobs", "2",
         "--timeout", "300", "--workdir", str(workdir), "--check", "true", "--",
         sys.executable, str(script), str(markers)],
        lambda: len(os.listdir(markers)) >= 2, signum)  # two points running, each on its mount
    err = result.stderr
    assert result.returncode == 130, err
    assert err.splitlines()[-1] == "quotafs: interrupted"
    runs = [(markers / name).read_text().split() for name in sorted(os.listdir(markers))]
    assert sorted(os.listdir(markers)) == ["point-1", "point-2"]
    with open("/proc/self/mountinfo") as f:
        mounted = f.read()
    for program, daemon, mountpoint in runs:
        assert mountpoint.startswith(str(workdir))
        assert f" {mountpoint} " not in mounted
        deadline = time.monotonic() + 10
        while not (_gone(int(program)) and _gone(int(daemon))):
            assert time.monotonic() < deadline, (program, daemon)
            time.sleep(0.1)
    assert os.listdir(workdir) == []  # the starting state and every copy removed


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    ([], "quotafs: no command: give the program after --"),
    (["--"], "quotafs: no command: give the program after --"),
    (["--points", "0", "--", "true"], "argument --points: must be a whole number >= 1, got '0'"),
    (["--every", "0", "--", "true"], "argument --every: must be at least 1 byte, got '0'"),
    (["--every", "lots", "--", "true"], "argument --every: invalid size 'lots'"),
    (["--points", "3", "--every", "4K", "--", "true"], "not allowed with argument"),
    (["--jobs", "0", "--", "true"], "argument --jobs/-j: must be a whole number >= 1, got '0'"),
    (["--timeout", "0", "--", "true"],
     "argument --timeout: must be a number of seconds above 0, got '0'"),
    (["--from", "/nonexistent/start", "--", "true"],
     "quotafs: --from /nonexistent/start does not exist"),
    (["--block-size", "1000", "--", "true"], "quotafs: block_size must be a power of two"),
    (["--inodes", "x", "--", "true"], "quotafs: inodes must be a whole number"),
    (["--seed", str(2**64), "--", "true"], "quotafs: seed is too large"),
    (["--limit", "1M", "--", "true"], "unrecognized arguments: --limit"),
    (["--workdir", "/nonexistent/w", "--", "true"],
     "quotafs: --workdir /nonexistent/w is not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["sweep", *args])
    except SystemExit as exc:  # argparse's errors exit from the parser
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_baseline_that_fails_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = sweep_cli("-q", "--workdir", str(tmp_path), "--", sys.executable, "-c",
                       "import sys; sys.exit('cannot start')")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "quotafs: the baseline run (no limit) exit 1: cannot start; sweep needs a program "
        "that works when it has room"]
    failing_check = sweep_cli("-q", "--workdir", str(tmp_path), "--check", "exit 3", "--",
                              sys.executable, "-c", "open('f', 'w').write('x')")
    assert failing_check.returncode == 1
    assert failing_check.stderr.startswith("quotafs: the check after the baseline run (no "
                                           "limit) exit 3")
    nothing = sweep_cli("-q", "--workdir", str(tmp_path), "--", "true")
    assert (nothing.returncode, nothing.stderr) == (1, "quotafs: the baseline run "
                                                    "allocated nothing above the starting "
                                                    "state: no point at which the disk could "
                                                    "fill\n")
    # in apparent accounting a growing truncate takes space, with no write at all
    only_truncate = sweep_cli("-q", "--each-write", "--accounting", "apparent", "--workdir",
                              str(tmp_path), "--", "truncate", "-s", "8K", "f")
    assert (only_truncate.returncode, only_truncate.stderr.splitlines()) == (1, [
        "quotafs: the baseline run made no allocating write request (its space came from "
        "others, such as a growing truncate in apparent accounting): --each-write has no "
        "point; use --points or --every"])
    assert os.listdir(tmp_path) == []


def test_a_relative_program_is_the_start_states_or_the_callers(tmp_path: Path) -> None:
    # writes 8 KiB, and says which copy of itself ran (the caller's or the run's)
    script = "#!/bin/sh\nhead -c 8192 /dev/zero > f && echo \"$0\" >&2\n"
    mine, start, work = tmp_path / "mine", tmp_path / "start", tmp_path / "work"
    for folder in (mine, start, work):
        folder.mkdir()
    for path in (mine / "writer.sh", start / "own.sh"):
        path.write_text(script)
        path.chmod(0o755)

    def sweep_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quotafs", "sweep", "--json", "-q",
                               "--points", "2", "--workdir", str(work), *args], cwd=cwd,
                              capture_output=True, text=True, timeout=120, check=False)

    # in the caller's directory only: that file, by its absolute path
    theirs = sweep_in(mine, "--", "./writer.sh")
    assert theirs.returncode == 0, theirs.stderr
    report = json.loads(theirs.stdout)
    assert report["baseline"]["stderr_tail"] == str(mine / "writer.sh")
    assert [p["verdict"] for p in report["points"]] == ["ok", "ok"]
    # in the starting state (--from): the run's own copy, relative to the mount
    own = sweep_in(tmp_path, "--from", str(start), "--", "./own.sh")
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout)["baseline"]["stderr_tail"] == "./own.sh"
    missing = sweep_in(tmp_path, "--", "./nowhere.sh")
    assert (missing.returncode, missing.stderr) == (2, "quotafs: cannot run ./nowhere.sh: "
                                                    "neither the starting state nor the "
                                                    "current directory has it\n")
    assert os.listdir(work) == []


# -- as another user ----------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to run as nobody) and /usr/bin/python3")
def test_as_user_runs_setup_cmd_and_check_as_that_user() -> None:
    nobody = pwd.getpwnam("nobody")
    here = tempfile.mkdtemp(prefix="quotafs-sweep-test-")  # not below a 0700 pytest dir
    try:
        os.chmod(here, 0o755)
        Path(here, "updater.py").write_text(UPDATER)
        Path(here, "check.py").write_text(
            CHECK.replace("import sys", f"import os, sys\nassert os.getuid() == "
                                        f"{nobody.pw_uid}\nassert os.stat('data').st_uid == "
                                        f"{nobody.pw_uid}"))
        Path(here, "old").write_bytes(OLD)
        for name in ("updater.py", "check.py", "old"):
            os.chmod(os.path.join(here, name), 0o644)
        result = sweep_cli("--json", "-q", "--as-user", "nobody", "--points", "3",
                           "--workdir", here, "--setup", f"cp {here}/old data",
                           "--check", f"/usr/bin/python3 {here}/check.py", "--",
                           "/usr/bin/python3", f"{here}/updater.py", "careful")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["baseline"]["check_exit_code"] == 0
        assert [p["verdict"] for p in report["points"]] == ["ok"] * 3
        assert sorted(os.listdir(here)) == ["check.py", "old", "updater.py"]
    finally:
        shutil.rmtree(here)


def test_as_user_unknown_is_one_line() -> None:
    result = sweep_cli("--as-user", "no-such-user-here", "--", "true")
    assert (result.returncode, result.stderr) == (2, "quotafs: no such user "
                                                  "'no-such-user-here'\n")


def test_the_baseline_line_shows_the_command_quoted_and_escaped(tmp_path: Path) -> None:
    script = f'open("f", "wb").write(b"x" * {2 * BLOCK})\n# \x1b[2J'
    result = sweep_cli("--points", "1", "--workdir", str(tmp_path), "--", sys.executable,
                       "-c", script)
    assert result.returncode == 0, result.stderr
    # the script one shell word, its newline and escape sequence shown, not acted on
    assert result.stderr.splitlines()[0] == (
        f"sweep: baseline: {sys.executable} -c 'open(\"f\", \"wb\").write(b\"x\" * "
        f"{2 * BLOCK})\\n# \\033[2J' with no limit")


def test_progress_on_a_terminal_is_one_updating_line(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "quotafs", "sweep", "--points", "2", "--workdir",
             str(tmp_path), "--", sys.executable, "-c",
             f"open('f', 'wb').write(b'x' * {2 * BLOCK})"],
            stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120, check=False)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    shown = b"".join(chunks).decode()
    assert result.returncode == 0, shown
    # every update rewrites the same line (carriage return, erase line); one newline at the end
    updates = shown.split("\r\x1b[K")
    assert updates[0] == ""
    expected = ["sweep: baseline: ", "sweep: baseline (no limit): exit 0",
                "sweep: 1/2 points, 0 failed, ~", "sweep: 2/2 points, 0 failed, ~0s left"]
    assert len(updates) == 1 + len(expected), shown
    assert all(u.startswith(e) for u, e in zip(updates[1:], expected, strict=True)), shown
    assert shown.count("\n") == 1 and shown.endswith("\n")
