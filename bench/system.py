"""Small system helpers for the benchmark: commands, caches, daemon CPU and memory, machine."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from quotafs import unmounting
from quotafs.client import lifecycle
from quotafs.errors import QuotafsError
from quotafs.mountinfo import find_mount
from quotafs.reference.tools import find_tool

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A setup step failed; the message is one line for the user."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    """The absolute path of a system tool, also from sbin directories not in PATH (the ext4
    reference's lookup)."""
    try:
        return find_tool(name)
    except QuotafsError as exc:
        raise BenchError(str(exc)) from None


def run(cmd: Sequence[str], timeout: float = 120.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; raise BenchError with its last line on failure."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, check=False)
    if check and result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        last = lines[-1] if lines else f"exit status {result.returncode}"
        raise BenchError(f"{' '.join(cmd)}: {last}")
    return result


def drop_caches() -> None:
    """Write back dirty data, then drop page cache, dentries and inodes (root only).

    On a FUSE mount dropping dentries and inodes sends FORGETs, so the daemon's tables
    shrink and the next access is a cold lookup for native and FUSE alike.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: caches stay warm; the report says which mode ran


def pin_to_cpu(cpu: int) -> None:
    """Run this process, and everything it starts from now on, on CPU `cpu` only; a
    ValueError that says which CPUs it may use otherwise."""
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        raise ValueError(f"not a CPU this process may run on "
                         f"({','.join(map(str, sorted(allowed)))})")
    os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int) -> float:
    """The CPU time of a process (all its threads, ended ones too), in seconds, to the
    nanosecond: the kernel's CPU clock of that process, where /proc/PID/stat counts 10 ms
    ticks (1.2 µs per write over 8,192 writes). Raises OSError once the process is gone."""
    # clock_getcpuclockid(3) of glibc: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) in the
    # kernel's posix-cpu-timers; Python has no wrapper for it.
    return time.clock_gettime((~pid << 3) | 2)


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime + stime + cutime + cstime in seconds) of every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile: its CPU moves to its parent's cutime/cstime
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        table[int(entry)] = (int(fields[1]), ticks / CLOCK_TICKS)
    return table


class ForeignCpu:
    """CPU used by processes that are not ours, to tell a quiet measurement from a noisy
    one on a shared machine. Ours: this process, the daemons, and their descendants.
    Kernel threads (children of kthreadd, pid 2) are left out: loop devices and writeback
    work for the workload itself. A process that exits between two snapshots still counts:
    its time moves to its parent's cutime/cstime when it is reaped."""

    def __init__(self) -> None:
        self.own: set[int] = {os.getpid()}

    def _foreign_total(self) -> float:
        table = _proc_table()
        mine: dict[int, bool] = {}

        def is_mine(pid: int) -> bool:
            chain = []
            while pid not in mine:
                if pid in self.own:
                    mine[pid] = True
                    break
                if pid in (0, 2) or pid not in table:
                    mine[pid] = pid == 2  # kernel threads count as "not foreign"
                    break
                chain.append(pid)
                pid = table[pid][0]
            verdict = mine[pid]
            for p in chain:
                mine[p] = verdict
            return verdict

        return sum(cpu for pid, (_, cpu) in table.items() if not is_mine(pid))

    def snapshot(self) -> float:
        return self._foreign_total()

    def wait_quiet(self, threshold: float, window: float, timeout: float) -> float:
        """Wait until foreign processes use less than `threshold` cores over one `window`,
        at most `timeout` seconds; return the last foreign load seen (cores)."""
        deadline = time.monotonic() + timeout
        while True:
            before = self.snapshot()
            time.sleep(window)
            load = (self.snapshot() - before) / window
            if load < threshold or time.monotonic() >= deadline:
                return load


FOREIGN = ForeignCpu()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def is_mounted(path: str) -> bool:
    """Whether `path` is a mount point, from /proc/self/mountinfo (never stats the mount)."""
    return find_mount(path) is not None


def unmount_retrying(path: str, attempts: int = 20) -> None:
    """Unmount, retrying while busy (about 5 s), then lazily: whatever happens, `path` is
    unmounted; BenchError if even the lazy unmount fails. (quotafs's own retry loop: the
    bench unmounts the way quotafs does.)"""
    try:
        unmounting.unmount_retrying(path, lifecycle.unmount, tries=attempts)
    except QuotafsError as exc:
        raise BenchError(str(exc)) from None


@dataclass
class Machine:
    nproc: int
    kernel: str
    cpu_model: str
    mem_total_mib: int
    python: str
    pyfuse3: str
    fio: str | None
    fuse: str | None
    load_avg: str

    def line(self) -> str:
        return (f"{self.nproc} CPU ({self.cpu_model}), {self.mem_total_mib} MiB RAM, "
                f"Linux {self.kernel}, Python {self.python}, pyfuse3 {self.pyfuse3}, "
                f"{self.fio or 'no fio'}, {self.fuse or 'libfuse ?'}")


def machine_info() -> Machine:
    from importlib.metadata import PackageNotFoundError, version

    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    try:
        pyfuse3_version = version("pyfuse3")
    except PackageNotFoundError:
        pyfuse3_version = "?"
    fio = None
    if shutil.which("fio"):
        fio = run(["fio", "--version"], check=False).stdout.strip() or None
    fuse = None
    if shutil.which("fusermount3"):
        out = run(["fusermount3", "-V"], check=False)
        fuse = (out.stdout.strip() or out.stderr.strip()) or None
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return Machine(nproc=os.cpu_count() or 0, kernel=platform.release(), cpu_model=model,
                   mem_total_mib=mem, python=platform.python_version(),
                   pyfuse3=pyfuse3_version, fio=fio, fuse=fuse, load_avg=load)
