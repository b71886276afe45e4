"""The `quotafs` command line: one function per subcommand, errors as one line + exit code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from quotafs import __version__, options, statedir
from quotafs.cli import fault, run
from quotafs.cli.mountargs import add_mount_options, mount_settings
from quotafs.client import control, lifecycle
from quotafs.compare import runner
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.mountconfig import MountConfig
from quotafs.protocol import Status
from quotafs.units import format_size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the usage is one `--help` away.
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {printable(message)}\n")


def _config(settings: dict[str, Any], mountpoint: str) -> MountConfig:
    fields = options.config_fields(settings)  # --like-ext4 measured, --reserve resolved
    lifecycle.check_fuse()
    backing, private = lifecycle.prepare_backing(settings["backing"])
    return MountConfig(mountpoint=mountpoint, backing=backing, private_backing=private,
                       **fields)


# -- subcommands --------------------------------------------------------------------------

def cmd_mount(args: argparse.Namespace) -> int:
    settings = mount_settings(args)  # every option checked before anything is touched
    mountpoint = lifecycle.check_mountpoint(args.mountpoint)
    config = _config(settings, mountpoint)
    if args.fg:
        from quotafs.daemon import serve  # here: pyfuse3 and trio only for --fg
        lifecycle.check_overlap(config.mountpoint, config.backing)
        return serve.run(config)
    started = lifecycle.start_daemon(config, detach=True)
    if not args.quiet:
        limit = "no limit" if config.limit is None else format_size(config.limit)
        print(f"quotafs mounted on {mountpoint} ({limit}, backing {config.backing}, "
              f"pid {started.pid}, seed {config.seed})", file=sys.stderr)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = lifecycle.resolve(args.mountpoint)
    info = lifecycle.find_mount(mountpoint)
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
    lifecycle.unmount(mountpoint, lazy=args.lazy or not alive)
    if alive and args.lazy:
        # Detached while busy: the daemon serves the remaining users, then exits.
        print(f"quotafs: {mountpoint} detached; the daemon exits when its last user leaves",
              file=sys.stderr)
    elif alive and pid is not None and not lifecycle.wait_for_exit(pid, 30):
        print(f"quotafs: warning: daemon {pid} still running after unmount", file=sys.stderr)
    statedir.forget_record(mountpoint)
    statedir.drop_log_if_empty(mountpoint)  # a dead daemon could not: kept if it says anything
    if not alive:
        where = f"; its backing directory is kept at {record['backing']}" if record else ""
        print(f"quotafs: cleaned up {mountpoint}: the daemon had died{where}", file=sys.stderr)
    return 0


def _status_lines(status: Status) -> list[str]:
    def size(value: int | None) -> str:
        return "none" if value is None else f"{format_size(value)} ({value} bytes)"

    inode_limit = status["inode_limit"]
    reserved = ([f"reserved:     {size(status['reserved'])}  (ext4-faithful mmap pages)"]
                if status["mmap_sigbus"] else [])  # nothing is ever reserved without it
    return [
        f"mount point:  {status['mountpoint']}",
        f"limit:        {size(status['limit'])}",
        f"used:         {size(status['used'])}",
        *reserved,
        f"free:         {_free(status, size)}"
        + (f"  (for root; others: {size(status['available'])})"
           if status.get("root_reserve") else ""),
        f"reserve:      {size(status.get('root_reserve', 0))}  (for root only; as ext4's "
        "reserved blocks)"
        + (f"; kept back from everyone {size(status['kept_back'])}"
           if status.get("kept_back") else ""),
        f"inodes:       {status['inodes_used']} used"
        + ("" if inode_limit is None else f" of {inode_limit}"),
        f"accounting:   {status['accounting']}, block size {status['block_size']}",
        f"mmap sigbus:  {'on' if status['mmap_sigbus'] else 'off'}",
        f"ENOSPC:       {status['enospc_count']} answered",
        f"backing:      {status['backing']}"
        + (" (private)" if status["private_backing"] else ""),
        f"daemon pid:   {status['pid']}",
        f"options:      {','.join(status['mount_options'])}",
        f"faults:       {status['fault_rules_active']} active of {status['fault_rules']} "
        f"rules, {status['faults_fired']} fired, seed {status['seed']}",
    ]


def _free(status: Status, size: Callable[[int], str] = format_size) -> str:
    # Without a limit the ledger's "free" is its 2^63-1 sentinel minus used, not a fact.
    return "unlimited" if status["limit"] is None else size(status["free"])


def cmd_status(args: argparse.Namespace) -> int:
    status = control.read_status(args.mountpoint)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(_status_lines(status)))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    changes: dict[str, int | str | None] = {}
    if args.limit is not None:
        changes["limit"] = None if args.limit == "none" else options.check_size("limit",
                                                                                args.limit)
    if args.inodes is not None:
        changes["inodes"] = None if args.inodes == "none" else options.check_count(
            "inodes", args.inodes)
    if args.reserve is not None:
        changes["reserve"] = options.check_reserve(args.reserve)  # "5%": of the daemon's limit
    if not changes:
        raise QuotafsError("nothing to set: give --limit, --inodes and/or --reserve",
                           ExitCode.USAGE)
    control.set_limits(args.mountpoint, **changes)
    status = control.read_status(args.mountpoint)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        limit = "none" if status["limit"] is None else format_size(status["limit"])
        reserve = status.get("root_reserve", 0)
        print(f"limit {limit}, used {format_size(status['used'])}, free {_free(status)}"
              + (f", reserve {format_size(reserve)} (others: "
                 f"{format_size(status['available'])} free)" if reserve else ""))
    return 0


# -- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quotafs", description=(
        "A FUSE passthrough filesystem with a byte quota that runs out of space where a "
        "real filesystem would."))
    parser.add_argument("--version", action="version", version=f"quotafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    p = sub.add_parser("status", help="limit, usage, inodes, options of a mount")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("set", help="change the limit while mounted")
    p.add_argument("mountpoint")
    p.add_argument("--limit", help="new quota (a size, or 'none')")
    p.add_argument("--inodes", help="new inode limit (a count, or 'none')")
    p.add_argument("--reserve", metavar="PERCENT|SIZE",
                   help="new root reserve: 5%% of the limit (after this set) or a size; 0 "
                        "for none")
    p.add_argument("--json", action="store_true", help="print the new status as JSON")
    p.set_defaults(func=cmd_set)

    for register in (run.register, fault.register, runner.register):  # in their modules
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    lifecycle.ISOLATE_PROBES = True  # a command never hangs on a sick mount
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`quotafs status M | head -3`): stop quietly, as coreutils
        # do when SIGPIPE kills them, and keep Python from failing again on its final flush.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.BROKEN_PIPE)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler above
        return result
    except QuotafsError as exc:
        # One line, whatever the message quotes (a mount point named "a\nb", say).
        print(f"quotafs: {printable(str(exc))}", file=sys.stderr)
        return int(exc.code)
    except argparse.ArgumentTypeError as exc:
        print(f"quotafs: {printable(str(exc))}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except KeyboardInterrupt:
        print("quotafs: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
