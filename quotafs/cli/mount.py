"""`quotafs mount` and `quotafs umount`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from quotafs import statedir
from quotafs.cli.mountopts import add_mount_options, mount_options
from quotafs.client import control, lifecycle
from quotafs.errors import ExitCode, QuotafsError
from quotafs.mountinfo import find_mount
from quotafs.units import format_size


def register(sub: Any) -> None:
    p = sub.add_parser("mount", help="mount a quota-enforcing passthrough")
    p.add_argument("mountpoint")
    add_mount_options(p)
    p.add_argument("--fg", action="store_true", help="stay in the foreground")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", aliases=["unmount"],
                       help="unmount, also a mount whose daemon died")
    p.add_argument("mountpoint")
    p.add_argument("--lazy", action="store_true",
                   help="detach even if busy (umount -l); the daemon exits when it is free")
    p.set_defaults(func=cmd_umount)


def cmd_mount(args: argparse.Namespace) -> int:
    options = mount_options(args)  # every option checked before anything is touched
    mountpoint = lifecycle.check_mountpoint(args.mountpoint)
    resolved = options.resolve()  # --like-ext4 measured, --reserve in bytes
    lifecycle.check_fuse()
    backing, private = lifecycle.prepare_backing(options.backing)
    config = resolved.placed(mountpoint, backing, private)
    if args.fg:
        # The daemon's module imports pyfuse3: only `mount --fg` runs it in this process.
        from quotafs.daemon import serve

        lifecycle.check_overlap(config.mountpoint, backing)
        return serve.run(config)
    started = lifecycle.start_daemon(config, detach=True)
    if not args.quiet:
        limit = "no limit" if config.limit is None else format_size(config.limit)
        print(f"quotafs mounted on {mountpoint} ({limit}, backing {backing}, "
              f"pid {started.pid}, seed {config.seed})", file=sys.stderr)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = lifecycle.resolve(args.mountpoint)
    info = find_mount(mountpoint)
    if info is None:
        raise QuotafsError(f"{args.mountpoint} is not mounted", ExitCode.NOT_QUOTAFS)
    if not info.is_quotafs:
        raise QuotafsError(f"{args.mountpoint} is not a quotafs mount ({info.fstype})",
                           ExitCode.NOT_QUOTAFS)
    lifecycle.check_may_unmount(info)
    record = statedir.read_record(mountpoint)
    pid: int | None = None
    try:
        pid = control.read_status(mountpoint).pid
        alive = True
    except lifecycle.NoAnswer:
        if not args.lazy:
            raise
        alive = True  # stopped or stuck: detach it; it may still have users
    except QuotafsError:
        alive = False  # "Transport endpoint is not connected": the daemon died
    if pid is None and record is not None:
        pid = int(record["pid"])
    if args.lazy or not alive:
        lifecycle.unmount(mountpoint, lazy=True)
    else:
        lifecycle.unmount_patiently(mountpoint)
    if alive and args.lazy:
        # Detached while busy: the daemon serves the remaining users, then exits.
        print(f"quotafs: {mountpoint} detached; the daemon exits when its last user leaves",
              file=sys.stderr)
    elif alive and pid is not None and not lifecycle.wait_for_exit(pid, 30):
        print(f"quotafs: warning: daemon {pid} still running after unmount", file=sys.stderr)
    statedir.forget_record(mountpoint)
    if not alive and info.owner_uid is not None:  # a daemon that died left its socket
        control.remove_stale_socket(mountpoint, info.owner_uid)
    statedir.drop_log_if_empty(mountpoint)  # a dead daemon could not: kept if it says anything
    if not alive:
        where = f"; its backing directory is kept at {record['backing']}" if record else ""
        print(f"quotafs: cleaned up {mountpoint}: the daemon had died{where}", file=sys.stderr)
    return 0
