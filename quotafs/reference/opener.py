"""Open the reference of `compare -- CMD` by its kind: "ext4" (root) or "tmpfs"."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from quotafs.errors import ExitCode, QuotafsError
from quotafs.reference.base import KINDS, Reference
from quotafs.reference.ext4ref import Ext4Reference
from quotafs.reference.loopext4 import open_ext4_loop
from quotafs.reference.tmpfs import open_tmpfs


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise QuotafsError(f"unknown reference {kind!r}: choose from {', '.join(KINDS)}",
                           ExitCode.USAGE)
    return kind


@contextmanager
def open_reference(kind: str, room: int, workdir: str | None = None,
                   keep: bool = False) -> Iterator[Reference]:
    """A mounted reference of `kind` with `room` bytes free, torn down on any exit (kept
    with `keep`, as open_ext4_loop and open_tmpfs do)."""
    if check_kind(kind) == "ext4":
        with open_ext4_loop(room, workdir=workdir, keep=keep) as loop:
            yield Ext4Reference(loop)
    else:
        with open_tmpfs(room, workdir=workdir, keep=keep) as tmpfs:
            yield tmpfs
