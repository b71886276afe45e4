"""`quotafs crash MOUNT`: the report, --json, and bad input as one line with its exit
code (docs/exit-codes.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quotafs.cli.main import main
from quotafs.errors import ExitCode
from tests.cli.test_cli_errors import assert_one_line_error, quotafs
from tests.conftest import MountFactory


def test_crash_prints_what_was_lost(mount_factory: MountFactory) -> None:
    m = mount_factory("4M", crash_sim=True)
    path = os.path.join(m.path, "f")
    with open(path, "wb") as f:
        f.write(b"d" * 100)
        f.flush()
        os.fsync(f.fileno())  # ext4: also commits the name
    with open(path, "ab") as f:
        f.write(b"u" * 1000)
    result = quotafs("crash", m.path, "--model", "ext4", "--seed", "9")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "data     /f  (1000 bytes)",
        "size     /f  (1000 bytes)",
        "crash #1 (ext4, seed 9): lost 1000 bytes of unsynced writes and 0 namespace "
        "changes"]
    with open(path, "rb") as f:
        assert f.read() == b"d" * 100


def test_crash_json(mount_factory: MountFactory) -> None:
    m = mount_factory("4M", crash_sim=True)
    with open(os.path.join(m.path, "new"), "wb") as f:
        f.write(b"n" * 10)
    result = quotafs("crash", m.path, "--json", "--seed", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["model"], report["seed"], report["lost_names"], report["crashes"]) == (
        "posix", 1, 1, 1)
    assert {"path": "/new", "kind": "created", "bytes": 0} in report["lost"]
    assert not os.path.exists(os.path.join(m.path, "new"))


def test_not_a_quotafs_mount(tmp_path: Path) -> None:
    assert_one_line_error(quotafs("crash", str(tmp_path)), ExitCode.NOT_QUOTAFS,
                          "is not a quotafs mount")


def test_a_mount_without_crash_sim(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    assert_one_line_error(quotafs("crash", m.path), ExitCode.USAGE,
                          "not mounted with --crash-sim")


@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "half", "nan"])
def test_bad_keep_fraction(mount_factory: MountFactory, fraction: str) -> None:
    m = mount_factory("1M", crash_sim=True)
    assert_one_line_error(quotafs("crash", m.path, "--keep-fraction", fraction),
                          ExitCode.USAGE, "--keep-fraction must be a number from 0 to 1")
    assert m.status().crashes == 0


@pytest.mark.parametrize("command", [["crash"], ["sweep"], ["fault", "add"]])
def test_help_says_the_ext4_model_commits_at_a_journal_commit(
        command: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping: it would split at hyphens
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # a long flag's help on its next line
    assert ("ext4 (data=ordered: a journal commit — any fsyncdir, or the fsync of a file "
            "with a size or name change — makes every earlier namespace change durable)"
            in text), text


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "zfs"], "invalid choice: 'zfs'"),
    (["--seed", "x"], "--seed must be a whole number"),
])
def test_bad_model_and_seed(mount_factory: MountFactory, args: list[str], words: str) -> None:
    m = mount_factory("1M", crash_sim=True)
    assert_one_line_error(quotafs("crash", m.path, *args), ExitCode.USAGE, words)


def test_status_shows_the_crash_sim(mount_factory: MountFactory) -> None:
    m = mount_factory("4M", crash_sim=True)
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(b"x")
    result = quotafs("status", m.path)
    assert result.returncode == 0, result.stderr
    assert ("crash sim:    on, 2 changes not durable (0 B (0 bytes) saved), 0 cuts, "
            "0 durability ops") in result.stdout.splitlines()
    plain = quotafs("status", mount_factory("1M").path)
    assert "crash sim" not in plain.stdout
