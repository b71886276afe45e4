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
from quotafs.options import MountOptions
from tests.operations.driver import FsFactory, InProcessFS, SessionStandIns


def new_filesystem(backing: str, limit: int | str | None = None,
                   kernel: SessionStandIns | None = None, **options: Any) -> InProcessFS:
    """THE one place the in-process tests construct a QuotaFS: serve.build_filesystem, as
    the daemon does, with MountOptions as the mount command would give them (options:
    their names and values, sizes as "1M" or bytes), and `kernel` standing in for the FUSE
    session. Nothing is mounted."""
    config = MountOptions.from_values({**options, "limit": limit, "backing": backing})
    placed = config.resolve().placed(os.path.join(backing, "..", "not-mounted"), backing,
                                     private_backing=False)
    return InProcessFS(build_filesystem(placed, kernel or SessionStandIns()), backing)


@pytest.fixture(autouse=True)
def session_stand_ins(monkeypatch: pytest.MonkeyPatch) -> SessionStandIns:
    """The FUSE session's stand-in that `make_fs` builds QuotaFS with; and, as the layer
    must run without /dev/fuse, pyfuse3.init and pyfuse3.main made to fail."""
    for entry in ("init", "main"):
        monkeypatch.setattr(pyfuse3, entry, SessionStandIns.no_session)
    return SessionStandIns()


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
def make_fs(tmp_path: Path, session_stand_ins: SessionStandIns) -> Iterator[FsFactory]:
    """make(limit=None, backing=None, **MountOptions values) -> an InProcessFS on a fresh
    backing directory (or the one given), closed at the end of the test."""
    made: list[InProcessFS] = []
    numbers = itertools.count(1)

    def make(limit: int | str | None = None, backing: str | None = None,
             **options: Any) -> InProcessFS:
        if backing is None:
            backing = str(tmp_path / f"backing-{next(numbers)}")
            os.mkdir(backing)
        fs = new_filesystem(backing, limit, session_stand_ins, **options)
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
