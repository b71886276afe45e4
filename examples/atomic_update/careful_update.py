"""Update data.txt to version 2 the careful way: every write is checked (short writes
continued, errors reported), the new file is fsynced before the rename and the directory
after it; on any error the temporary file goes, data.txt stays as it was, and the program
says so and exits 1. A report that does not fit is a warning (exit 1), not a broken
update."""

from __future__ import annotations

import contextlib
import os
import sys

from versions import BACKUP, DATA, REPORT, TEMP, chunks, report, version


def write_durably(path: str, data: bytes) -> None:
    """Write `data` to a new file at `path` and fsync it; on error remove it and raise."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in chunks(data):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    try:
        write_durably(TEMP, version(2))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(BACKUP)
        os.link(DATA, BACKUP)
        os.rename(TEMP, DATA)
        fsync_directory(".")
    except OSError as exc:
        print(f"careful_update: {DATA} not updated: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        write_durably(REPORT, report())
    except OSError as exc:
        print(f"careful_update: updated to version 2, but no {REPORT}: {exc.strerror}",
              file=sys.stderr)
        return 1
    print("updated to version 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
