"""`quotafs status` and `quotafs set`: read and change a live mount's limits."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from quotafs.client import control
from quotafs.errors import ExitCode, QuotafsError
from quotafs.options import SETTABLE, check_settings
from quotafs.protocol import Status
from quotafs.units import format_size


def register(sub: Any) -> None:
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
        f"peak used:    {size(status['peak_used'])}  ({status['allocating_writes']} "
        "allocating writes since the mount)",
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
        f"xattrs:       {'on' if status['xattrs'] else 'off (--xattrs off)'}",
        *([f"crash sim:    on, {status['crash_journal_entries']} changes not durable "
           f"({size(status['crash_journal_bytes'])} saved), {status['crashes']} cuts, "
           f"{status['durability_ops']} durability ops",
           f"crash stash:  {size(status.get('crash_stash_bytes', 0))} of removed files "
           "kept for a cut"] if status["crash_sim"] else []),
        *(["device:       DOWN since a --crash rule's cut: every request answers EIO "
           "(quotafs crash --revive)"] if status.get("crash_down") else []),
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


def _changes(args: argparse.Namespace) -> dict[str, int | str | None]:
    """The given --limit/--inodes/--reserve, checked as at mount ('none' lifts a limit)."""
    given = {name: getattr(args, name) for name in SETTABLE if getattr(args, name) is not None}
    if not given:
        raise QuotafsError("nothing to set: give --limit, --inodes and/or --reserve",
                           ExitCode.USAGE)
    return check_settings({name: None if value == "none" and name != "reserve" else value
                           for name, value in given.items()})


def cmd_set(args: argparse.Namespace) -> int:
    control.set_limits(args.mountpoint, **_changes(args))
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
