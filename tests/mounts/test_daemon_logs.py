"""The suite's check of its daemons' logs (tests/conftest.py): what it reads, what it finds."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from quotafs.client.api import mounted
from quotafs.options import MountOptions
from tests.conftest import DaemonLogs, MountFactory


def test_records_are_warnings_and_up_with_their_tracebacks(tmp_path: Path) -> None:
    logs = DaemonLogs(tmp_path)
    config = logs.assign(MountOptions(mountpoint="/m", backing="/b", limit=None))
    assert config.log_file is not None and Path(config.log_file).parent == tmp_path
    assert logs.new_records() == []  # nothing logged yet: no file
    with open(config.log_file, "w") as f:
        f.write("2026-01-01 00:00:00,000 quotafs[7] DEBUG lookup\n"
                "2026-01-01 00:00:00,001 quotafs[7] ERROR unexpected error in read; "
                "answering EIO\nTraceback (most recent call last):\nValueError: x\n"
                "2026-01-01 00:00:00,002 quotafs[7] INFO fine\n")
    [record] = logs.new_records()
    assert record.endswith("ERROR unexpected error in read; answering EIO\n"
                           "Traceback (most recent call last):\nValueError: x")
    assert logs.new_records() == []  # each record is reported once
    with open(config.log_file, "a") as f:
        f.write("2026-01-01 00:00:01,000 quotafs[7] WARNING later\n")
    assert [r.rsplit(" ", 2)[1:] for r in logs.new_records()] == [["WARNING", "later"]]


def test_a_given_log_file_is_left_alone(tmp_path: Path) -> None:
    config = MountOptions(mountpoint="/m", backing="/b", limit=None, log_file="/x.log")
    assert DaemonLogs(tmp_path).assign(config) is config


def test_every_daemon_of_a_test_logs_to_a_file_the_check_reads(
        mount_factory: MountFactory, daemon_logs: DaemonLogs) -> None:
    m = mount_factory("1M")
    fds = f"/proc/{m.pid}/fd"
    [log] = [Path(target) for target in (os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds))
             if target.startswith(str(daemon_logs.directory))]
    assert log in daemon_logs.checked


def test_an_eio_from_the_backing_is_logged(mount_factory: MountFactory,
                                           daemon_logs: DaemonLogs) -> None:
    # A sick backing disk, made of a quotafs whose reads fail with EIO (a fault rule, which
    # that daemon does not log: it is what the rule is for).
    sick = mount_factory("4M")
    os.mkdir(os.path.join(sick.path, "data"))
    with open(os.path.join(sick.path, "data", "f"), "wb") as f:
        f.write(b"x" * 4096)
    sick.add_fault("read", errno="EIO", path="/data/f")
    m = mount_factory("4M", backing=os.path.join(sick.path, "data"))
    with pytest.raises(OSError) as exc, open(os.path.join(m.path, "f"), "rb") as f:
        f.read()
    assert exc.value.errno == errno.EIO
    records = daemon_logs.new_records()  # read here: the teardown check sees none of them
    assert any(" WARNING read: " in r and r.endswith("; answering EIO") for r in records), (
        records)


def test_mounted_takes_a_log_file(tmp_path: Path) -> None:
    """`quotafs.mounted(log_file=...)` as documented: the daemon logs there."""
    log = tmp_path / "daemon.log"
    with mounted("1M", log_file=str(log)) as m:
        assert m.is_alive()
        assert log.exists()
