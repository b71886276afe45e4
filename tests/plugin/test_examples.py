"""The examples in examples/ are test suites of small applications using the quotafs pytest
plugin (see docs/testing.md): each must pass, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_fuse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir()
                  and any(p.glob("test_*.py")))


# The last line of each example's run, where it does not depend on who runs it.
SUMMARIES = {"atomic_update": "12 passed", "sqlite_wal": "10 passed", "crash_config": "5 passed"}


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
