"""The control client: requests to a running daemon over its control channel (see
quotafs.protocol), each within the probe timeout, answered as typed documents.

Used by the command line, the Python API and the pytest plugin; a refusal or an unusable
mount is a QuotafsError with one line and an exit code.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any

from quotafs.client import lifecycle
from quotafs.errors import ExitCode, QuotafsError, printable
from quotafs.model.faults import RuleSpec
from quotafs.mountinfo import find_mount
from quotafs.protocol import (
    EVENTS,
    FAULT_ADD,
    FAULT_CLEAR,
    FAULTS,
    RESULT,
    SET,
    STATUS,
    Event,
    FaultListing,
    Limits,
    RuleAdded,
    Status,
    page_name,
)


def require_quotafs(path: str) -> str:
    """The mount point of `path`, if it is a quotafs mount; QuotafsError otherwise."""
    mountpoint = lifecycle.resolve(path)
    info = find_mount(mountpoint)
    if info is None or not info.is_quotafs:
        raise QuotafsError(f"{path} is not a quotafs mount", ExitCode.NOT_QUOTAFS)
    return mountpoint


def control_error(mountpoint: str, exc: OSError) -> QuotafsError:
    if exc.errno == errno.ENOTCONN:
        return QuotafsError(f"the quotafs daemon of {mountpoint} is gone: run "
                            f"'quotafs umount {mountpoint}'", ExitCode.NOT_QUOTAFS)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return QuotafsError(f"not allowed to change {mountpoint} or read its events and "
                            "rules: only the user who mounted it and root may",
                            ExitCode.PERMISSION)
    return QuotafsError(f"{mountpoint}: {exc.strerror}", ExitCode.FAILURE)


def get_control(mountpoint: str, name: bytes) -> bytes:
    """getxattr a control name, within the probe timeout; OSError as control_error says."""
    try:
        [value] = lifecycle.probe(mountpoint, [("get", name)])
    except OSError as exc:
        raise control_error(mountpoint, exc) from None
    assert isinstance(value, bytes)
    return value


def request(mountpoint: str, name: bytes, payload: dict[str, Any]) -> dict[str, Any]:
    """setxattr a control request, then read this process's result (id or error): the
    daemon validates, and its one-line refusal is raised as a usage error."""
    path = require_quotafs(mountpoint)
    # One probe for both: the daemon keeps the result for the caller's pid.
    done, answer = lifecycle.probe(path, [("set", name, json.dumps(payload).encode()),
                                          ("get", RESULT)])
    result: dict[str, Any] = {} if isinstance(answer, OSError) else json.loads(answer or b"{}")
    if isinstance(done, OSError):
        if result.get("error"):
            raise QuotafsError(str(result["error"]), ExitCode.USAGE)
        raise control_error(path, done)
    return result


# -- the requests -------------------------------------------------------------------------

def read_status(path: str) -> Status:
    return Status.from_json(get_control(require_quotafs(path), STATUS))


def set_limits(path: str, **changes: int | str | None) -> Limits:
    """Change limit, inodes and/or reserve ("5%" is of the daemon's limit: it resolves
    it); the settings in effect after the change."""
    return Limits.from_dict(request(path, SET, changes))


def add_rule(mountpoint: str, spec: RuleSpec) -> RuleAdded:
    return RuleAdded.from_dict(request(mountpoint, FAULT_ADD, spec.to_dict()))


def list_rules(mountpoint: str) -> FaultListing:
    """Every rule with its counters (page by page: ids only grow, so none is skipped)."""
    path = require_quotafs(mountpoint)
    rules: list[dict[str, Any]] = []
    after = 0
    while True:
        page: dict[str, Any] = json.loads(get_control(path, page_name(FAULTS, after)))
        rules += page["rules"]
        if not page.get("more") or not page["rules"]:
            return FaultListing.from_dict({"seed": page["seed"], "rules": rules})
        after = int(rules[-1]["id"][1:])


def clear_rules(mountpoint: str, rule_id: str | None = None) -> int:
    """Remove rule `rule_id`, or all; how many were removed."""
    result = request(mountpoint, FAULT_CLEAR, {"id": rule_id})
    return int(result.get("cleared", 0))


def read_events(mountpoint: str, after: int = 0) -> list[Event]:
    """Recorded events with seq > after, oldest first (all of them, page by page)."""
    path = require_quotafs(mountpoint)
    events: list[Event] = []
    while True:
        raw = get_control(path, page_name(EVENTS, after)).decode()
        page = [Event.from_json(line) for line in raw.splitlines() if line]
        if not page:
            return events
        events += page
        after = page[-1].seq


def event_line(e: Event) -> str:
    """One recorded event as a line a person reads (the CLI and the pytest report)."""
    millis = int(e.time % 1 * 1000)
    stamp = time.strftime("%H:%M:%S", time.localtime(e.time)) + f".{millis:03d}"
    rule = f" rule {e.rule}" if e.rule else ""
    who = f" pid {e.pid}" if e.pid else ""
    return f"{stamp} #{e.seq} {e.kind} {e.op} {printable(e.path)}: {e.effect}{rule}{who}"
