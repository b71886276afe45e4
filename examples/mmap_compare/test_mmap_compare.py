"""The seed's mmap writer through `quotafs compare --`: where does it die?

    pytest examples/mmap_compare

Runs `quotafs compare --json --limit 8M --check 'python mmaptest.py --verify' -- python
mmaptest.py` (as a user would type it) and checks the answer the seed article found by
hand: on the kernel's filesystem the writer is killed by SIGBUS once the disk is full, and
so it is on quotafs with --mmap-sigbus (quotafs-sigbus, within a chunk of the same place).
On plain quotafs (FUSE's own mmap semantics) every store goes through and the program
exits 0, saying it is done — but its data was refused at writeback, which it never
checks, and the check finds most of it missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from quotafs.errors import ExitCode
from quotafs.testing import fuse_unusable_reason

WRITER = Path(__file__).with_name("mmaptest.py")


def compare_mmap_writer() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "quotafs", "compare", "--json", "--limit", "8M",
         "--check", f"{sys.executable} {WRITER} --verify", "--",
         sys.executable, str(WRITER), "64"], capture_output=True, text=True, timeout=300)
    if result.returncode in (ExitCode.PERMISSION, ExitCode.LOOP) and os.geteuid() != 0:
        pytest.skip(f"no kernel reference for this user: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def last_chunk(run: dict[str, Any]) -> int:
    """The number of the last chunk the writer began to store."""
    return int(run["stdout_tail"].split()[-1])


@pytest.mark.skipif(fuse_unusable_reason() is not None, reason=fuse_unusable_reason() or "")
def test_mmap_writer_dies_by_sigbus_where_the_kernel_says() -> None:
    report = compare_mmap_writer()
    runs = {run["target"]: run for run in report["runs"]}
    reference = runs[report["reference"]["kind"]]
    faithful = runs["quotafs-sigbus"]
    assert reference["signal"] == faithful["signal"] == "SIGBUS"
    assert abs(last_chunk(faithful) - last_chunk(reference)) <= 1
    assert reference["check_exit_code"] == faithful["check_exit_code"] == 0
    plain = runs["quotafs"]
    assert (plain["signal"], plain["exit_code"], last_chunk(plain)) == (None, 0, 63)
    assert any(e["errno"] == "ENOSPC" for e in plain["events"])  # refused at writeback
    assert plain["check_exit_code"] == 1
    assert "of the 64 chunks stored are in the file" in plain["check_stderr_tail"]
