"""The loop-ext4 reference's teardown when its owner is killed outright (SIGKILL, the OOM
killer), which no `finally` survives.

`Reaper.start(tmp)` runs `python -m quotafs.reference.reaper TMP` in a session of its own
(a terminal's Ctrl-C does not reach it), reading a pipe whose only writer is its owner
(the descriptor is not inherited by the owner's other children, except one forked
without exec, which the reaper then waits for too). The owner tears down
itself and then says so (`done()`): the reaper exits without touching anything. If the
pipe closes without that word, the owner is gone, and the reaper does the same teardown
(loopext4's: unmount, lazily if busy; detach every device `losetup -j IMAGE` lists;
remove TMP). Tearing down twice is harmless: it looks at what exists.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from quotafs import PACKAGE_PARENT
from quotafs.interrupts import signals_deferred

_DONE = b"done"


class Reaper:
    """The owner's end: a started reaper and the pipe to it."""

    def __init__(self, proc: subprocess.Popen[bytes], fd: int) -> None:
        self._proc = proc
        self._fd = fd

    @classmethod
    def start(cls, tmp: str) -> Reaper | None:
        """A reaper for the reference in `tmp`; None if it could not be started (the
        teardown then only has the owner's own `finally`, as before)."""
        read, write = os.pipe()  # both non-inheritable: no other child holds the writer
        # This quotafs, wherever it was imported from (its cwd is / below).
        paths = [PACKAGE_PARENT,
                 *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "quotafs.reference.reaper", os.path.abspath(tmp)],
                stdin=read,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                start_new_session=True)  # cwd /: it keeps no directory (or mount) busy
        except OSError:
            os.close(write)
            return None
        finally:
            os.close(read)
        return cls(proc, write)

    def done(self) -> None:
        """The owner tore down (or keeps the reference on purpose): the reaper exits."""
        with signals_deferred():  # a Ctrl-C here must not leave it to tear down
            with contextlib.suppress(OSError):  # a reaper that died early: nothing to tell
                os.write(self._fd, _DONE)
            os.close(self._fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
            return
        self._proc.kill()  # never left behind, even if it hangs
        self._proc.wait()


def _wait_for_owner() -> bool:
    """Block until the owner says it is done (True) or is gone (False). Not until EOF
    after the word: a child the owner forked without exec holds the pipe too."""
    said = b""
    while not said.startswith(_DONE):
        chunk = os.read(0, len(_DONE) - len(said))
        if not chunk:
            return False
        said += chunk
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m quotafs.reference.reaper TMP", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner's Ctrl-C is the owner's
    # Imported now, not after the owner is gone (memory may be short then).
    from quotafs.reference.loopext4 import teardown_dir

    if _wait_for_owner():
        return 0
    return 1 if teardown_dir(argv[0]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
