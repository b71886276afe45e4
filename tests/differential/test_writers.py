"""The writers on a plain directory, the verification helper and the standalone CLI.

Their behaviour on a full filesystem (SIGBUS, ENOSPC) is tested against real loop-ext4
in test_loopext4.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quotafs.compare.writers import KINDS, bytes_on_disk, chunk_pattern, run_writer
from quotafs.errors import ExitCode, QuotafsError

M = 1024 * 1024
ROOT = str(Path(__file__).resolve().parents[2])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "quotafs.compare.writers", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_chunk_patterns_differ_and_are_never_zero() -> None:
    blocks = set()
    for i in range(64):
        data = chunk_pattern(i, 3 * 4096)
        assert len(data) == 3 * 4096
        assert data[:4096] != bytes(4096)
        blocks.add(data[:4096])
    assert len(blocks) == 64
    assert len(chunk_pattern(5, 1000)) == 1000  # chunk sizes need not be whole blocks
    assert chunk_pattern(7, 10000) == chunk_pattern(7, 10000)


@pytest.mark.parametrize("kind", KINDS)
def test_writer_completes_on_plain_directory(kind: str, tmp_path: Path) -> None:
    size = 4 * M + 12345  # a last chunk that is partial and not block-aligned
    path = str(tmp_path / kind)
    seen: list[int] = []
    result = run_writer(kind, path, size, M, timeout=60, progress=seen.append)
    assert result.outcome == "completed", result
    assert (result.exit_status, result.errno_name, result.signal_name) == (0, None, None)
    assert result.bytes_acknowledged == size
    assert seen == sorted(seen) and seen[-1] == size
    assert os.path.getsize(path) == size
    assert bytes_on_disk(path, M, size) == size
    if kind == "fallocate":
        assert result.allocated_bytes is not None and result.allocated_bytes >= size
        assert result.file_size == size
    else:
        assert result.allocated_bytes is None


def test_open_failure_is_reported_with_its_call(tmp_path: Path) -> None:
    result = run_writer("write", str(tmp_path / "missing" / "f"), M, M, timeout=60)
    assert result.outcome == "errno"
    assert (result.failed_call, result.errno_name) == ("open", "ENOENT")
    assert result.bytes_acknowledged == 0
    assert result.exit_status == 1


def test_timeout_kills_the_child(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for writing blocks forever: nobody reads
    result = run_writer("write", str(fifo), M, M, timeout=0.5)
    assert (result.outcome, result.signal_name, result.exit_status) == ("signal", "SIGKILL", 137)
    assert result.note is not None and "timed out" in result.note


def test_unknown_writer_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(QuotafsError) as info:
        run_writer("dd", str(tmp_path / "f"), M, M)
    assert info.value.code == ExitCode.USAGE


def test_bytes_on_disk_stops_at_a_hole_and_counts_whole_blocks(tmp_path: Path) -> None:
    chunk = 64 * 1024
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(chunk_pattern(0, chunk))
        f.write(chunk_pattern(1, chunk)[: 3 * 4096 + 100])  # 3 blocks and a bit, then
        f.write(b"x" * 4000)  # garbage in the rest of block 3,
        f.seek(3 * chunk)  # a hole,
        f.write(chunk_pattern(3, chunk))  # and data that must not count after it
    assert bytes_on_disk(str(path), chunk, 4 * chunk) == chunk + 3 * 4096
    assert bytes_on_disk(str(path), chunk, chunk // 2) == chunk // 2  # limit respected


def test_bytes_on_disk_counts_to_the_end_of_a_short_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(chunk_pattern(0, M) + chunk_pattern(1, M)[:5000])
    assert bytes_on_disk(str(path), M, 8 * M) == M + 5000


def test_cli_write_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "f"
    proc = _cli("write", str(path), "--size", "4M", "--chunk", "1M")
    assert proc.returncode == 0, proc.stderr
    assert "done" in proc.stdout
    assert bytes_on_disk(str(path), M, 8 * M) == 4 * M


@pytest.mark.parametrize(
    "args",
    [
        ("dd", "f"),
        ("write", "f", "--size", "lots"),
        ("write", "f", "--chunk", "0"),
        ("write",),
    ],
)
def test_cli_usage_errors_are_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    proc = _cli(*[str(tmp_path / a) if a == "f" else a for a in args])
    assert proc.returncode == ExitCode.USAGE
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "f").exists()
