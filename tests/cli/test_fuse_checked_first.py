"""compare -- CMD and sweep say that FUSE is unusable before they run anything: not after
the program ran on the reference (compare) or after --setup (sweep)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotafs.errors import ExitCode

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody may write, for the marker a command leaves when it ran."""
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import quotafs.cli.main"],
                           capture_output=True, timeout=60, check=False)
    if os.geteuid() != 0 or probe.returncode != 0:
        pytest.skip("needs root, and an interpreter an unprivileged user can reach")
    everyone = stat.S_IROTH | stat.S_IWOTH
    if os.path.exists("/dev/fuse") and os.stat("/dev/fuse").st_mode & everyone == everyone:
        pytest.skip("/dev/fuse is usable by every user here")
    path = Path(tempfile.mkdtemp(prefix="quotafs-test-"))
    try:
        path.chmod(0o777)
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("command", [
    ["compare", "--limit", "2M", "--"],
    ["sweep", "--setup", "touch {dir}/setup-ran", "--workdir", "{dir}", "--"],
])
def test_no_fuse_is_told_before_anything_runs(shared_dir: Path, command: list[str]) -> None:
    args = [a.format(dir=shared_dir) for a in command]
    result = subprocess.run([*NOBODY, sys.executable, "-m", "quotafs", *args, "sh", "-c",
                             f"touch {shared_dir}/cmd-ran"], capture_output=True, text=True,
                            timeout=120, cwd="/", check=False)
    assert result.returncode == ExitCode.NO_FUSE, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("quotafs: cannot open /dev/fuse"), lines
    assert sorted(os.listdir(shared_dir)) == []  # no CMD, no --setup, no sweep directory
