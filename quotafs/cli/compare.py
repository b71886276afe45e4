"""`quotafs compare`: its arguments, progress on stderr and the printed report; the
comparison itself is quotafs.compare.runner.run_compare."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from quotafs.cli.mountopts import add_mount_options
from quotafs.compare.program import (
    DEFAULT_TARGETS,
    DEFAULT_TIMEOUT,
    NOT_FOR_TARGETS,
    check_reachable,
)
from quotafs.compare.writers import KINDS
from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import sigterm_as_interrupt
from quotafs.options import OPTION_NAMES
from quotafs.reference.base import KINDS as REFERENCE_KINDS
from quotafs.units import format_size, parse_size


def _parse_writers(text: str) -> list[str]:
    writers = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in writers if w not in KINDS]
    if unknown or not writers:
        raise QuotafsError(f"unknown writer {', '.join(unknown) or text!r}: choose from "
                           f"{', '.join(KINDS)}", ExitCode.USAGE)
    return writers


WRITERS_ONLY = {"writers": "--writers", "file_size": "--file-size", "chunk": "--chunk",
                "keep": "--keep"}
_DEFAULTS: dict[str, Any] = {}  # every flag's default, to tell which were given
COMMAND_ONLY = {"targets": "--targets", "setup": "--setup", "timeout": "--timeout",
                "expect_same": "--expect-same"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="a real kernel filesystem vs quotafs: the built-in writers, or your "
                        "own program after --",
        description="Build a real filesystem (loop-ext4 as root, or a tmpfs) with the given "
                    "free space, mount quotafs with the same room, and run the same writers "
                    "on both, or with `-- CMD [ARG...]` your own program, once per target, "
                    "each in a fresh empty directory ($QUOTAFS_MOUNT); report side by side.",
        usage="%(prog)s [options] [-- CMD [ARG...]]")
    p.add_argument("--limit", default="120M", help="free space of all targets (default 120M)")
    p.add_argument("--reference", choices=REFERENCE_KINDS, default=None,
                   help="the kernel filesystem to compare with (default: ext4 as root, "
                        "tmpfs otherwise)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workdir", help="where the image and backing dirs go (default /var/tmp)")
    p.add_argument("--as-user", metavar="USER",
                   help="run the writers or CMD as USER (name or uid; root only): they then "
                        "stop where ext4 stops for users other than root, short of its "
                        "reserve")
    p.add_argument("--check", nargs="?", const=True, default=None, metavar="CMD",
                   help="with -- CMD: a shell command run after CMD in the same directory "
                        "(an integrity check), its exit code reported; without: exit 1 "
                        "unless quotafs's ext4-faithful mode matched ext4")
    writers = p.add_argument_group("the built-in writers (compare without --)")
    writers.add_argument("--writers", default=",".join(KINDS),
                         help=f"comma-separated, from {', '.join(KINDS)} (default: all)")
    writers.add_argument("--file-size", default="1G", help="size of each writer's file (1G)")
    writers.add_argument("--chunk", default="1M", help="bytes per write / per mmap store (1M)")
    writers.add_argument("--keep", action="store_true",
                         help="leave the image, loop device, mount and files for inspection")
    command = p.add_argument_group("your program (compare -- CMD [ARG...])")
    command.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                         help="comma-separated, from reference (or its kind), quotafs, "
                              "quotafs-sigbus (default: all three)")
    command.add_argument("--setup", metavar="CMD",
                         help="a shell command run first in each fresh directory: the same "
                              "starting content on every target")
    command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                         help="seconds each of setup, CMD and check may take; then it is "
                              f"killed and reported hung (default {DEFAULT_TIMEOUT:.0f})")
    command.add_argument("--expect-same", action="store_true",
                         help="exit 1 when CMD or CHECK ends differently on the reference "
                              "and on quotafs-sigbus (the ext4-faithful target)")
    targets = p.add_argument_group(
        "quotafs targets' mount options (compare -- CMD; their room is the reference's)")
    add_mount_options(targets, exclude={"limit"})
    for action in targets._group_actions:  # compare decides these: refused, with the reason
        if action.dest in NOT_FOR_TARGETS:
            action.help = argparse.SUPPRESS
        elif action.dest == "reserve":
            action.help = ("root's part of the quotafs targets' limit, PERCENT or SIZE "
                           "(default: the reference's, ext4's reserved blocks)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_compare)
    for action in p._actions:  # the first of a dest's flags sets its default, as in argparse
        _DEFAULTS.setdefault(action.dest, action.default)


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


def _say(line: str) -> None:
    """A progress line of compare -- CMD: every one a whole line (no byte counters)."""
    print(line, file=sys.stderr, flush=True)


def _given(args: argparse.Namespace, names: dict[str, str]) -> list[str]:
    """The flags among `names` (dest -> flag) given other than at their defaults."""
    return [flag for dest, flag in names.items()
            if getattr(args, dest) != _DEFAULTS.get(dest)]


def _mount_flags(args: argparse.Namespace) -> dict[str, str]:
    return {name: "--" + name.replace("_", "-").replace("rules-file", "rules")
            for name in OPTION_NAMES if name != "limit" and hasattr(args, name)}


def _target_options(args: argparse.Namespace) -> dict[str, Any]:
    """The quotafs mount flags given on the command line, as MountOptions values."""
    return {name: getattr(args, name) for name in _mount_flags(args)
            if getattr(args, name) != _DEFAULTS.get(name)}


def cmd_compare(args: argparse.Namespace) -> int:
    if args.cmd:
        return cmd_compare_command(args)
    given = _given(args, {**COMMAND_ONLY, **_mount_flags(args)})
    if isinstance(args.check, str):
        given.append("--check CMD")
    if given:
        raise QuotafsError(f"{given[0]} is for compare -- CMD (your own program); the "
                           "built-in writers take --writers, --file-size, --chunk",
                           ExitCode.USAGE)
    return cmd_compare_writers(args)


def cmd_compare_command(args: argparse.Namespace) -> int:
    """compare -- CMD [ARG...]: the user's program on every target."""
    from quotafs.compare import cmdreport, command

    if args.cmd[0] != "--":
        raise QuotafsError(f"compare: unexpected {args.cmd[0]!r}: your program goes after "
                           "--, as in: quotafs compare --limit 16M -- ./my-program",
                           ExitCode.USAGE)
    given = _given(args, WRITERS_ONLY)
    if args.check is True:
        given.append("--check without a command")
    if given:
        raise QuotafsError(f"{given[0]} is for the built-in writers (compare without --); "
                           "with -- CMD use --expect-same and --check CMD", ExitCode.USAGE)
    kind = args.reference or command.default_reference()
    if args.expect_same and not _has_both(args.targets, kind):
        raise QuotafsError("--expect-same compares the reference with quotafs-sigbus: "
                           "--targets must name both", ExitCode.USAGE)
    with sigterm_as_interrupt():
        report = command.compare_command(
            args.cmd[1:], limit=args.limit, reference=kind, targets=args.targets,
            setup=args.setup, check=args.check, timeout=args.timeout, as_user=args.as_user,
            workdir=args.workdir, progress=_say,
            **_target_options(args))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print()
        print(cmdreport.render(report))
    if args.expect_same and not report.same:
        return int(ExitCode.FAILURE)
    return 0


def _has_both(targets: str, kind: str) -> bool:
    from quotafs.compare import command

    names = command.parse_targets(targets, kind)
    return kind in names and command.FAITHFUL in names


def cmd_compare_writers(args: argparse.Namespace) -> int:
    # Here, not at the top: the runner brings the API and the ext4 reference (~45 ms),
    # which every other command (status, set, ...) would pay for at start-up.
    from quotafs.compare import runner

    plan = runner.Plan(limit=parse_size(args.limit), writers=_parse_writers(args.writers),
                file_size=parse_size(args.file_size), chunk=parse_size(args.chunk),
                keep=args.keep, workdir=args.workdir, as_user=args.as_user,
                reference=args.reference or ("ext4" if os.geteuid() == 0 else "tmpfs"))
    if plan.as_user is not None:  # an unknown or locked-out user: before anything is built
        check_reachable(plan.as_user, plan.workdir or "/var/tmp")
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
        print(f"\nquotafs compare — limit {format_size(plan.limit)}, file "
              f"{format_size(plan.file_size)}, chunk {format_size(plan.chunk)}, "
              f"Linux {report['kernel']}")
        print(_reference_line(report))
        print(runner.table([runner.Record(**r) for r in report["records"]]))
        print()
        print("\n".join(runner.verdict_lines([runner.Verdict(**v) for v in report["verdicts"]])))
        if report["kept"]:
            print("\nkept for inspection; remove with:\n  " + "\n  ".join(report["kept"]))
    if args.check and not report["matched"]:
        return int(ExitCode.FAILURE)
    return 0


def _reference_line(report: dict[str, Any]) -> str:
    """The report's line about the reference (and the quotafs limit it gave)."""
    if report["reference"]["kind"] == "tmpfs":
        ref = report["reference"]
        return (f"tmpfs: size {ref['size']:,} B in a private namespace (no metadata blocks, "
                f"no root reserve: see docs/semantics.md); quotafs limit "
                f"{report['quotafs_limit']:,} B, reserve 0; writers run as "
                f"{report['writers_user']}\n")
    ext4 = report["ext4"]
    return (f"ext4: image {ext4['image_size']:,} B, block {ext4['block_size']}, free "
            f"{ext4['free_bytes']:,} B (root; others {ext4['avail_bytes']:,} B), kept back "
            f"by ext4 {ext4['reserved_clusters_bytes']:,} B, reserved for root "
            f"{ext4['root_reserve_bytes']:,} B; quotafs limit {report['quotafs_limit']:,} B,"
            f" reserve {report['quotafs_reserve']:,} B; writers run as "
            f"{report['writers_user']}\n")
