"""The `quotafs` command line: the parser, dispatch to the command modules (mount,
status, run, fault, compare, sweep: one per command, each with its `register`), and errors as one
line + exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from quotafs import __version__
from quotafs.cli import compare, crash, doctor, fault, mount, run, status, sweep
from quotafs.client import lifecycle
from quotafs.errors import ExitCode, QuotafsError, printable


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the usage is one `--help` away.
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {printable(message)}\n")


# -- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quotafs", description=(
        "A FUSE passthrough filesystem with a byte quota that runs out of space where a "
        "real filesystem would."))
    parser.add_argument("--version", action="version", version=f"quotafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for command in (mount, status, run, fault, crash, compare, sweep, doctor):
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A command never hangs on a sick mount: its probes run in a child process. Restored
    # afterwards, so that a caller in the same process (a test) keeps its cheaper probes.
    isolated, lifecycle.ISOLATE_PROBES = lifecycle.ISOLATE_PROBES, True
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`quotafs status M | head -3`): stop quietly, as coreutils
        # do when SIGPIPE kills them, and keep Python from failing again on its final flush.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.BROKEN_PIPE)
    finally:
        lifecycle.ISOLATE_PROBES = isolated


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
