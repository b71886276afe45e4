"""The examples in examples/ are test suites of small applications using the quotafs pytest
plugin (see docs/testing.md): each must pass, run as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_fuse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir()
                  and any(p.glob("test_*.py")))


# The last line of each example's run, where it does not depend on who runs it.
SUMMARIES = {"atomic_update": "12 passed", "crash_config": "5 passed"}
# sqlite_wal: 10 disk-full points, 2 synchronous=NORMAL sweeps, 6 posix cuts, and 40 items
# of ext4 cuts, of which the baseline's count (one per fsync of this SQLite: 35 cuts with
# 3.x of 2026) run and the rest skip, saying so.
SQLITE_WAL_AT_LEAST = 10 + 2 + 6 + 1
SQLITE_WAL_ITEMS = 10 + 2 + 6 + 40


def test_there_are_examples() -> None:
    assert {"sqlite_full", "mmap_compare", *SUMMARIES} <= {p.name for p in EXAMPLES}


@needs_fuse
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes(example: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", str(example)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    if example.name == "sqlite_full":
        # The ext4 comparison needs root; elsewhere it is skipped, with the reason.
        summary = "3 passed" if os.geteuid() == 0 else "2 passed, 1 skipped"
        assert summary in output.splitlines()[-1], output
    if example.name == "mmap_compare" and os.geteuid() == 0:  # the ext4 reference
        assert "1 passed" in output.splitlines()[-1], output
    if example.name in SUMMARIES:
        assert SUMMARIES[example.name] in output.splitlines()[-1], output
    if example.name == "sqlite_wal":
        counts = re.search(r"\b(\d+) passed(?:, (\d+) skipped)? in ", output.splitlines()[-1])
        assert counts, output
        passed, skipped = int(counts.group(1)), int(counts.group(2) or 0)
        assert passed >= SQLITE_WAL_AT_LEAST and passed + skipped == SQLITE_WAL_ITEMS, output
        skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
        assert all("quotafs sweep: the baseline gives" in line for line in skips), output
