"""Update data.txt to version 2 the careless way: write errors are ignored, so a full disk
turns into a short (or empty) data.txt that the program renames over the good one, and
then reports success."""

from __future__ import annotations

import contextlib
import os

from versions import BACKUP, DATA, REPORT, TEMP, chunks, report, version


def write_ignoring_errors(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for chunk in chunks(data):
        with contextlib.suppress(OSError):  # the bug: ENOSPC goes unnoticed
            os.write(fd, chunk)
    os.close(fd)


def main() -> None:
    write_ignoring_errors(TEMP, version(2))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(BACKUP)
    os.link(DATA, BACKUP)
    os.rename(TEMP, DATA)
    write_ignoring_errors(REPORT, report())
    print("updated to version 2")


if __name__ == "__main__":
    main()
