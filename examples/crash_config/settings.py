"""The application's settings file, its two versions, and the check.

    python settings.py setup     write version 1 of app.conf here, durably (the start)
    python settings.py check N   exit 0 if app.conf is a complete version N, else 1
                                 (saying what it found, on stderr)

Both writers save version 2 the usual way: the whole new file to app.conf.tmp, renamed
over app.conf (so no reader ever sees half a file), then a line in the application's
log, fsynced (as loggers and databases do). The careless one never syncs the new file or
the directory; the careful one fsyncs the file before the rename and the directory after.
"""

from __future__ import annotations

import os
import sys

CONF = "app.conf"
TEMP = "app.conf.tmp"
LOG = "app.log"


def version(number: int) -> bytes:
    lines = [f"# settings, version {number}"]
    lines += [f"option_{i} = {number * 1000 + i}" for i in range(200)]
    return ("\n".join(lines) + "\n").encode()


def fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log(line: str) -> None:
    with open(LOG, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def setup() -> None:
    with open(CONF, "wb") as f:
        f.write(version(1))
        f.flush()
        os.fsync(f.fileno())
    fsync_path(".", directory=True)


def check(number: int) -> int:
    try:
        with open(CONF, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        print(f"{CONF} is missing", file=sys.stderr)
        return 1
    if content == version(number):
        return 0
    found = next((f"version {n}" for n in (1, 2) if content == version(n)),
                 f"{len(content)} bytes of neither version")
    print(f"{CONF} is {found}, not version {number}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:] == ["setup"]:
        setup()
    elif len(sys.argv) == 3 and sys.argv[1] == "check":
        sys.exit(check(int(sys.argv[2])))
    else:
        sys.exit("usage: settings.py setup | check VERSION")
