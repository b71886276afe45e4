"""The tmpfs reference: a size-limited tmpfs in a private mount namespace (and, for a
user without root, a private user namespace), a real kernel filesystem with real ENOSPC
and real mmap SIGBUS that needs no root.

SCAFFOLD (replaced by the rootless part of issue 12 before it lands): only the signature.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from quotafs.errors import ExitCode, QuotafsError
from quotafs.reference.base import Reference


@contextmanager
def open_tmpfs(size: int, workdir: str | None = None,
               keep: bool = False) -> Iterator[Reference]:
    """A tmpfs of `size` bytes, mounted in a private mount namespace; yields it and tears
    it down (the namespace ends) on any exit."""
    raise QuotafsError("the tmpfs reference is not built yet", ExitCode.LOOP)
    yield  # pragma: no cover
