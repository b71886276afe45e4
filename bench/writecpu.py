"""Daemon CPU per random 4 KiB write + fsync over FUSE, A/B between source trees.

    python bench/writecpu.py [--writes N] [--rounds R] [--tree NAME=DIR ...] [--cpu N|none]

Mounts, all on one tmpfs backing (below /dev/shm): for each tree, quotafs run from that
tree (PYTHONPATH) with xattrs and with `--xattrs off`; pyfuse3's example passthrough
(downloaded as bench/run.py does; it stores the data as quotafs does, with no
bookkeeping and no xattrs); and the do-nothing ceilings (bench/nullfs.py with and without
--xattr). Each round visits every mount in turn (the order rotates): a fresh file, N
pwrite+fsync of 4 KiB at distinct random blocks of a 64 MiB hole ("holes"), then the same
N again ("overwrite"); the daemon's CPU time over each pass (its process CPU clock, to
the ns), per write. Prints, per mount and pass, the least and
the median of the rounds in µs, one JSON line per mount (stdout); progress on stderr.
Every mount is unmounted and every directory removed on any exit.

By default this script, its writer and every daemon run on one CPU (the last): on a
VM, a wake-up that crosses CPUs costs tens of µs of the daemon's time, and whether it
crosses changes from one pass to the next, which spread one mount's rounds by 20-30 µs
per write. On one CPU they spread by 1-3 µs. `--cpu none` leaves the scheduler free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.system import BenchError, cpu_seconds, is_mounted, pin_to_cpu
from bench.targets import ChildDaemonTarget, fetch_passthrough_example, quotafs_command
from quotafs.interrupts import sigterm_as_interrupt

REPO = Path(__file__).resolve().parent.parent
BLOCK = 4096
FILE_BLOCKS = 16_384  # a 64 MiB file


@dataclass
class Mount:
    name: str
    path: str
    pid: int = 0
    samples: dict[str, list[float]] = field(default_factory=lambda: {"holes": [], "overwrite": []})


def _quotafs(tree: str, *args: str) -> str:
    cmd, env, cwd = quotafs_command(tree)
    return subprocess.run([*cmd, *args], env=env, cwd=cwd, check=True,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          start_new_session=True, timeout=120).stdout


@contextlib.contextmanager
def quotafs_mount(name: str, tree: str, base: str, extra: list[str]) -> Iterator[Mount]:
    backing, path = os.path.join(base, name + ".backing"), os.path.join(base, name)
    os.mkdir(backing)
    os.mkdir(path)
    try:
        _quotafs(tree, "mount", "-q", "--backing", backing, *extra, path)
        mount = Mount(name, path, int(json.loads(_quotafs(tree, "status", "--json", path))["pid"]))
        yield mount
    finally:
        if is_mounted(path):
            _quotafs(tree, "umount", path)


@contextlib.contextmanager
def child_mount(name: str, base: str, argv: list[str]) -> Iterator[Mount]:
    """A daemon that mounts at base/NAME, its last argument, and serves in the foreground
    (bench/run.py's ChildDaemonTarget; its output in base/NAME.log)."""
    path = os.path.join(base, name)
    os.mkdir(path)
    target = ChildDaemonTarget(name, name, [sys.executable, *argv, path], path,
                               os.path.join(base, name + ".log"))
    target.start()
    try:
        assert target.pid is not None
        yield Mount(name, path, target.pid)
    finally:
        target.stop()


def one_pass(mount: Mount, fd: int, offsets: list[int], buf: bytes) -> float:
    before = cpu_seconds(mount.pid)
    for off in offsets:
        os.pwrite(fd, buf, off)
        os.fsync(fd)
    return (cpu_seconds(mount.pid) - before) / len(offsets) * 1e6


def run_round(mounts: list[Mount], number: int, writes: int) -> None:
    buf = os.urandom(BLOCK)
    offsets = [b * BLOCK for b in random.sample(range(FILE_BLOCKS), writes)]
    order = mounts[number % len(mounts):] + mounts[:number % len(mounts)]
    for mount in order:
        fd = os.open(os.path.join(mount.path, f"round-{number}"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mount.samples["holes"].append(one_pass(mount, fd, offsets, buf))
            mount.samples["overwrite"].append(one_pass(mount, fd, offsets, buf))
        finally:
            os.close(fd)
        os.unlink(os.path.join(mount.path, f"round-{number}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=8192, help="writes per pass")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (least, median)")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="a quotafs source tree to run (default: this one)")
    parser.add_argument("--cpu", default="last",
                        help="the CPU to run on, 'last' (default) or 'none' (not pinned)")
    parser.add_argument("--cache-dir", default=str(REPO / "bench" / ".cache"),
                        help="where pyfuse3's example is kept (bench/run.py's cache)")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"quotafs": str(REPO)}
    if args.cpu != "none":  # inherited by the daemons, started below
        cpu = str(max(os.sched_getaffinity(0))) if args.cpu == "last" else args.cpu
        try:
            if not cpu.isdigit():
                raise ValueError("not 'last', 'none' or a CPU number")
            pin_to_cpu(int(cpu))
        except ValueError as exc:
            parser.error(f"--cpu {args.cpu}: {exc}")
    example = fetch_passthrough_example(Path(args.cache_dir))
    base = tempfile.mkdtemp(prefix="writecpu-", dir="/dev/shm")
    try:
        with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            mounts = []
            for name, tree in trees.items():
                mounts.append(stack.enter_context(quotafs_mount(name, tree, base, [])))
                if "--xattrs" not in _quotafs(tree, "mount", "--help"):
                    print(f"{name}-noxattr: skipped (this tree has no --xattrs)",
                          file=sys.stderr)
                    continue
                mounts.append(stack.enter_context(
                    quotafs_mount(name + "-noxattr", tree, base, ["--xattrs", "off"])))
            os.mkdir(os.path.join(base, "example.backing"))
            mounts.append(stack.enter_context(child_mount("example", base, [
                str(REPO / "bench" / "pyfuse3_example.py"), str(example),
                os.path.join(base, "example.backing")])))
            nullfs = str(REPO / "bench" / "nullfs.py")
            mounts.append(stack.enter_context(child_mount("null-xattr", base,
                                                          [nullfs, "--xattr"])))
            mounts.append(stack.enter_context(child_mount("null", base, [nullfs])))
            for number in range(args.rounds):
                print(f"round {number + 1}/{args.rounds}", file=sys.stderr, flush=True)
                run_round(mounts, number, args.writes)
            for mount in mounts:
                print(json.dumps({"mount": mount.name, **{
                    kind: [round(min(v), 1), round(statistics.median(v), 1)]
                    for kind, v in mount.samples.items()}}))
    except subprocess.CalledProcessError as exc:
        sys.exit(f"writecpu: {' '.join(exc.cmd)}: {(exc.stderr or '').strip()}")
    except BenchError as exc:
        sys.exit(f"writecpu: {exc}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
