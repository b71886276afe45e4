"""The in-process layer: QuotaFS built by the daemon's own factory on a backing directory,
driven through its handlers (tests/operations/driver.py), never mounted."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from quotafs.daemon.serve import build_filesystem
from quotafs.mountconfig import MountConfig
from quotafs.units import parse_size
from tests.operations.driver import FsFactory, InProcessFS, SessionStandIns


def new_filesystem(backing: str, limit: int | str | None = None,
                   **options: Any) -> InProcessFS:
    """THE one place the in-process tests construct a QuotaFS: serve.build_filesystem, as
    the daemon does, with a configuration as the mount command would give it (options:
    MountConfig's fields; sizes as "1M" or bytes). Nothing is mounted."""
    if isinstance(limit, str):
        limit = parse_size(limit)
    config = MountConfig(mountpoint=os.path.join(backing, "..", "not-mounted"),
                         backing=backing, limit=limit, **options)
    return InProcessFS(build_filesystem(config), backing)


@pytest.fixture(autouse=True)
def session_stand_ins(monkeypatch: pytest.MonkeyPatch) -> SessionStandIns:
    """Stand-ins for the pyfuse3 *session* functions QuotaFS calls, which need a live FUSE
    session (readdir_reply, get_sup_groups, invalidate_entry_async).

    Patched on the pyfuse3 module, which is where QuotaFS looks them up today; when the
    daemon grows its seam for these, this fixture is the one place to switch to it."""
    stand_ins = SessionStandIns()
    monkeypatch.setattr(pyfuse3, "readdir_reply", stand_ins.readdir_reply)
    monkeypatch.setattr(pyfuse3, "get_sup_groups", stand_ins.get_sup_groups)
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async", stand_ins.invalidate_entry_async)
    # The layer must run without /dev/fuse: starting a session here is a bug of the test.
    for entry in ("init", "main"):
        monkeypatch.setattr(pyfuse3, entry, SessionStandIns.no_session)
    return stand_ins


@pytest.fixture(autouse=True)
def _no_daemon_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """As the mount tests' log check: a handler that logged a warning or an error (an
    "unexpected error ...; answering EIO", "accounting drifted") fails the test."""
    caplog.set_level(logging.WARNING, logger="quotafs")
    yield
    records = [r for r in caplog.get_records("call")
               if r.name.startswith("quotafs") and r.levelno >= logging.WARNING]
    if records:
        pytest.fail("QuotaFS logged:\n" + "\n".join(r.getMessage() for r in records),
                    pytrace=False)


@pytest.fixture
def make_fs(tmp_path: Path) -> Iterator[FsFactory]:
    """make(limit=None, backing=None, **MountConfig options) -> an InProcessFS on a fresh
    backing directory (or the one given), closed at the end of the test."""
    made: list[InProcessFS] = []
    numbers = itertools.count(1)

    def make(limit: int | str | None = None, backing: str | None = None,
             **options: Any) -> InProcessFS:
        if backing is None:
            backing = str(tmp_path / f"backing-{next(numbers)}")
            os.mkdir(backing)
        fs = new_filesystem(backing, limit, **options)
        made.append(fs)
        return fs

    yield make
    for fs in made:  # a sync fixture's teardown runs outside the test's trio loop
        if not fs.closed:
            trio.run(fs.close)


@pytest.fixture
def fs(make_fs: FsFactory) -> InProcessFS:
    """A 1 MiB quota in block accounting (4 KiB blocks), as the `qmount` mount fixture."""
    return make_fs("1M")
