"""Single levers of quotafs's speed, each measured before and after on one quotafs mount.

    sudo python bench/levers.py readahead [--rounds 5] [--size 512M] [--json FILE]
    sudo python bench/levers.py reread    [--rounds 5] [--size 512M] [--json FILE]
    python bench/levers.py pwrite         [--calls 200000] [--json FILE]

readahead  cold sequential read through the daemon with the mount's bdi read_ahead_kb
           at the kernel's 128 (before) and at quotafs's 1024 (after), alternating.
reread     reading a file a second time with `--no-cache` (before: the pages are dropped
           at open) and with the default keep_cache (after).
pwrite     lseek + write (the pyfuse3 example) against pwrite (quotafs), 4 KiB calls on
           a tmpfs file, without FUSE: what the syscall saves per request.

The FUSE levers mount a tmpfs of their own as the backing store, so the backing
filesystem never touches a disk; everything is unmounted in `finally`. The whole bench
(bench/run.py) measures the levers together: `quotafs` against `quotafs-nocache`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.system import BenchError, cpu_seconds, drop_caches, run, tool, unmount_retrying
from bench.targets import QuotafsTarget
from bench.workloads import read_all, write_file
from quotafs.mountinfo import find_mount

MiB = 1024 * 1024


@contextlib.contextmanager
def quotafs_on_tmpfs(size: int, *extra: str) -> Iterator[QuotafsTarget]:
    """A quotafs mount (limit: the tmpfs size) over a backing tmpfs of our own."""
    if os.geteuid() != 0:
        raise BenchError("needs root: it mounts a tmpfs")
    with contextlib.ExitStack() as stack:
        root = tempfile.mkdtemp(prefix="quotafs-levers-")
        stack.callback(os.rmdir, root)
        backing, mnt = os.path.join(root, "backing"), os.path.join(root, "mnt")
        for path in (backing, mnt):
            os.mkdir(path)
            stack.callback(os.rmdir, path)
        run([tool("mount"), "-t", "tmpfs", "-o", f"size={2 * size + 64 * MiB}",
             "quotafs-levers", backing])
        stack.callback(unmount_retrying, backing)
        target = QuotafsTarget("quotafs", "", backing, mnt, 2 * size, extra=list(extra))
        stack.callback(target.stop)
        target.start()
        yield target


def _timed_read(path: str, pid: int) -> tuple[float, float]:
    """(MiB/s, daemon µs per MiB) of reading the whole file in 1 MiB calls."""
    cpu0, begin = cpu_seconds(pid), time.perf_counter()
    nbytes = read_all(path)
    seconds, cpu = time.perf_counter() - begin, cpu_seconds(pid) - cpu0
    return nbytes / MiB / seconds, cpu * 1e6 / (nbytes / MiB)


def _set_read_ahead(mountpoint: str, kib: int) -> None:
    info = find_mount(mountpoint)
    if info is None:
        raise BenchError(f"{mountpoint} is not mounted")
    Path(f"/sys/class/bdi/{info.device}/read_ahead_kb").write_text(str(kib))


def lever_readahead(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, float]]] = {"128": [], "1024": []}
    with quotafs_on_tmpfs(args.size) as q:
        assert q.pid is not None
        path = os.path.join(q.path, "big")
        write_file(path, args.size)
        for _ in range(args.rounds):
            for kib in rows:
                _set_read_ahead(q.path, int(kib))
                drop_caches()
                rows[kib].append(_timed_read(path, q.pid))
    return _report("cold read, read_ahead_kb", "128", "1024", rows)


def lever_reread(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, float]]] = {"--no-cache": [], "keep_cache": []}
    for label, extra in (("--no-cache", ("--no-cache",)), ("keep_cache", ())):
        with quotafs_on_tmpfs(args.size, *extra) as q:
            assert q.pid is not None
            path = os.path.join(q.path, "big")
            write_file(path, args.size)
            for _ in range(args.rounds):
                _timed_read(path, q.pid)  # the first read after writing always reaches us
                rows[label].append(_timed_read(path, q.pid))
    return _report("second read of a file", "--no-cache", "keep_cache", rows)


def lever_pwrite(args: argparse.Namespace) -> dict[str, Any]:
    buf = b"x" * 4096
    span = 64 * MiB // 4096
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        fd = os.open(os.path.join(tmp, "f"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            def lseek_write(i: int) -> None:
                os.lseek(fd, (i % span) * 4096, os.SEEK_SET)
                os.write(fd, buf)

            def pwrite(i: int) -> None:
                os.pwrite(fd, buf, (i % span) * 4096)

            calls: dict[str, Callable[[int], None]] = {"lseek+write": lseek_write,
                                                       "pwrite": pwrite}
            rows: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    begin = time.perf_counter()
                    for i in range(args.calls):
                        call(i)
                    seconds = time.perf_counter() - begin
                    rows[name].append((args.calls / seconds, seconds * 1e6 / args.calls))
        finally:
            os.close(fd)
    return _report("4 KiB writes, per call", "lseek+write", "pwrite", rows,
                   units=("calls/s", "µs/call"))


def _report(title: str, before: str, after: str, rows: dict[str, list[tuple[float, float]]],
            units: tuple[str, str] = ("MiB/s", "daemon µs/MiB")) -> dict[str, Any]:
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
           for k, v in rows.items()}
    print(f"{title}: median of {len(rows[before])} rounds")
    for name in (before, after):
        speed, cost = med[name]
        print(f"  {name:<12} {speed:>10,.0f} {units[0]}   {cost:>8,.1f} {units[1]}")
    ratio = med[after][0] / med[before][0]
    print(f"  after / before: {ratio:.2f}x")
    return {"lever": title, "before": before, "after": after, "units": list(units),
            "rounds": {k: [list(r) for r in v] for k, v in rows.items()},
            "median": {k: list(v) for k, v in med.items()}, "ratio": ratio}


LEVERS = {"readahead": lever_readahead, "reread": lever_reread, "pwrite": lever_pwrite}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/levers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("lever", choices=list(LEVERS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=lambda s: int(s.rstrip("Mm")) * MiB, default=512 * MiB,
                   help="file size in MiB, e.g. 512M (default)")
    p.add_argument("--calls", type=int, default=200_000, help="pwrite: calls per round")
    p.add_argument("--json", help="write the result as JSON to this file")
    args = p.parse_args(argv)
    try:
        result = LEVERS[args.lever](args)
    except (BenchError, OSError) as exc:
        print(f"bench/levers.py: {exc}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
