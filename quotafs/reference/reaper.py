"""The loop-ext4 reference's teardown when its owner is killed outright (SIGKILL, the OOM
killer), which no `finally` survives: `python -m quotafs.reference.reaper TMP`.

loopext4.Reaper.start(tmp) runs it in a session of its own (a terminal's Ctrl-C does not
reach it), with cwd /, reading a pipe only its owner writes (the descriptor is not
inherited by the owner's exec'd children; one forked without exec holds it too, so the
word counts, not EOF). The owner tears down itself and then says so (`done()`): the
reaper exits without touching anything. If the pipe closes without that word, the owner
is gone, and the reaper does the same teardown (loopext4's: unmount, lazily if busy;
detach every device `losetup -j IMAGE` lists; remove TMP). Tearing down twice is
harmless: it looks at what exists.
"""

from __future__ import annotations

import os
import signal
import sys

# Imported before waiting, not after the owner is gone (memory may be short then).
from quotafs.reference.loopext4 import REAPER_DONE, teardown_dir


def _wait_for_owner() -> bool:
    """Block until the owner says it is done (True) or is gone (False)."""
    said = b""
    while not said.startswith(REAPER_DONE):
        chunk = os.read(0, len(REAPER_DONE) - len(said))
        if not chunk:
            return False
        said += chunk
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m quotafs.reference.reaper TMP", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner's Ctrl-C is the owner's
    if _wait_for_owner():
        return 0
    return 1 if teardown_dir(argv[0]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
