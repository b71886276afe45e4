"""The plugin's disk-full sweep: @pytest.mark.quotafs_sweep + the sweep_point fixture make one
test item per point, run through pytester as a user's suite runs them (in a subprocess:
the inner session's mounts are its own), with and without pytest-xdist.

The programs are examples/atomic_update's: version 1 of data.txt is 32 KiB, the updaters
write version 2 (64 KiB) and then a report (32 KiB), so the baseline grows usage by 96 KiB
and `points=10` puts the disk full at rooms i * 9.6 KiB, rounded down to whole 4 KiB blocks:
0, 8, 16, 28, 36, 48, 56, 64, 76, 84 KiB. The careless updater breaks data.txt at the first
seven (less room than the 64 KiB of version 2) and at none of the last three.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quotafs.mountinfo import find_mount
from quotafs.testing import FORCE_NO_FUSE_ENV
from tests.conftest import interrupt_when, needs_fuse

pytest_plugins = "pytester"

TIMEOUT = 240
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "atomic_update"
CARELESS_FAILS = [f"point{i:02d}" for i in range(1, 8)]
CARELESS_PASSES = [f"point{i:02d}" for i in range(8, 11)]


def inner_suite(pytester: pytest.Pytester, updater: str, points: int = 10,
                choice: str | None = None) -> Path:
    """A user's test module sweeping `updater`; the setup (run once per plan, to make the
    starting state) and every check (after the baseline and after each point) append a
    line to runs.log."""
    log = pytester.path / "runs.log"
    py = shlex.quote(sys.executable)
    setup = f"echo setup >> {shlex.quote(str(log))}; {py} {EXAMPLE / 'versions.py'} setup"
    check = f"echo check >> {shlex.quote(str(log))}; {py} {EXAMPLE / 'versions.py'} check"
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        import sys
        import pytest

        @pytest.mark.quotafs_sweep(cmd=[sys.executable, {str(EXAMPLE / updater)!r}],
                                   setup={setup!r},
                                   check={check!r},
                                   {choice or f"points={points}"})
        def test_update(sweep_point):
            sweep_point.assert_ok()
        """))
    return log


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args,
                                         timeout=TIMEOUT)


def outcomes(result: pytest.RunResult) -> dict[str, list[str]]:
    """Item ids by outcome, from the -rA short summary ("PASSED test_inner.py::...[id]");
    skipped items are summarized by reason there, not by id."""
    found: dict[str, list[str]] = {}
    for line in result.outlines:
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR") and "[" in rest:
            found.setdefault(word, []).append(rest.split("[", 1)[1].split("]", 1)[0])
    return {k: sorted(v) for k, v in found.items()}


def test_the_marker_makes_one_item_per_point_before_anything_runs(
        pytester: pytest.Pytester) -> None:
    log = inner_suite(pytester, "careless_update.py", points=12)
    result = run(pytester, "--collect-only", "-q")
    assert result.ret == 0
    ids = [line.split("[")[1].rstrip("]") for line in result.outlines if "::test_update[" in line]
    assert ids == [f"point{i:02d}" for i in range(1, 13)]
    assert not log.exists()  # collecting runs nothing: every xdist worker collects alike


@pytest.mark.parametrize(("marker", "message"), [
    ("", "test_inner.py::test_update: the sweep_point fixture needs "
         "@pytest.mark.quotafs_sweep(cmd=..., check=..., points=N)"),
    ("@pytest.mark.quotafs_sweep(check='true')",
     "@pytest.mark.quotafs_sweep on test_inner.py::test_update: cmd= is required: a "
     "command line (str) or an argv list"),
    ("@pytest.mark.quotafs_sweep(cmd='true', each_write=True)",
     "@pytest.mark.quotafs_sweep on test_inner.py::test_update: with each_write or every, "
     "give max_runs=N: the number of test items must be known before the baseline runs"),
    ("@pytest.mark.quotafs_sweep(cmd='true', points=0)",
     "@pytest.mark.quotafs_sweep on test_inner.py::test_update: the number of points must "
     "be a positive integer, got 0"),
])
def test_a_bad_sweep_marker_is_one_line_at_collection(pytester: pytest.Pytester, marker: str,
                                                      message: str) -> None:
    pytester.makepyfile(test_inner=f"import pytest\n{marker}\n"
                                   "def test_update(sweep_point):\n    pass\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error
    result.stdout.fnmatch_lines([f"*{message}*"])
    assert "Traceback" not in result.stdout.str()


@needs_fuse
def test_the_careless_updater_fails_exactly_the_points_where_the_disk_fills_mid_write(
        pytester: pytest.Pytester) -> None:
    log = inner_suite(pytester, "careless_update.py")
    result = run(pytester)
    assert outcomes(result) == {"FAILED": CARELESS_FAILS, "PASSED": CARELESS_PASSES}
    runs = log.read_text().split()
    assert (runs.count("setup"), runs.count("check")) == (1, 1 + 10)  # one baseline
    # The failure says where the disk was full, how both ended, the verdict, the tails.
    result.stdout.fnmatch_lines([
        "*quotafs sweep point 4 of 10: limit 60.0 KiB (start + 28.0 KiB)",
        "CMD: exit 0; check: exit 1",
        "verdict: check failed after success",
        "check stderr (tail):",
        # 3 writes of 8 KiB fit in 28 KiB; the 4th is refused whole, as ext4 would
        "  check: data.txt is neither version: 24576 bytes, starting b'version 2 record*",
    ])
    assert "Traceback" not in result.stdout.str()


@needs_fuse
def test_the_careful_updater_passes_every_point(pytester: pytest.Pytester) -> None:
    inner_suite(pytester, "careful_update.py")
    result = run(pytester)
    assert outcomes(result) == {"PASSED": CARELESS_FAILS + CARELESS_PASSES}


@needs_fuse
def test_xdist_spreads_the_points_with_the_same_result(pytester: pytest.Pytester) -> None:
    log = inner_suite(pytester, "careless_update.py")
    result = run(pytester, "-n", "2")
    assert outcomes(result) == {"FAILED": CARELESS_FAILS, "PASSED": CARELESS_PASSES}
    result.stdout.fnmatch_lines(["created: 2/2 workers*"])
    runs = log.read_text().split()
    assert (runs.count("setup"), runs.count("check")) == (2, 2 + 10)  # a baseline per worker


@needs_fuse
def test_a_baseline_that_fails_errors_every_item_with_one_line(
        pytester: pytest.Pytester) -> None:
    log = pytester.path / "runs.log"
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        import pytest

        @pytest.mark.quotafs_sweep(cmd="sh -c 'echo run >> {log}; echo no room >&2; exit 3'",
                                   points=3)
        def test_it(sweep_point):
            sweep_point.assert_ok()
        """))
    # -rN: no short summary, whose lines pytest cuts to the terminal's width except when
    # CI is set, so that only the errors' own reports say the message.
    result = run(pytester, "-rN")
    result.assert_outcomes(errors=3)
    assert log.read_text().split() == ["run"]  # the baseline ran once, not once per item
    message = ("quotafs sweep: the baseline run (no limit) exit 3: no room; sweep needs a "
               "program that works when it has room")
    assert result.stdout.str().count(message) == 3
    assert "Traceback" not in result.stdout.str()


@needs_fuse
def test_a_failing_sweep_item_reports_its_point_whatever_it_asserted(
        pytester: pytest.Pytester) -> None:
    py = shlex.quote(sys.executable)
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        import sys
        import pytest

        @pytest.mark.quotafs_sweep(cmd=[sys.executable, {str(EXAMPLE / 'careless_update.py')!r}],
                                   setup="{py} {EXAMPLE / 'versions.py'} setup",
                                   check="{py} {EXAMPLE / 'versions.py'} check", points=2)
        def test_update(sweep_point):
            assert sweep_point.result.exit_code != 0, "it said nothing"
        """))
    result = run(pytester)
    assert outcomes(result) == {"FAILED": ["point1", "point2"]}
    assert result.stdout.str().count("- quotafs sweep point -") == 2
    result.stdout.fnmatch_lines(["*AssertionError: it said nothing*",
                                 "*- quotafs sweep point -*",
                                 "quotafs sweep point 2 of 2: limit 80.0 KiB (start + 48.0 KiB)",
                                 "verdict: check failed after success"])


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_the_middle_of_a_sweep_leaves_nothing_behind(
        pytester: pytest.Pytester, sig: signal.Signals) -> None:
    tmp = pytester.path / "tmp"  # the sweep's directory and every mount point go here
    tmp.mkdir()
    runs = pytester.path / "runs.log"
    # The baseline writes and ends; a point writes, says where it runs, then hangs.
    cmd = (f"head -c 8192 /dev/zero > f; echo $QUOTAFS_MOUNT $$ >> {runs}; "
           '[ "$QUOTAFS_SWEEP_RUN" = baseline ] || exec sleep 60')
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        import pytest

        @pytest.mark.quotafs_sweep(cmd=["sh", "-c", {cmd!r}], points=2)
        def test_it(sweep_point):
            sweep_point.assert_ok()
        """))
    result = interrupt_when(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        lambda: runs.exists() and len(runs.read_text().splitlines()) == 2, sig,
        cwd=pytester.path, env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.STDOUT)
    output = result.stdout
    assert result.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "Traceback" not in output
    (_, _), (mount, program) = [line.split() for line in runs.read_text().splitlines()]
    assert find_mount(mount) is None
    assert list(tmp.iterdir()) == []  # no sweep directory, copy or mount point left
    with pytest.raises(ProcessLookupError):  # the point's program was killed (and reaped)
        os.kill(int(program), 0)


def test_without_fuse_every_point_is_skipped_with_the_reason(pytester: pytest.Pytester,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv(FORCE_NO_FUSE_ENV, "1")
    log = inner_suite(pytester, "careless_update.py", points=3)
    result = run(pytester)
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines([f"SKIPPED * quotafs: FUSE is not usable here: "
                                 f"{FORCE_NO_FUSE_ENV} is set (run `quotafs doctor`)"])
    assert not log.exists()  # no baseline either


@needs_fuse
def test_each_write_items_past_the_baselines_writes_are_skipped(
        pytester: pytest.Pytester) -> None:
    # 12 allocating writes: 8 of version 2 (ENOSPC from any of them on breaks data.txt),
    # then 4 of the report; items 13 and 14 have no write to fail.
    inner_suite(pytester, "careless_update.py", choice="each_write=True, max_runs=14")
    result = run(pytester)
    result.assert_outcomes(failed=8, passed=4, skipped=2)
    found = outcomes(result)
    assert (found["FAILED"], found["PASSED"]) == ([f"point{i:02d}" for i in range(1, 9)],
                                                  [f"point{i:02d}" for i in range(9, 13)])
    result.stdout.fnmatch_lines(["*quotafs sweep point 8 of 12: allocating write 8",
                                 "SKIPPED [[]2[]] *: quotafs sweep: the baseline gives 12 "
                                 "points only"])


# -- crash points ---------------------------------------------------------------------------

# Writes `data` and reports it saved (in $QUOTAFS_SWEEP_NOTES) before its fsync, the
# careless order; with "careful", after. Its durability ops: the directory's fsync, the
# file's: 3 crash points (k = 0, 1, 2). The careless one loses reported data at k = 1.
SAVER = """
import os, sys
fd = os.open("data", os.O_WRONLY | os.O_CREAT, 0o644)
d = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
os.fsync(d)
os.write(fd, b"x" * 5000)
note = lambda: open(os.path.join(os.environ["QUOTAFS_SWEEP_NOTES"], "saved"), "w").close()
if sys.argv[1] == "careless":
    note()
try:
    os.fsync(fd)
except OSError as exc:
    sys.exit(f"saver: {exc}")
if sys.argv[1] == "careful":
    note()
"""
SAVER_CHECK = """
import os, sys
if os.path.exists(os.path.join(os.environ["QUOTAFS_SWEEP_NOTES"], "saved")):
    size = os.path.getsize("data") if os.path.exists("data") else -1
    sys.exit(0 if size == 5000 else f"check: reported saved, data has {size} bytes")
"""


def crash_suite(pytester: pytest.Pytester, mode: str) -> None:
    saver, check = pytester.path / "saver.py", pytester.path / "check.py"
    saver.write_text(SAVER)
    check.write_text(SAVER_CHECK)
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        import sys
        import pytest

        @pytest.mark.quotafs_sweep(cmd=[sys.executable, {str(saver)!r}, {mode!r}],
                                   check={f"{sys.executable} {check}"!r},
                                   crash_points=True, model="ext4", points=4)
        def test_save(sweep_point):
            sweep_point.assert_ok()
        """))


@needs_fuse
def test_crash_points_make_one_item_per_cut_and_say_what_the_cut_lost(
        pytester: pytest.Pytester) -> None:
    crash_suite(pytester, "careless")
    result = run(pytester)
    assert outcomes(result) == {"FAILED": ["point2"], "PASSED": ["point1", "point3"]}
    result.assert_outcomes(passed=2, failed=1, skipped=1)  # 3 cuts for 4 items
    result.stdout.fnmatch_lines([
        "*quotafs sweep point 2 of 3: cut at durability op 2",
        "the cut: lost 4.9 KiB, 0 names (data, size)",
        "  data /data (5000 bytes)",
        "  size /data (*",
        "CMD: *; check: exit 1",
        "verdict: data lost at the cut",
        "check stderr (tail):",
        "  check: reported saved, data has 0 bytes",
    ])
    assert "Traceback" not in result.stdout.str()


@needs_fuse
def test_a_careful_saver_passes_every_crash_point(pytester: pytest.Pytester) -> None:
    crash_suite(pytester, "careful")
    result = run(pytester)
    assert outcomes(result) == {"PASSED": ["point1", "point2", "point3"]}
