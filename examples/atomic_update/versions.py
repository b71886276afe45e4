"""The data file the updaters replace, its two versions, and the check.

    python versions.py setup     write version 1 of data.txt here (the starting state)
    python versions.py check     exit 0 if data.txt is a complete version 1 or 2, else 1
                                 (saying which, on stderr)

Both updaters write version 2 to a temporary file in chunks, keep the old version as
data.txt.old (a hard link: no space), rename the new one over data.txt, and then write a
report of the update. The report is a by-product: losing it to a full disk is harmless,
and the check does not look at it.
"""

from __future__ import annotations

import sys

DATA = "data.txt"
TEMP = "data.txt.tmp"
BACKUP = "data.txt.old"
REPORT = "report.txt"
CHUNK = 8192  # bytes per write(2)
SIZES = {1: 32 << 10, 2: 64 << 10}  # version -> bytes (whole 4 KiB blocks)
REPORT_SIZE = 32 << 10


def _text(label: str, size: int) -> bytes:
    line_no = 0
    out = bytearray()
    while len(out) < size:
        out += f"{label} record {line_no:06d}\n".encode()
        line_no += 1
    return bytes(out[:size])


def version(number: int) -> bytes:
    return _text(f"version {number}", SIZES[number])


def report() -> bytes:
    return _text("changed", REPORT_SIZE)


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def check() -> int:
    try:
        with open(DATA, "rb") as f:
            content = f.read()
    except OSError as exc:
        print(f"check: cannot read {DATA}: {exc.strerror}", file=sys.stderr)
        return 1
    for number in SIZES:
        if content == version(number):
            print(f"check: {DATA} is version {number}", file=sys.stderr)
            return 0
    print(f"check: {DATA} is neither version: {len(content)} bytes, "
          f"starting {content[:24]!r}", file=sys.stderr)
    return 1


def setup() -> int:
    with open(DATA, "wb") as f:
        f.write(version(1))
    return 0


if __name__ == "__main__":
    commands = {"setup": setup, "check": check}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit("usage: versions.py setup|check")
    sys.exit(commands[sys.argv[1]]())
