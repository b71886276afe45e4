"""The runtime control channel: extended attributes on the mount root.

    getxattr(MOUNT, "user.quotafs.status")        -> JSON status document
    getxattr(MOUNT, "user.quotafs.events")        -> recorded events, JSON lines
    setxattr(MOUNT, "user.quotafs.set", JSON)     -> change the limit / inode limit

An xattr round trip is a FUSE request answered by the daemon itself, so a command returns
only once the daemon has applied it, needs no socket file, and finds the daemon through
the mount. Changing settings is allowed to root and to the user who mounted; the caller's
uid comes from the kernel with the request, so other users let in by --allow-other get
EPERM. These names are never listed by listxattr, so copying the root's xattrs does not
copy them.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyfuse3

from quotafs.ledger import Ledger

PREFIX = b"user.quotafs."
STATUS = PREFIX + b"status"
EVENTS = PREFIX + b"events"
SET = PREFIX + b"set"

EVENT_RING_SIZE = 1000
XATTR_SIZE_MAX = 65536


@dataclass
class Event:
    seq: int
    time: float
    kind: str  # "quota" for an ENOSPC from the quota, "fault" for an injected fault
    op: str
    path: str
    errno: str


class ControlChannel:
    def __init__(self, ledger: Ledger, info: dict[str, Any], owner_uid: int,
                 backing: str) -> None:
        self.ledger = ledger
        self.info = info  # static facts: backing, pid, options, accounting mode
        self.owner_uid = owner_uid
        self.backing = backing
        self.events: collections.deque[Event] = collections.deque(maxlen=EVENT_RING_SIZE)
        self._next_seq = 1
        self.statistics: Callable[[], dict[str, Any]] = dict

    @staticmethod
    def owns(name: bytes) -> bool:
        return name.startswith(PREFIX)

    # -- events ---------------------------------------------------------------------------

    def _path_of(self, fd: int) -> str:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return "?"
        rel = os.path.relpath(path.removesuffix(" (deleted)"), self.backing)
        return "/" if rel == "." else "/" + rel

    def record(self, kind: str, op: str, fd: int, err: int) -> None:
        self.events.append(Event(self._next_seq, time.time(), kind, op, self._path_of(fd),
                                 errno.errorcode.get(err, str(err))))
        self._next_seq += 1

    def record_quota_hit(self, op: str, fd: int, root_fd: int) -> None:
        self.record("quota", op, fd, errno.ENOSPC)

    # -- requests -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        stats = asdict(self.ledger.stats())
        return {**self.info, **stats, **self.statistics(), "events_recorded": self._next_seq - 1}

    def get(self, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == STATUS:
            return json.dumps(self.status(), sort_keys=True).encode()
        if name == EVENTS:
            lines = [json.dumps(asdict(e), sort_keys=True) for e in self.events]
            # An xattr value is at most 64 KiB: keep the newest events that fit.
            out: list[str] = []
            size = 0
            for line in reversed(lines):
                size += len(line) + 1
                if size > XATTR_SIZE_MAX - 1:
                    break
                out.append(line)
            return ("\n".join(reversed(out)) + ("\n" if out else "")).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    def set(self, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if ctx.uid not in (0, self.owner_uid):
            raise pyfuse3.FUSEError(errno.EPERM)
        if name != SET:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            request = json.loads(value)
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if not isinstance(request, dict) or not set(request) <= {"limit", "inodes"}:
            raise pyfuse3.FUSEError(errno.EINVAL)
        for key in request:
            value_ = request[key]
            if value_ is not None and (not isinstance(value_, int) or value_ < 0):
                raise pyfuse3.FUSEError(errno.EINVAL)
        if "limit" in request:
            self.ledger.set_limit(request["limit"])
        if "inodes" in request:
            self.ledger.set_inode_limit(request["inodes"])
