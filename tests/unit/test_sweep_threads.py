"""run_points' threads on Ctrl-C: every run has cleaned up before the interrupt goes on.

The runs are stand-ins (pure thread logic; the real runs are in tests/cli/test_sweep.py):
each waits for the cancel event, then takes a while to "unmount", as a real run does.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, cast

import pytest

from quotafs.sweeps.runner import SweepPlan, run_points

CLEANUP_S = 0.6  # how long a cancelled run takes to unmount and remove its copy


class _SlowToStop:
    """A plan whose runs block until cancelled, then clean up for CLEANUP_S."""

    def __init__(self, count: int) -> None:
        self.points: list[Any] = [None] * count
        self.started = threading.Event()  # every run has started (so each must clean up)
        self.cleaned: list[int] = []
        self._running = 0
        self._lock = threading.Lock()

    def run_point(self, index: int, cancel: threading.Event | None = None) -> Any:
        assert cancel is not None
        with self._lock:
            self._running += 1
            if self._running == len(self.points):
                self.started.set()
        cancel.wait()
        time.sleep(CLEANUP_S)
        self.cleaned.append(index)
        raise KeyboardInterrupt("cancelled")


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_waits_for_every_run_to_clean_up(jobs: int) -> None:
    plan = _SlowToStop(jobs)
    # Ctrl-C while the main thread waits for the workers (as a terminal sends it).
    timer = threading.Timer(0, lambda: (plan.started.wait(),
                                        os.kill(os.getpid(), signal.SIGINT)))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_points(cast(SweepPlan, plan), jobs)
        # Python 3.11's Thread.join, interrupted, takes a live thread for ended: a join
        # that trusted it would let the sweep's directory go while a run still unmounts.
        assert sorted(plan.cleaned) == list(range(1, jobs + 1))
    finally:
        timer.join()
