"""Python API: mount a quotafs for the duration of a `with` block.

    with quotafs.mounted(limit="10M") as m:
        run_my_program(m.path)
        assert m.usage()["used"] <= 10 * 2**20

The daemon runs in a child process (never in the caller's process: blocking syscalls on
the mount would wait on the loop that must answer them) and dies with the caller, even
if the caller is killed, so a crashed test run leaves no mount behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from quotafs import mounting
from quotafs.mountconfig import MountConfig
from quotafs.size import parse_size

SizeLike = int | str | None


def _bytes(value: SizeLike) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return parse_size(value)


@dataclass
class QuotaMount:
    """A live mount: its path and the controls of its daemon."""

    path: str
    backing: str
    pid: int
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def status(self) -> dict[str, Any]:
        return mounting.read_status(self.path)

    def usage(self) -> dict[str, Any]:
        """used / reserved / free / limit / inodes, in bytes and counts."""
        s = self.status()
        keys = ("limit", "used", "reserved", "free", "inode_limit", "inodes_used",
                "enospc_count")
        return {k: s[k] for k in keys}

    def set_limit(self, limit: SizeLike) -> None:
        mounting.set_limits(self.path, limit=_bytes(limit))

    def set_inode_limit(self, inodes: int | None) -> None:
        mounting.set_limits(self.path, inodes=inodes)

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        """Quota ENOSPCs and fired faults (seq > after), oldest first."""
        from quotafs.faultcmd import read_events

        return read_events(self.path, after)

    def add_fault(self, op: str | list[str], **trigger_and_effect: Any) -> str:
        """Add a fault rule, e.g. add_fault("fsync", errno="EIO", times=1); returns its id.

        Keywords as `quotafs fault add`: path, errno, delay, short_write, corrupt_read,
        probability, seed, after_bytes, nth, times.
        """
        from quotafs.faultcmd import add_rule
        from quotafs.faults import spec_from_args

        result = add_rule(self.path, spec_from_args(op, **trigger_and_effect))
        return str(result["id"])

    def faults(self) -> list[dict[str, Any]]:
        """The rules with their counters (matched, fired, retired, ...)."""
        from quotafs.faultcmd import list_rules

        rules: list[dict[str, Any]] = list_rules(self.path)["rules"]
        return rules

    def clear_faults(self, rule_id: str | None = None) -> int:
        from quotafs.faultcmd import clear_rules

        return clear_rules(self.path, rule_id)

    def is_alive(self) -> bool:
        return self._process is None or self._process.poll() is None


def _fault_settings(options: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Seed and validated rules from rules=[dict, ...] and/or rules_file=PATH."""
    from quotafs.cli import fault_settings
    from quotafs.faults import RuleSpec

    seed, rules = fault_settings(options.pop("rules_file", None), options.get("seed"))
    for rule in options.get("rules") or []:
        rules.append(RuleSpec.from_dict(rule).to_dict())
    return seed, rules


def _start(limit: SizeLike, backing: str | None, mountpoint: str | None,
           options: dict[str, Any]) -> tuple[QuotaMount, bool]:
    own_mountpoint = mountpoint is None
    path = tempfile.mkdtemp(prefix="quotafs-mnt-") if mountpoint is None else mountpoint
    try:
        path = mounting.check_mountpoint(path)
        mounting.check_fuse()
        backing_dir, private = mounting.prepare_backing(backing)
        if "block_size" in options:
            options["block_size"] = _bytes(options["block_size"])
        options["seed"], options["rules"] = _fault_settings(options)
        config = MountConfig(mountpoint=path, backing=backing_dir, limit=_bytes(limit),
                             private_backing=private, die_with_parent=True, **options)
        daemon = mounting.start_daemon(config, detach=False)
    except BaseException:
        if own_mountpoint:
            os.rmdir(path)
        raise
    return QuotaMount(path, backing_dir, daemon.pid, daemon.process), own_mountpoint


def _stop(mount: QuotaMount, own_mountpoint: bool) -> None:
    """Unmount and reap the daemon; escalate to a lazy unmount and SIGKILL if needed."""
    process = mount._process
    try:
        if mounting.find_mount(mount.path) is not None:
            try:
                mounting.unmount(mount.path)
            except Exception:
                mounting.unmount(mount.path, lazy=True)
        if process is not None:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        if mounting.find_mount(mount.path) is not None:
            with contextlib.suppress(Exception):
                mounting.unmount(mount.path, lazy=True)
        if own_mountpoint:
            with contextlib.suppress(OSError):
                os.rmdir(mount.path)


@contextlib.contextmanager
def mounted(limit: SizeLike = None, backing: str | None = None,
            mountpoint: str | None = None, **options: Any) -> Iterator[QuotaMount]:
    """Mount quotafs (a fresh temp mount point unless given) and unmount on exit.

    Options are those of `quotafs mount`, as keywords: inodes, accounting, block_size,
    mmap_sigbus, allow_other, no_cache, keep_backing, fsname, debug, seed, rules (a list
    of rule dicts as in a rules file), rules_file.
    """
    mount, own = _start(limit, backing, mountpoint, dict(options))
    try:
        yield mount
    finally:
        _stop(mount, own)
        if backing is None and not options.get("keep_backing"):
            shutil.rmtree(mount.backing, ignore_errors=True)


@contextlib.asynccontextmanager
async def open_quota_mount(limit: SizeLike = None, backing: str | None = None,
                           mountpoint: str | None = None,
                           **options: Any) -> AsyncIterator[QuotaMount]:
    """Trio flavour of `mounted`: start and stop run in a worker thread."""
    import trio

    mount, own = await trio.to_thread.run_sync(
        lambda: _start(limit, backing, mountpoint, dict(options)))
    try:
        yield mount
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: _stop(mount, own))
        if backing is None and not options.get("keep_backing"):
            shutil.rmtree(mount.backing, ignore_errors=True)
