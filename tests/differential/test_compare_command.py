"""`quotafs compare -- CMD` against the real loop-ext4 (root): a user's program on ext4,
quotafs and quotafs --mmap-sigbus, side by side; nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import quotafs
from quotafs.errors import ExitCode, QuotafsError
from tests.cli.test_program import gone
from tests.conftest import needs_fuse_and_loop_ext4
from tests.differential.test_compare import leftovers

pytestmark = needs_fuse_and_loop_ext4

ROOT = Path(__file__).resolve().parents[2]
MMAP_WRITER = ROOT / "examples" / "mmap_compare" / "mmaptest.py"
# Fill the disk with 64 KiB write(2)s; on ENOSPC say so and exit 28.
FILLER = ("import errno, sys\n"
          "with open('data', 'wb') as f:\n"
          "    try:\n"
          "        while True: f.write(b'x' * 65536)\n"
          "    except OSError as exc:\n"
          "        print(errno.errorcode[exc.errno], file=sys.stderr); sys.exit(28)\n")


def compare(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotafs", "compare", "--workdir",
                           str(workdir), *args], capture_output=True, text=True, timeout=300)


def runs_of(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert result.returncode in (0, 1), result.stderr
    return {run["target"]: run for run in json.loads(result.stdout)["runs"]}


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A work directory another user can walk into (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="quotafs-test-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_program_filling_the_disk_fails_alike_everywhere(tmp_path: Path) -> None:
    report = quotafs.compare_command([sys.executable, "-c", FILLER], limit="4M",
                                     workdir=str(tmp_path))
    assert [r.target for r in report.runs] == ["ext4", "quotafs", "quotafs-sigbus"]
    for run in report.runs:
        assert (run.exit_code, run.signal, run.timed_out) == (28, None, False), run
        assert run.stderr_tail == "ENOSPC"
        assert run.files == 1
    ext4 = report.run("reference")
    assert ext4 is report.run("ext4")
    for target in ("quotafs", "quotafs-sigbus"):
        mine = report.run(target)
        # The same room: what each used at the end is within a few blocks (ext4's extent
        # tree and the last refused write) of the reference.
        assert abs(mine.used_bytes - ext4.used_bytes) <= 64 * 1024, (mine, ext4)
        assert abs(mine.dir_bytes - ext4.dir_bytes) <= 64 * 1024
        assert [(e["op"], e["path"], e["errno"]) for e in mine.events] == \
            [("write", "/run/data", "ENOSPC")]
        assert 0 <= mine.events[0]["time"] <= mine.wall_s + 1
    assert ext4.events == [] and report.same is True and report.differences == []
    assert report.quotafs_limit == report.reference["write_capacity_hint"]
    assert leftovers(tmp_path) == []


def test_the_mmap_writer_dies_by_sigbus_on_ext4_and_sigbus_mode_only(tmp_path: Path) -> None:
    result = compare("--limit", "8M", "--json", "--expect-same", "--", sys.executable,
                     str(MMAP_WRITER), "32", workdir=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = runs_of(result)
    assert runs["ext4"]["signal"] == runs["quotafs-sigbus"]["signal"] == "SIGBUS"
    assert (runs["quotafs"]["signal"], runs["quotafs"]["exit_code"]) == (None, 0)
    assert json.loads(result.stdout)["differences"] == [
        "quotafs: CMD exit 0, ext4: killed by SIGBUS"]
    human = compare("--limit", "8M", "--targets", "ext4,quotafs", "--", sys.executable,
                    str(MMAP_WRITER), "32", workdir=tmp_path)
    assert human.returncode == 0, human.stderr
    assert "*exit 0" in human.stdout and "killed by SIGBUS" in human.stdout
    assert "DIFFERS  quotafs: CMD exit 0, ext4: killed by SIGBUS" in human.stdout
    assert leftovers(tmp_path) == []


def test_setup_content_is_on_every_target_and_check_is_reported(tmp_path: Path) -> None:
    result = compare("--limit", "2M", "--json", "--setup", "printf seeded > start; mkdir d",
                     "--check", "test -s out && exit 3", "--", "sh", "-c",
                     'cat start; test "$QUOTAFS_MOUNT" = "$PWD" && ls > out', workdir=tmp_path)
    runs = runs_of(result)
    assert result.returncode == 0
    for run in runs.values():
        assert (run["exit_code"], run["stdout_tail"]) == (0, "seeded"), run
        assert run["check_exit_code"] == 3 and run["files"] == 2  # start, out
    data = json.loads(result.stdout)
    assert data["same"] is True and data["differences"] == []
    assert leftovers(tmp_path) == []


def test_a_setup_that_fails_stops_with_one_line(tmp_path: Path) -> None:
    result = compare("--limit", "2M", "--setup", "echo no room >&2; exit 4", "--", "true",
                     workdir=tmp_path)
    assert result.returncode == ExitCode.FAILURE
    assert result.stderr.strip().splitlines()[-1] == \
        "quotafs: --setup failed on ext4 (exit 4): no room"
    assert leftovers(tmp_path) == []


def test_a_hung_program_is_killed_and_reported_hung(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    result = compare("--limit", "2M", "--json", "--timeout", "1", "--targets",
                     "reference,quotafs", "--", "sh", "-c",
                     f"sleep 600 & echo $! >> {pids}; wait", workdir=tmp_path)
    runs = runs_of(result)
    for run in runs.values():
        assert (run["exit_code"], run["signal"], run["timed_out"]) == (None, None, True)
        assert run["ended"].startswith("hung")
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2 and all(gone(pid) for pid in children)
    pids.unlink()
    assert leftovers(tmp_path) == []


def test_as_user_nobody_stops_short_of_roots_reserve(open_workdir: Path) -> None:
    fill = ["sh", "-c", "id -u; dd if=/dev/zero of=data bs=64k 2>err; r=$?; "
                        "grep -o 'No space left on device' err >&2; exit $r"]
    result = compare("--limit", "8M", "--json", "--as-user", "nobody", "--targets",
                     "reference,quotafs-sigbus", "--", *fill, workdir=open_workdir)
    runs = runs_of(result)
    data = json.loads(result.stdout)
    others_room = data["quotafs_limit"] - data["quotafs_reserve"]
    assert data["quotafs_reserve"] > 0 and data["user"] == "nobody"
    for run in runs.values():
        assert run["stdout_tail"] == "65534" and run["exit_code"] == 1, run
        assert run["stderr_tail"] == "No space left on device"
        assert abs(run["dir_bytes"] - others_room) <= 128 * 1024, (run, others_room)
    assert abs(runs["ext4"]["dir_bytes"] - runs["quotafs-sigbus"]["dir_bytes"]) <= 64 * 1024
    assert leftovers(open_workdir) == []


def test_expect_same_fails_when_the_faithful_target_differs(tmp_path: Path) -> None:
    differs = compare("--limit", "2M", "--expect-same", "--", "sh", "-c",
                      'test "$QUOTAFS_TARGET" = ext4', workdir=tmp_path)
    assert differs.returncode == ExitCode.FAILURE, differs.stderr
    assert "DIFFERENT outcome" in differs.stdout
    same = compare("--limit", "2M", "--expect-same", "--check", "exit 2", "--", "true",
                   workdir=tmp_path)
    assert same.returncode == 0, same.stderr
    assert leftovers(tmp_path) == []


def test_json_keys_and_types(tmp_path: Path) -> None:
    result = compare("--limit", "2M", "--json", "--", "sh", "-c", "echo hi > f",
                     workdir=tmp_path)
    data = json.loads(result.stdout)
    assert isinstance(data["reference"], dict) and data["reference"]["kind"] == "ext4"
    assert isinstance(data["reference"]["known_differences"], list)
    types = {"target": str, "exit_code": int, "signal": type(None), "timed_out": bool,
             "check_exit_code": type(None), "used_bytes": int, "files": int,
             "wall_s": float, "events": list}
    assert [run["target"] for run in data["runs"]] == ["ext4", "quotafs", "quotafs-sigbus"]
    for run in data["runs"]:
        for key, kind in types.items():
            assert type(run[key]) is kind, (key, run[key])
        assert run["used_bytes"] > 0 and run["files"] == 1
    assert leftovers(tmp_path) == []


def test_mount_options_reach_the_quotafs_targets(tmp_path: Path) -> None:
    """--inodes 3 on quotafs: the program's fourth file gets ENOSPC there, not on ext4."""
    result = compare("--limit", "2M", "--json", "--inodes", "3", "--targets",
                     "reference,quotafs", "--", "sh", "-c",
                     "touch a b c d 2>/dev/null", workdir=tmp_path)
    runs = runs_of(result)
    assert runs["ext4"]["exit_code"] == 0 and runs["ext4"]["files"] == 4
    assert runs["quotafs"]["exit_code"] == 1 and runs["quotafs"]["files"] < 4
    assert any(e["op"] in ("create", "mknod") and e["errno"] == "ENOSPC"
               for e in runs["quotafs"]["events"])
    assert leftovers(tmp_path) == []


def test_api_refuses_bad_requests_before_building_anything(tmp_path: Path) -> None:
    for kwargs, words in [({"targets": "ext4,zfs"}, "unknown target 'zfs'"),
                          ({"like_ext4": "8M"}, "like-ext4"),
                          ({"limit_": 1}, "unknown option"),
                          ({"timeout": 0}, "--timeout must be positive")]:
        with pytest.raises(QuotafsError, match=words) as caught:
            quotafs.compare_command(["true"], limit="2M", workdir=str(tmp_path), **kwargs)
        assert caught.value.code == ExitCode.USAGE
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_compare_command_leaves_nothing_behind(tmp_path: Path, sig: int) -> None:
    pids = tmp_path.parent / f"pids-{sig}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quotafs", "compare", "--workdir", str(tmp_path), "--limit",
         "2M", "--timeout", "5", "--", "sh", "-c", f"echo $$ >> {pids}; sleep 600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # wait until the program runs on the quotafs target
            if line.startswith("quotafs ") and "running" in line:
                break
            assert time.monotonic() < deadline
        while len(pids.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == ExitCode.INTERRUPTED
    programs = [int(p) for p in pids.read_text().split()]
    assert len(programs) == 2 and all(gone(pid) for pid in programs)
    assert leftovers(tmp_path) == []
    os.unlink(pids)
