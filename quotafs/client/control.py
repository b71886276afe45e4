"""The control client: requests to a running daemon over its control socket (see
quotafs.protocol and quotafs.controlsocket), each within the probe timeout, answered as
typed documents.

Used by the command line, the Python API and the pytest plugin; a refusal or an unusable
mount is a QuotafsError with one line and an exit code. A socket call never waits in the
kernel for the daemon the way a request on the mount does, so it needs no probe thread
or child: its timeout is the socket's.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any

from quotafs import controlsocket
from quotafs.client import lifecycle
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.model.faults import RuleSpec
from quotafs.mountinfo import find_mount
from quotafs.protocol import (
    CRASH,
    CRASH_LAST,
    CRASH_REVIVE,
    EVENTS,
    FAULT_ADD,
    FAULT_CLEAR,
    FAULTS,
    SET,
    STATUS,
    CrashReport,
    Event,
    FaultListing,
    Limits,
    ProtocolError,
    RuleAdded,
    Status,
    request_line,
)


def require_quotafs(path: str) -> tuple[str, int]:
    """(the mount point of `path`, the uid that mounted it), if it is a quotafs mount;
    QuotafsError otherwise."""
    mountpoint = lifecycle.resolve(path)
    info = find_mount(mountpoint)
    if info is None or not info.is_quotafs:
        raise QuotafsError(f"{path} is not a quotafs mount", ExitCode.NOT_QUOTAFS)
    owner = info.owner_uid
    return mountpoint, 0 if owner is None else owner


def control_error(mountpoint: str, exc: OSError) -> QuotafsError:
    if exc.errno in (errno.ENOTCONN, errno.ECONNREFUSED, errno.ENOENT):
        return QuotafsError(f"the quotafs daemon of {mountpoint} is gone: run "
                            f"'quotafs umount {mountpoint}'", ExitCode.NOT_QUOTAFS)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return QuotafsError(f"not allowed to change {mountpoint} or read its events and "
                            "rules: only the user who mounted it and root may",
                            ExitCode.PERMISSION)
    return QuotafsError(f"{mountpoint}: {exc.strerror}", ExitCode.FAILURE)


def request(path: str, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Request `name` of the daemon of the mount at `path`; its result document, once the
    daemon has applied it. A refusal: EPERM as control_error says, a bad request (EINVAL,
    ENOENT) as a usage error with the daemon's one-line reason."""
    mountpoint, owner = require_quotafs(path)
    timeout = lifecycle.probe_timeout()
    try:
        with controlsocket.connect(mountpoint, owner, timeout) as sock:
            raw = controlsocket.exchange(sock, request_line(name, args), timeout)
    except TimeoutError:
        raise lifecycle.NoAnswer(mountpoint, timeout) from None
    except OSError as exc:
        raise control_error(mountpoint, exc) from None
    if not raw:  # closed without a word: it died meanwhile
        raise control_error(mountpoint, OSError(errno.ECONNREFUSED, "no answer"))
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError("reply", f"not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise ProtocolError("reply", "not a JSON object")
    if "error" in reply:
        if reply.get("errno") == "EPERM":
            raise control_error(mountpoint, OSError(errno.EPERM, str(reply["error"])))
        raise QuotafsError(str(reply["error"]), ExitCode.USAGE)
    result: dict[str, Any] = reply.get("result", {})
    return result


def remove_stale_socket(mountpoint: str, owner: int) -> None:
    """Remove the control socket a dead daemon of `owner` left at `mountpoint` (SIGKILL);
    a live daemon's is kept."""
    controlsocket.remove_stale(mountpoint, owner)


# -- the requests -------------------------------------------------------------------------

def read_status(path: str) -> Status:
    return Status.from_dict(request(path, STATUS))


def set_limits(path: str, **changes: int | str | None) -> Limits:
    """Change limit, inodes and/or reserve ("5%" is of the daemon's limit: it resolves
    it); the settings in effect after the change."""
    return Limits.from_dict(request(path, SET, changes))


def add_rule(mountpoint: str, spec: RuleSpec) -> RuleAdded:
    return RuleAdded.from_dict(request(mountpoint, FAULT_ADD, spec.to_dict()))


def list_rules(mountpoint: str) -> FaultListing:
    """Every rule with its counters."""
    return FaultListing.from_dict(request(mountpoint, FAULTS))


def clear_rules(mountpoint: str, rule_id: str | None = None) -> int:
    """Remove rule `rule_id`, or all; how many were removed."""
    result = request(mountpoint, FAULT_CLEAR, {"id": rule_id})
    return int(result.get("cleared", 0))


def read_events(mountpoint: str, after: int = 0) -> list[Event]:
    """Recorded events with seq > after, oldest first."""
    events = request(mountpoint, EVENTS, {"after": after}).get("events")
    if not isinstance(events, list):
        raise ProtocolError("events reply", "no list of events")
    return [Event.from_dict(e) for e in events]


def crash(mountpoint: str, model: str = "posix", torn: bool = False,
          keep_fraction: float = 0.0, seed: int | None = None) -> CrashReport:
    """A power cut of a --crash-sim mount (docs/crash.md): what the model does not keep
    is reverted; returns once the daemon has reverted it and the kernel forgot it."""
    return CrashReport.from_dict(request(mountpoint, CRASH, {
        "model": model, "torn": torn, "keep_fraction": keep_fraction, "seed": seed}))


def last_crash(mountpoint: str) -> CrashReport | None:
    """The last power cut's report (a --crash fault rule's too), or None: no cut yet."""
    found = request(mountpoint, CRASH_LAST)
    report = found.get("report") if isinstance(found, dict) else None
    return None if report is None else CrashReport.from_dict(report)


def revive(mountpoint: str) -> bool:
    """Bring back a --crash-sim mount whose device a --crash rule's cut left down (EIO to
    every request); True if it was down."""
    found = request(mountpoint, CRASH_REVIVE)
    return bool(found.get("revived")) if isinstance(found, dict) else False


def event_line(e: Event) -> str:
    """One recorded event as a line a person reads (the CLI and the pytest report)."""
    millis = int(e.time % 1 * 1000)
    stamp = time.strftime("%H:%M:%S", time.localtime(e.time)) + f".{millis:03d}"
    rule = f" rule {e.rule}" if e.rule else ""
    who = f" pid {e.pid}" if e.pid else ""
    return f"{stamp} #{e.seq} {e.kind} {e.op} {printable(e.path)}: {e.effect}{rule}{who}"
