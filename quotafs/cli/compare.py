"""`quotafs compare`: its arguments, progress on stderr and the printed report; the
comparison itself is quotafs.compare.runner.run_compare."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

from quotafs.compare.writers import KINDS, passwd_entry
from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import sigterm_as_interrupt
from quotafs.units import format_size, parse_size


def _parse_writers(text: str) -> list[str]:
    writers = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in writers if w not in KINDS]
    if unknown or not writers:
        raise QuotafsError(f"unknown writer {', '.join(unknown) or text!r}: choose from "
                           f"{', '.join(KINDS)}", ExitCode.USAGE)
    return writers


def register(sub: Any) -> None:
    p = sub.add_parser("compare", help="loop-ext4 vs quotafs: the same writers on both "
                                       "(root)",
                       description="Build a real ext4 on a loop device with the given free "
                                   "space, mount quotafs with the same room, run the same "
                                   "writers on both and report side by side.")
    p.add_argument("--limit", default="120M", help="free space of both (default 120M)")
    p.add_argument("--writers", default=",".join(KINDS),
                   help=f"comma-separated, from {', '.join(KINDS)} (default: all)")
    p.add_argument("--file-size", default="1G", help="size of each writer's file (1G)")
    p.add_argument("--chunk", default="1M", help="bytes per write / per mmap store (1M)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless quotafs's ext4-faithful mode matched ext4")
    p.add_argument("--keep", action="store_true",
                   help="leave the image, loop device, mount and files for inspection")
    p.add_argument("--workdir", help="where the image and backing dirs go (default /var/tmp)")
    p.add_argument("--as-user", metavar="USER",
                   help="run the writers as USER (name or uid; default root): they then stop "
                        "where ext4 stops for users other than root, short of its reserve")
    p.set_defaults(func=cmd_compare)


def _progress_printer(enabled: bool) -> Callable[[str], None]:
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        if not enabled:
            return
        if tty:
            sys.stderr.write("\r\033[K" + line)
            if not line.endswith(("B", "starting")):
                sys.stderr.write("\n")
        elif not line.rstrip().endswith(("B", "iB")):  # no byte counters in a log file
            print(line, file=sys.stderr)
        sys.stderr.flush()

    return show


def _check_reachable(user: str, workdir: str) -> None:
    """The writers' user must be able to walk down to the mount points in `workdir`."""
    entry = passwd_entry(user)
    groups = {entry.pw_gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}
    path = os.path.realpath(workdir)
    while True:
        try:
            mode = os.stat(path)
        except OSError:
            return  # a missing workdir is reported where it is used
        bit = (stat.S_IXUSR if mode.st_uid == entry.pw_uid else
               stat.S_IXGRP if mode.st_gid in groups else stat.S_IXOTH)
        if entry.pw_uid != 0 and not mode.st_mode & bit:
            raise QuotafsError(f"--as-user {user}: {user} cannot enter {path}, so it could "
                               "not reach the mounts: choose another --workdir",
                               ExitCode.USAGE)
        if path == "/":
            return
        path = os.path.dirname(path)


def cmd_compare(args: argparse.Namespace) -> int:
    # Here, not at the top: the runner brings the API and the ext4 reference (~45 ms),
    # which every other command (status, set, ...) would pay for at start-up.
    from quotafs.compare import runner

    plan = runner.Plan(limit=parse_size(args.limit), writers=_parse_writers(args.writers),
                file_size=parse_size(args.file_size), chunk=parse_size(args.chunk),
                keep=args.keep, workdir=args.workdir, as_user=args.as_user)
    if plan.as_user is not None:  # an unknown or locked-out user: before anything is built
        _check_reachable(plan.as_user, plan.workdir or "/var/tmp")
    if plan.chunk <= 0 or plan.file_size <= 0 or plan.chunk > plan.file_size:
        raise QuotafsError("--chunk and --file-size must be positive, chunk <= file size",
                           ExitCode.USAGE)
    if plan.workdir is not None and not os.path.isdir(plan.workdir):
        raise QuotafsError(f"--workdir {plan.workdir}: no such directory", ExitCode.USAGE)
    with sigterm_as_interrupt():
        report = runner.run_compare(plan, _progress_printer(enabled=True))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        ext4 = report["ext4"]
        print(f"\nquotafs compare — limit {format_size(plan.limit)}, file "
              f"{format_size(plan.file_size)}, chunk {format_size(plan.chunk)}, "
              f"Linux {report['kernel']}")
        print(f"ext4: image {ext4['image_size']:,} B, block {ext4['block_size']}, free "
              f"{ext4['free_bytes']:,} B (root; others {ext4['avail_bytes']:,} B), kept back "
              f"by ext4 {ext4['reserved_clusters_bytes']:,} B, reserved for root "
              f"{ext4['root_reserve_bytes']:,} B; quotafs limit {report['quotafs_limit']:,} B,"
              f" reserve {report['quotafs_reserve']:,} B; writers run as "
              f"{report['writers_user']}\n")
        print(runner.table([runner.Record(**r) for r in report["records"]]))
        print()
        print("\n".join(runner.verdict_lines([runner.Verdict(**v) for v in report["verdicts"]])))
        if report["kept"]:
            print("\nkept for inspection; remove with:\n  " + "\n  ".join(report["kept"]))
    if args.check and not report["matched"]:
        return int(ExitCode.FAILURE)
    return 0
