"""What does the event log do when the disk fills up?

    pytest examples/sqlite_full        (quotafs installed: its pytest plugin is loaded)

The quota_mount fixture gives each test a fresh quotafs mount of the size the marker asks
for, here 1 MiB; quota_mount.set_limit() makes room while the application runs. The last
test runs the same program on a real loop-mounted ext4 as well (root only; skipped
elsewhere) and checks that the disk fills up at the same point.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator

import pytest
from eventlog import EventLog

from quotafs import Ext4Mount, QuotaMount
from quotafs.testing.plugin import QuotafsFactory

PAYLOAD = os.urandom(3000)  # incompressible: each event takes most of a 4 KiB page


@pytest.fixture
def log(quota_mount: QuotaMount) -> Iterator[EventLog]:
    log = EventLog(os.path.join(quota_mount.path, "events.db"))
    yield log
    log.close()


def fill(log: EventLog) -> tuple[int, sqlite3.OperationalError]:
    """Record events until the disk is full; return how many made it, and the error."""
    stored = 0
    while True:
        try:
            log.record("tick", PAYLOAD)
        except sqlite3.OperationalError as exc:
            return stored, exc
        stored += 1


@pytest.mark.quotafs(limit="1M")
def test_a_full_disk_loses_no_committed_event(quota_mount: QuotaMount, log: EventLog) -> None:
    stored, error = fill(log)

    assert str(error) == "database or disk is full"  # SQLITE_FULL: no corruption, no EIO
    assert quota_mount.usage().enospc_count > 0  # the quota said no, not something else
    assert log.integrity() == "ok"
    assert log.count() == stored  # every committed event, and not the one that failed
    assert stored > 200  # and most of the megabyte holds events


@pytest.mark.quotafs(limit="1M")
def test_it_keeps_working_once_there_is_room_again(quota_mount: QuotaMount,
                                                   log: EventLog) -> None:
    stored, _ = fill(log)
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        log.record("still full", PAYLOAD)  # it stays full, without harm

    quota_mount.set_limit("2M")  # the operator makes room; no remount, no restart
    for _ in range(100):
        log.record("after", PAYLOAD)

    assert log.count() == stored + 100
    assert log.integrity() == "ok"


@pytest.mark.quotafs(limit="1M")
def test_the_disk_fills_where_a_real_ext4_fills(ext4_loop: Ext4Mount,
                                                 quotafs_factory: QuotafsFactory) -> None:
    # The ext4 reference has 1 MiB free (the marker's limit); a little of that is never
    # writable (ext4's reserved clusters), so quotafs gets what ext4 can really store.
    on_quotafs = quotafs_factory(limit=ext4_loop.write_capacity_hint)
    counts = []
    for path in (ext4_loop.path, on_quotafs.path):
        log = EventLog(os.path.join(path, "events.db"))
        try:
            stored, error = fill(log)
            assert str(error) == "database or disk is full"
            assert log.integrity() == "ok"
            counts.append(stored)
        finally:
            log.close()
    on_ext4, on_fuse = counts
    assert abs(on_ext4 - on_fuse) <= 3, counts  # within a few events of ~250
