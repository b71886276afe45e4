"""`quotafs status` on a --crash-sim mount: the stash's bytes (removed files kept for a
cut) are shown, human and --json, and go when the removals become durable."""

from __future__ import annotations

import json
import os

from tests.cli.test_cli_errors import quotafs
from tests.conftest import MountFactory


def test_status_shows_the_stashed_bytes_of_removed_files(
        mount_factory: MountFactory) -> None:
    m = mount_factory("8M", crash_sim=True)
    for i in range(3):  # written, fsynced, then removed without a directory fsync
        path = os.path.join(m.path, f"f{i}")
        with open(path, "wb") as f:
            f.write(b"x" * (1 << 20))
            os.fsync(f.fileno())
        os.unlink(path)
    status = json.loads(quotafs("status", m.path, "--json").stdout)
    assert status["crash_stash_bytes"] >= 3 << 20 and status["used"] == 0
    human = quotafs("status", m.path)
    assert human.returncode == 0, human.stderr
    line = f"crash stash:  3.0 MiB ({status['crash_stash_bytes']} bytes) of removed files"
    assert any(s.startswith(line) for s in human.stdout.splitlines()), human.stdout
    fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the removals are durable: the stash empties
    finally:
        os.close(fd)
    assert json.loads(quotafs("status", m.path, "--json").stdout)["crash_stash_bytes"] == 0
