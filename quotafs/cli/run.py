"""`quotafs run`: an ephemeral mount around one command.

    quotafs run --limit 10M [mount options] [--cd] -- ./my-program args

The command sees the mount point in $QUOTAFS_MOUNT (and as its working directory with
--cd). quotafs exits with the command's status (128+N if it died by signal N) after the
mount is gone, and prints a summary of quota hits and injected faults to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from typing import Any

from quotafs.cli.mountopts import add_mount_options, mount_options
from quotafs.errors import ExitCode, QuotafsError
from quotafs.protocol import Event, Status
from quotafs.units import format_size


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="mount a fresh quotafs around one command",
                       description="Mount a fresh quotafs, run CMD with $QUOTAFS_MOUNT set "
                                   "to the mount point, unmount, exit with CMD's status.")
    add_mount_options(p)
    p.add_argument("--cd", action="store_true", help="run CMD inside the mount point")
    p.add_argument("--mountpoint", help="where to mount (default: a new temporary dir)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _summary(status: Status, events: list[Event]) -> str:
    limit = "no limit" if status["limit"] is None else format_size(status["limit"])
    lines = [f"quotafs: {format_size(status['used'])} used of {limit}; "
             f"{status['enospc_count']} ENOSPC from the quota"]
    fired = Counter(f"{e['op']} {e['effect']} (rule {e['rule']})"
                    for e in events if e["kind"] == "fault")
    for what, count in fired.most_common():
        lines.append(f"quotafs: fault fired {count}x: {what}")
    lines.append(f"quotafs: fault seed {status['seed']}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise QuotafsError("run needs a command after --, e.g. quotafs run --limit 10M -- "
                           "./app", ExitCode.USAGE)
    # Here, not at the top: the API (with the ext4 reference, concurrent.futures) costs
    # every other command's start-up ~20 ms.
    from quotafs.client import api

    options = mount_options(args)
    with api.mounted_with(options, args.mountpoint) as m:
        env = {**os.environ, "QUOTAFS_MOUNT": m.path}
        # Ctrl-C goes to the whole foreground process group: let it reach CMD, and clean
        # up after CMD has reacted, rather than unmounting under it.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            try:
                proc = subprocess.Popen(cmd, env=env, cwd=m.path if args.cd else None,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                         signal.SIG_DFL))
            except OSError as exc:
                raise QuotafsError(f"cannot run {cmd[0]}: {exc.strerror}",
                                   ExitCode.USAGE) from None
            forward = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
            try:
                returncode = proc.wait()
            finally:
                signal.signal(signal.SIGTERM, forward)
        finally:
            signal.signal(signal.SIGINT, previous)
        if not args.quiet:
            with contextlib.suppress(QuotafsError, OSError):
                print(_summary(m.status(), m.events()), file=sys.stderr)
    return _exit_status(returncode)
