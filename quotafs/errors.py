"""User-facing errors: one exception type carrying an exit code, printed as one line."""

from __future__ import annotations

import enum
import errno
import os


class ExitCode(enum.IntEnum):
    """Exit statuses of the quotafs command; the table in docs/exit-codes.md mirrors this."""

    OK = 0
    FAILURE = 1  # the operation ran and failed (e.g. compare --check found a mismatch)
    USAGE = 2  # bad option, bad size, unknown writer, ... (argparse uses 2 as well)
    MOUNTPOINT = 3  # mount point missing, not a directory, already mounted, busy
    BACKING = 4  # backing directory missing or unusable
    NO_FUSE = 5  # /dev/fuse missing or cannot be opened, fusermount3 missing
    PERMISSION = 6  # no permission to mount / control / needs root
    NOT_QUOTAFS = 7  # the path is not a quotafs mount (or its daemon is gone)
    LOOP = 8  # no free loop device, mkfs.ext4 missing, ext4 reference failed
    DAEMON = 9  # the daemon failed to start or died
    INTERRUPTED = 130  # Ctrl-C
    BROKEN_PIPE = 141  # the output's reader went away (128 + SIGPIPE, as coreutils)


# What a "cannot mount here" error ends with: the command that says why and what to change.
DOCTOR_HINT = "(run `quotafs doctor`)"


def with_doctor_hint(message: str) -> str:
    return message if message.endswith(DOCTOR_HINT) else f"{message} {DOCTOR_HINT}"


class QuotafsError(Exception):
    """An error the user can act on; main() prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


_C_ESCAPES = {"\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n",
              "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def printable(name: str) -> str:
    """Text as `ls -b` shows a file name: C escapes for backslash and control characters,
    octal for other unprintable bytes (also undecodable ones), so a name can neither break
    a line nor send escape sequences to the terminal (event lines, error messages)."""
    out: list[str] = []
    for ch in name:
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            undecoded = "\udc80" <= ch <= "\udcff"  # a byte os.fsdecode could not decode
            raw = os.fsencode(ch) if undecoded else ch.encode("utf-8", "surrogatepass")
            out.append("".join(f"\\{byte:03o}" for byte in raw))
    return "".join(out)


def errno_name(code: int | None) -> str:
    """"ENOSPC" for errno.ENOSPC; the number as text for one Python has no name for, and
    "EUNKNOWN" for None (an OSError raised without an errno)."""
    if code is None:
        return "EUNKNOWN"
    return errno.errorcode.get(code, str(code))
