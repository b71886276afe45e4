"""`quotafs crash MOUNT`: a power cut of a --crash-sim mount (docs/crash.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from quotafs.cli.crashopts import add_crash_model_options, keep_fraction
from quotafs.client import control
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.options import check_count
from quotafs.protocol import CrashReport


def register(sub: Any) -> None:
    p = sub.add_parser("crash", help="cut the power of a --crash-sim mount: lose what was "
                                     "never made durable")
    p.add_argument("mountpoint")
    add_crash_model_options(p, model_default="posix", keep_fraction_default="0")
    p.add_argument("--seed", default=None,
                   help="seed of the cut's random choices (default: the mount's seed "
                        "stream; printed)")
    p.add_argument("--revive", action="store_true",
                   help="no cut: bring back a device a --crash fault rule's cut left down "
                        "(every request answers EIO until then)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_crash)


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
    fraction = keep_fraction(args.keep_fraction)
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
