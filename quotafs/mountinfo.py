"""What is mounted where, read from /proc/self/mountinfo."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass
class MountInfo:
    mountpoint: str
    fstype: str
    source: str
    options: str
    device: str = ""  # "MAJOR:MINOR", the name of the mount's /sys/class/bdi entry
    super_options: str = ""  # the filesystem's own: FUSE's user_id=UID names who mounted

    @property
    def is_quotafs(self) -> bool:
        return self.fstype == "fuse.quotafs"

    @property
    def owner_uid(self) -> int | None:
        for option in self.super_options.split(","):
            if option.startswith("user_id="):
                return int(option.removeprefix("user_id="))
        return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def find_mount(path: str) -> MountInfo | None:
    """The mount whose mount point is exactly `path` (the last one, if stacked)."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if _unescape(fields[4]) == target:
                found = MountInfo(target, rest[0], _unescape(rest[1]), fields[5], fields[2],
                                  rest[2] if len(rest) > 2 else "")
    return found
