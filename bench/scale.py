"""Scale: mount time and daemon memory with many existing files, memory after looking all
of them up, and the cost of one accounted 4 KiB append as the number of files grows."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.system import (
    FOREIGN,
    cpu_seconds,
    drop_caches,
    log,
    memory_kib,
    open_fds,
)
from bench.targets import Ext4, Target
from quotafs.errors import errno_name
from quotafs.interrupts import signals_deferred

FILES_PER_DIR = 1000
KiB = 1024


@dataclass
class ScaleRow:
    target: str
    files: int
    mount_cold_s: float | None = None  # caches dropped before the mount
    mount_warm_s: float | None = None  # mounted again right after
    rss_after_mount_mib: float | None = None
    lookup_s: float | None = None  # stat of every file through the mount
    rss_after_lookups_mib: float | None = None
    hwm_after_lookups_mib: float | None = None
    fds_after_lookups: int | None = None
    lookups_ok: int = 0  # of `files` stats through the mount, how many succeeded
    nofile_limit: int | None = None  # the daemon's RLIMIT_NOFILE (soft)
    append_us: float | None = None  # per 4 KiB append, files present, none looked up
    append_us_looked_up: float | None = None  # ... after every file was looked up
    append_cpu_us: float | None = None  # daemon CPU per append (looked-up case)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_tree(ext4: Ext4, count: int) -> str:
    """`count` files of 100 bytes (one block each) in directories of 1000, on ext4 directly."""
    top = ext4.subdir(f"scale-{count}")
    data = b"s" * 100
    for d in range((count + FILES_PER_DIR - 1) // FILES_PER_DIR):
        directory = os.path.join(top, f"d{d:04d}")
        os.makedirs(directory, exist_ok=True)
        for i in range(d * FILES_PER_DIR, min(count, (d + 1) * FILES_PER_DIR)):
            fd = os.open(os.path.join(directory, f"f{i:07d}"),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            os.close(fd)
    os.sync()
    return top


def _paths(top: str, count: int) -> list[str]:
    return [os.path.join(top, f"d{i // FILES_PER_DIR:04d}", f"f{i:07d}") for i in range(count)]


def _mib(kib: int) -> float:
    return kib / 1024


def append_cost(directory: str, pid: int | None, appends: int,
                batches: int) -> tuple[float, float | None]:
    """Median over batches of the time per 4 KiB O_APPEND write (µs), and daemon CPU/append."""
    path = os.path.join(directory, "bench-append.bin")
    block = b"a" * (4 * KiB)
    per_append: list[float] = []
    cpu_per_append: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    try:
        for _ in range(batches):
            c0 = cpu_seconds(pid) if pid is not None else 0.0
            t0 = time.perf_counter()
            for _ in range(appends):
                os.write(fd, block)
            per_append.append((time.perf_counter() - t0) / appends * 1e6)
            if pid is not None:
                cpu_per_append.append((cpu_seconds(pid) - c0) / appends * 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
    cpu = statistics.median(cpu_per_append) if cpu_per_append else None
    return statistics.median(per_append), cpu


def _quiet(timeout: float) -> None:
    if timeout > 0:
        FOREIGN.wait_quiet(0.15, 0.5, timeout)


def nofile_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                value = line.split()[3]
                return int(value) if value.isdigit() else None
    return None


def _append(row: ScaleRow, when: str, directory: str, pid: int, appends: int,
            batches: int) -> tuple[float | None, float | None]:
    try:
        return append_cost(directory, pid, appends, batches)
    except OSError as exc:
        row.notes.append(f"4K appends {when} failed: {errno_name(exc.errno)} "
                         f"({exc.strerror})")
        return None, None


def measure(make_target: Callable[[str], Target], top: str, count: int, appends: int,
            batches: int, quiet_timeout: float = 0.0) -> ScaleRow:
    """Mount twice (cold, warm) over a backing with `count` files and measure. A step that
    fails (a lookup answered EMFILE, say) is recorded in the row's notes, not raised."""
    target = make_target(top)
    row = ScaleRow(target.name, count)
    _quiet(quiet_timeout)
    drop_caches()
    try:
        with signals_deferred():
            target.start()
        row.mount_cold_s = target.mount_seconds
    finally:
        with signals_deferred(reraise=False):
            target.stop()
    _quiet(quiet_timeout)
    try:
        with signals_deferred():
            target.start()
        row.mount_warm_s = target.mount_seconds
        pid = target.pid
        assert pid is not None
        FOREIGN.own.add(pid)
        row.nofile_limit = nofile_limit(pid)
        row.rss_after_mount_mib = _mib(memory_kib(pid)["VmRSS"])
        _quiet(quiet_timeout)
        row.append_us, _ = _append(row, "before the lookups", target.path, pid, appends,
                                   batches)
        paths = _paths(target.path, count)
        _quiet(quiet_timeout)
        ok = 0
        first_error: tuple[int, OSError] | None = None
        t0 = time.perf_counter()
        for path in paths:
            try:
                os.stat(path)
                ok += 1
            except OSError as exc:
                if first_error is None:
                    first_error = (ok, exc)
        row.lookup_s = time.perf_counter() - t0
        row.lookups_ok = ok
        if first_error is not None:
            after, error = first_error
            row.notes.append(
                f"{count - ok:,} of {count:,} lookups failed, the first after {after:,} "
                f"successful ones: {errno_name(error.errno)} ({error.strerror}); "
                f"daemon RLIMIT_NOFILE {row.nofile_limit}")
        mem = memory_kib(pid)
        row.rss_after_lookups_mib = _mib(mem["VmRSS"])
        row.hwm_after_lookups_mib = _mib(mem["VmHWM"])
        row.fds_after_lookups = open_fds(pid)
        _quiet(quiet_timeout)
        row.append_us_looked_up, row.append_cpu_us = _append(
            row, "after the lookups", target.path, pid, appends, batches)
        row.notes.extend(target.notes)
    finally:
        with signals_deferred(reraise=False):
            target.stop()
    log(f"scale {target.name} {count:,} files: mount {row.mount_cold_s:.2f}s cold / "
        f"{row.mount_warm_s:.2f}s warm, {row.lookups_ok:,} lookups ok, RSS "
        f"{row.rss_after_lookups_mib:.0f} MiB after lookups, append "
        f"{row.append_us or 0:.0f}/{row.append_us_looked_up or 0:.0f} µs"
        + ("; " + "; ".join(row.notes) if row.notes else ""))
    return row
