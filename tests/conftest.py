"""Shared fixtures: real mounts served by a daemon in a child process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from quotafs.api import QuotaMount, mounted


def fuse_unusable_reason() -> str | None:
    """Why FUSE cannot be used here, or None if it can (checked by really opening it)."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    return None


needs_fuse = pytest.mark.skipif(fuse_unusable_reason() is not None,
                                reason=fuse_unusable_reason() or "")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MountFactory = Callable[..., QuotaMount]


@pytest.fixture
def mount_factory(tmp_path: Any) -> Iterator[MountFactory]:
    """make(limit=..., **options) -> a live mount, unmounted at the end of the test."""
    if (reason := fuse_unusable_reason()) is not None:
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        def make(limit: int | str | None = None, **options: Any) -> QuotaMount:
            return stack.enter_context(mounted(limit=limit, **options))

        yield make


@pytest.fixture
def qmount(mount_factory: MountFactory) -> QuotaMount:
    """A 1 MiB quota mount with a private backing directory."""
    return mount_factory("1M")


# -- lines for the terminal summary (e.g. how many differential examples ran) -----------

_SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture
def terminal_summary(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """add(line): print `line` in pytest's terminal summary, after the test results."""
    return request.config.stash.setdefault(_SUMMARY, []).append


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("quotafs")
        for line in lines:
            terminalreporter.write_line(line)
