"""The handlers reach the FUSE session only through daemon/kernel.py (the seam an
in-process test layer replaces); serve.py, which owns the session's life, is the other
module that may call pyfuse3's session functions."""

from __future__ import annotations

import re
from pathlib import Path

import quotafs.daemon

SESSION_CALLS = ("readdir_reply", "invalidate_inode", "invalidate_entry",
                 "invalidate_entry_async", "notify_store", "get_sup_groups", "init", "main",
                 "terminate", "close")
ALLOWED = {"kernel.py", "serve.py"}


def test_only_the_kernel_seam_calls_the_fuse_session() -> None:
    pattern = re.compile(rf"\bpyfuse3\.({'|'.join(SESSION_CALLS)})\b")
    daemon = Path(quotafs.daemon.__file__).parent
    offenders = {path.name: sorted(set(pattern.findall(path.read_text())))
                 for path in daemon.glob("*.py") if path.name not in ALLOWED}
    assert {name: calls for name, calls in offenders.items() if calls} == {}
