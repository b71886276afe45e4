"""The differential run's mmap child: store stdin's bytes at an offset of a file through a
shared mapping, one page at a time, and say how far it got.

    python -I -S mmap_child.py PATH OFFSET extend|in-place < DATA

It runs as a child (machinery.run_mmap_child) because a store into a mapping past the room
a filesystem has kills its process with SIGBUS. Its output, one line per write(2) so that a
signal loses nothing: "ack N" after each page (N bytes stored so far), "fail CALL ERRNO"
for a failed call, "done" at the end. Standard library only: it runs isolated (-I -S).
"""

from __future__ import annotations

import mmap
import os
import resource
import sys


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: a signal loses nothing


def open_file(path: str, offset: int, size: int, extend: bool) -> int | None:
    """The descriptor (extend: the file created and grown to cover the range), or None
    after saying what failed."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if extend else 0), 0o644)
    except OSError as e:
        say(f"fail open {e.errno}")
        return None
    if extend and os.fstat(fd).st_size < offset + size:
        try:
            os.ftruncate(fd, offset + size)
        except OSError as e:
            say(f"fail ftruncate {e.errno}")
            return None
    return fd


def store(fd: int, offset: int, data: bytes) -> bool:
    """Store the part of `data` inside the file through a mapping, page by page; msync and
    close. False after saying which call failed."""
    end = min(offset + len(data), os.fstat(fd).st_size)
    if end <= offset:
        return True
    page = mmap.PAGESIZE
    start = offset - offset % page
    try:
        m = mmap.mmap(fd, end - start, offset=start)
    except OSError as e:
        say(f"fail mmap {e.errno}")
        return False
    pos = offset
    while pos < end:
        nxt = min(end, pos - pos % page + page)
        m[pos - start:nxt - start] = data[pos - offset:nxt - offset]
        pos = nxt
        say(f"ack {pos - offset}")
    failed = False
    try:
        m.flush()
    except OSError as e:
        say(f"fail msync {e.errno}")
        failed = True
    m.close()
    try:
        os.close(fd)
    except OSError as e:
        if not failed:
            say(f"fail close {e.errno}")
    return True


def main(argv: list[str]) -> int:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGBUS must not dump core
    path, offset, extend = argv[1], int(argv[2]), argv[3] == "extend"
    data = sys.stdin.buffer.read()
    fd = open_file(path, offset, len(data), extend)
    if fd is None or not store(fd, offset, data):
        return 1
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
