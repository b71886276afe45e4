"""quotafs: a FUSE passthrough that runs out of space where a real filesystem would."""

__version__ = "0.1.0"

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports them on first use
    import subprocess

    from quotafs.client.api import (
        Ext4Mount,
        QuotaMount,
        TmpfsMount,
        check_ext4_loop,
        check_fuse,
        check_tmpfs_reference,
        ext4_loop,
        format_event,
        mounted,
        mounted_with,
        open_quota_mount,
        tmpfs_reference,
    )
    from quotafs.compare.command import CommandReport, TargetRun, compare_command
    from quotafs.options import MountOptions
    from quotafs.sweeps.plan import Baseline, Point, PointResult, SweepReport
    from quotafs.sweeps.runner import SweepPlan, plan_sweep, run_point, sweep

# Where this package is imported from: child processes (writers, probes) get it on their path,
# so that they run this very copy even when the parent found it through sys.path tweaks.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env() -> dict[str, str]:
    """The environment for a `python -m quotafs...` child: PACKAGE_PARENT first on its
    PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


def reap(process: "subprocess.Popen[Any]", timeout: float) -> int:
    """Wait for the child `process` to exit, SIGKILL it after `timeout` seconds: never
    left behind, even if it hangs. Its exit status."""
    import subprocess  # (here: the daemon imports this package and never needs it)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()

__all__ = ["Baseline", "CommandReport", "Ext4Mount", "MountOptions", "Point",
           "PointResult", "QuotaMount", "SweepPlan", "SweepReport", "TargetRun",
           "TmpfsMount", "check_ext4_loop", "check_fuse", "check_tmpfs_reference",
           "compare_command", "ext4_loop", "format_event", "mounted", "mounted_with",
           "open_quota_mount", "plan_sweep", "run_point", "sweep", "tmpfs_reference"]


# The public names that do not come from quotafs.client.api, and their modules.
_ELSEWHERE: dict[str, str] = {
    "CommandReport": "quotafs.compare.command",
    "TargetRun": "quotafs.compare.command",
    "compare_command": "quotafs.compare.command",
    **dict.fromkeys(("Baseline", "Point", "PointResult", "SweepReport"), "quotafs.sweeps.plan"),
    **dict.fromkeys(("SweepPlan", "plan_sweep", "run_point", "sweep"), "quotafs.sweeps.runner"),
}


def __getattr__(name: str) -> Any:
    # Lazy: `python -m quotafs.compare.writers`, the probes and the daemon need not import
    # the Python API.
    if name in __all__:
        module = importlib.import_module(_ELSEWHERE.get(name, "quotafs.client.api"))
        return getattr(module, name)
    raise AttributeError(f"module 'quotafs' has no attribute {name!r}")
