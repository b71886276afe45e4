"""The flags of a power cut (model, torn, keep fraction), defined once for `crash`,
`sweep --crash-points` and `fault add --crash`, and the one check of a --keep-fraction.

Not in mountopts: these are not mount options (no MountOptions field); they say how one
cut is made, whoever makes it."""

from __future__ import annotations

import argparse
import math

from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.protocol import CRASH_MODELS

MODEL_HELP = ("what survives the cut: posix (only what was fsynced, and directory entries whose "
              "directory was fsynced; default) or ext4 (data=ordered: a journal commit — "
              "any fsyncdir, or the fsync of a file with a size or name change — makes "
              "every earlier namespace change durable)")
TORN_HELP = ("each file's last unsynced write survives as a seeded, random prefix cut at "
             "a 512-byte sector boundary")
KEEP_FRACTION_HELP = ("a seeded share P (0 to 1) of each file's unsynced writes survives, "
                      "oldest first, as writeback would have left it (default 0)")


def add_crash_model_options(parser: argparse.ArgumentParser, *, prefix: str = "",
                            needs: str | None = None, model_default: str | None = None,
                            keep_fraction: bool = True,
                            keep_fraction_default: str | None = None) -> None:
    """--{prefix}model, --{prefix}torn and (with keep_fraction) --{prefix}keep-fraction;
    dests as argparse derives them (crash_model with prefix "crash-"). `needs`: the flag
    they only go with, said first in each help ("with --crash: ...")."""
    lead = f"with {needs}: " if needs else ""
    parser.add_argument(f"--{prefix}model", choices=CRASH_MODELS, default=model_default,
                        help=lead + MODEL_HELP)
    parser.add_argument(f"--{prefix}torn", action="store_true", help=lead + TORN_HELP)
    if keep_fraction:
        parser.add_argument(f"--{prefix}keep-fraction", metavar="P",
                            default=keep_fraction_default, help=lead + KEEP_FRACTION_HELP)


def keep_fraction(text: str) -> float:
    """--keep-fraction's text as a number from 0 to 1, or a one-line usage error. (A fault
    rule's crash_keep_fraction is checked in model/faults.py: rule files have it too.)"""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise QuotafsError(f"--keep-fraction must be a number from 0 to 1, got "
                           f"{printable(text)!r}", ExitCode.USAGE)
    return value
