"""`quotafs crash MOUNT`: a power cut of a --crash-sim mount (docs/crash.md)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from quotafs.client import control
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.options import check_count
from quotafs.protocol import CRASH_MODELS, CrashReport


def register(sub: Any) -> None:
    p = sub.add_parser("crash", help="cut the power of a --crash-sim mount: lose what was "
                                     "never made durable")
    p.add_argument("mountpoint")
    p.add_argument("--model", choices=CRASH_MODELS, default="posix",
                   help="what survives: posix (only what was fsynced, and directory "
                        "entries whose directory was fsynced; default) or ext4 "
                        "(data=ordered: a journal commit — any fsyncdir, or the fsync of a "
                        "file with a size or name change — makes every earlier namespace "
                        "change durable)")
    p.add_argument("--torn", action="store_true",
                   help="each file's last unsynced write survives as a random "
                        "512-byte-sector prefix")
    p.add_argument("--keep-fraction", metavar="P", default="0",
                   help="a random share P (0 to 1) of each file's unsynced writes "
                        "survives, oldest first, as writeback would have left it "
                        "(default 0)")
    p.add_argument("--seed", default=None,
                   help="seed of the cut's random choices (default: the mount's seed "
                        "stream; printed)")
    p.add_argument("--revive", action="store_true",
                   help="no cut: bring back a device a --crash fault rule's cut left down "
                        "(every request answers EIO until then)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_crash)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise QuotafsError(f"--keep-fraction must be a number from 0 to 1, got "
                           f"{printable(text)!r}", ExitCode.USAGE)
    return value


def report_lines(report: CrashReport) -> list[str]:
    """The report as a person reads it: one line per item, then a summary."""
    lines = [f"{item.kind:8} {printable(item.path)}"
             + (f"  ({item.bytes} bytes)" if item.kind in ("data", "size", "torn", "kept")
                else "") for item in report.lost]
    options = "".join([" torn" if report.torn else "",
                       f" keep-fraction {report.keep_fraction:g}"
                       if report.keep_fraction else ""])
    lines.append(f"crash #{report.crashes} ({report.model}{options}, seed {report.seed}): "
                 f"lost {report.lost_bytes} bytes of unsynced writes and "
                 f"{report.lost_names} namespace changes")
    return lines


def cmd_crash(args: argparse.Namespace) -> int:
    if args.revive:
        if args.torn or args.seed is not None or args.keep_fraction != "0":
            raise QuotafsError("--revive cuts nothing: it takes no --torn, --keep-fraction "
                               "or --seed", ExitCode.USAGE)
        return _revive(args)
    fraction = _fraction(args.keep_fraction)
    seed = check_count("--seed", args.seed, 2**64 - 1)
    report = control.crash(args.mountpoint, args.model, args.torn, fraction, seed)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(report_lines(report)))
    return 0


def _revive(args: argparse.Namespace) -> int:
    revived = control.revive(args.mountpoint)
    if args.json:
        print(json.dumps({"revived": revived}, sort_keys=True))
    else:
        print(f"{printable(args.mountpoint)}: revived" if revived
              else f"{printable(args.mountpoint)}: was not down")
    return 0
