"""Does a saved setting survive a power cut right after the program says "saved"?

    pytest examples/crash_config       (quotafs installed: its pytest plugin is loaded)

Each test mounts quotafs with crash simulation on (the marker's crash_sim=True), writes
version 1 of app.conf durably (settings.py setup), runs a writer until it prints "saved",
cuts the power (QuotaMount.crash) and checks that app.conf is version 2:

- careless_save.py (rename without fsync) is caught under both models: under `ext4` the
  log's fsync committed the rename but not the data, so app.conf comes back empty;
  under `posix` nothing synced the directory, so the rename is undone and app.conf is
  version 1 again. Either way, "saved" was a lie.
- careful_save.py (fsync the file, rename, fsync the directory) passes under both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quotafs import QuotaMount

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MODELS = ["ext4", "posix"]


def run(mount: QuotaMount, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, *argv], cwd=mount.path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})


def save_then_cut(mount: QuotaMount, writer: str, model: str) -> str:
    """setup, the writer up to "saved", a power cut: what the check says afterwards."""
    assert run(mount, str(HERE / "settings.py"), "setup").returncode == 0
    saved = run(mount, str(HERE / writer))
    assert saved.returncode == 0 and saved.stdout == "saved\n", saved.stderr
    mount.crash(model=model)
    check = run(mount, str(HERE / "settings.py"), "check", "2")
    return "ok" if check.returncode == 0 else check.stderr.strip()


@pytest.mark.quotafs(limit="10M", crash_sim=True)
@pytest.mark.parametrize("model", MODELS)
def test_the_careless_writer_loses_what_it_saved(quota_mount: QuotaMount, model: str) -> None:
    found = save_then_cut(quota_mount, "careless_save.py", model)
    assert found == {"ext4": "app.conf is 0 bytes of neither version, not version 2",
                     "posix": "app.conf is version 1, not version 2"}[model]


@pytest.mark.quotafs(limit="10M", crash_sim=True)
@pytest.mark.parametrize("model", MODELS)
def test_the_careful_writer_keeps_what_it_saved(quota_mount: QuotaMount, model: str) -> None:
    assert save_then_cut(quota_mount, "careful_save.py", model) == "ok"
    # The log was created after the directory's fsync: under ext4 its fsync committed its
    # name too; under posix its name was never made durable, and it is gone.
    log = Path(quota_mount.path, "app.log")
    assert (log.read_text() if log.exists() else None) == {
        "ext4": "saved version 2\n", "posix": None}[model]


@pytest.mark.quotafs(limit="10M", crash_sim=True)
def test_without_a_cut_both_writers_save(quota_mount: QuotaMount) -> None:
    for writer in ("careless_save.py", "careful_save.py"):
        assert run(quota_mount, str(HERE / "settings.py"), "setup").returncode == 0
        assert run(quota_mount, str(HERE / writer)).stdout == "saved\n"
        assert run(quota_mount, str(HERE / "settings.py"), "check", "2").returncode == 0
