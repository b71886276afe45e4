"""The runtime control channel, served: the requests of quotafs.protocol, answered from
the daemon's state (the socket they arrive on is quotafs.daemon.listener's).

A request is answered in the daemon's trio loop between FUSE requests, without awaiting,
so a change is applied, atomically with respect to every FUSE request, before its reply
is sent: a command returns only once the daemon has applied it. Changing settings, and
reading events and fault rules (paths and pids), is allowed to root and to the user who
mounted; the caller's uid is the socket peer's, from the kernel (SO_PEERCRED), so other
users get EPERM. The status is public, as df is.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from quotafs.daemon.crashsim import CrashSim
from quotafs.daemon.inodes import TableStats
from quotafs.errors import QuotafsError, errno_name
from quotafs.model.faults import NEEDS_CRASH_SIM, Effect, FaultEngine, RuleSpec
from quotafs.model.ledger import Ledger
from quotafs.model.reserve import resolve_reserve
from quotafs.options import MAX_LIMIT
from quotafs.protocol import (
    CRASH,
    CRASH_LAST,
    CRASH_MODELS,
    CRASH_REVIVE,
    EVENTS,
    FAULT_ADD,
    FAULT_CLEAR,
    FAULTS,
    FORGET,
    MAX_EVENT_PATH,
    PUBLIC,
    SET,
    STATUS,
    CrashReport,
    Event,
    Limits,
    RuleAdded,
    Status,
    reply_line,
)

log = logging.getLogger(__name__)

EVENT_RING_SIZE = 1000
_XATTR_OPS = {"getxattr", "setxattr", "listxattr", "removexattr"}


class Refused(Exception):
    """A request answered with an errno and a one-line reason."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class ControlChannel:
    """The control requests and the event log of one mount.

    statistics: the inode table's counters, for the status document; forget_cached: asks
    the kernel to forget this mount's cached entries, answering how many were asked.
    """

    def __init__(self, ledger: Ledger, info: dict[str, Any], owner_uid: int,
                 faults: FaultEngine, statistics: Callable[[], TableStats],
                 forget_cached: Callable[[], int]) -> None:
        self.ledger = ledger
        self.faults = faults
        self.info = info  # static facts: backing, pid, options, accounting mode
        self.owner_uid = owner_uid
        self.events: collections.deque[Event] = collections.deque(maxlen=EVENT_RING_SIZE)
        self._next_seq = 1
        self._statistics = statistics
        self._forget_cached = forget_cached
        self.getxattr_requests: Callable[[], int] = lambda: 0  # the handlers' count
        self.last_crash: CrashReport | None = None  # the last cut's (request crash.last)
        self.crash: CrashSim | None = None  # --crash-sim's recorder (the handlers')

    # -- events ---------------------------------------------------------------------------

    def _record(self, kind: str, op: str, path: str, err: int | None, effect: str,
                rule: str | None, pid: int | None) -> None:
        name = errno_name(err) if err is not None else None
        if len(path) > MAX_EVENT_PATH:  # else its JSON line would not fit a page
            path = f"{path[:MAX_EVENT_PATH]}...[{len(path) - MAX_EVENT_PATH} more]"
        self.events.append(Event(self._next_seq, time.time(), kind, op, path, name, effect,
                                 rule, pid))
        self._next_seq += 1

    def record_quota_hit(self, op: str, path: str, pid: int | None = None) -> None:
        self._record("quota", op, path, errno.ENOSPC, "ENOSPC (quota)", None, pid)

    def record_crash(self, report: CrashReport) -> None:
        """A power cut (--crash-sim), from `quotafs crash` or a fault rule."""
        self.last_crash = report
        kept = f", keep {report.keep_fraction:g}" if report.keep_fraction else ""
        self._record("crash", "crash", "/", None,
                     f"crash {report.model}{' torn' if report.torn else ''}{kept}: "
                     f"{report.lost_bytes} bytes, {report.lost_names} names lost",
                     None, None)

    def record_fault(self, op: str, path: str, effect: Effect, pid: int | None) -> None:
        # A crash answers EIO: the device is gone (model/faults.Effect).
        err = (effect.value if effect.kind == "errno"
               else errno.EIO if effect.kind == "crash" else None)
        self._record("fault", op, path, err, effect.describe(), effect.rule_id, pid)

    # -- requests -------------------------------------------------------------------------

    def status(self) -> Status:
        stats = asdict(self.ledger.stats())
        faults = self.faults.statistics()
        return Status.exactly({**self.info, **stats, **asdict(self._statistics()),
                               "events_recorded": self._next_seq - 1, "seed": faults.seed,
                               "fault_rules": faults.rules, "fault_rules_active": faults.active,
                               "faults_fired": faults.fired,
                               "getxattr_requests": self.getxattr_requests(),
                               **(self.crash.statistics() if self.crash else {}),
                               "crash_down": self.faults.down})

    def events_after(self, seq: int) -> dict[str, Any]:
        return {"events": [e.to_dict() for e in self.events if e.seq > seq]}

    def answer(self, line: bytes, uid: int) -> bytes:
        """The reply line to a request line from a peer of `uid` (never raises: a bad
        request is answered with its reason)."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            request = None
        try:
            if not (isinstance(request, dict) and isinstance(request.get("request"), str)
                    and isinstance(request.get("args", {}), dict)):
                raise Refused(errno.EINVAL, "a control request must be a JSON object "
                                            '{"request": NAME, "args": {...}}')
            return reply_line(self.handle(request["request"], request.get("args", {}), uid))
        except Refused as exc:
            return reply_line(error=str(exc), errno_name=errno_name(exc.errno))

    def handle(self, name: str, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """The result document of request `name`; Refused with EPERM (not the owner's or
        root's), EINVAL (a bad request) or ENOENT (no such rule)."""
        if name not in PUBLIC and uid not in (0, self.owner_uid):
            raise Refused(errno.EPERM, "only the user who mounted and root may change "
                                       "the mount or read its events and rules")
        try:
            return self._apply(name, args)
        except (QuotafsError, ValueError, TypeError) as exc:
            raise Refused(errno.EINVAL, str(exc)) from None
        except KeyError as exc:
            raise Refused(errno.ENOENT, str(exc.args[0])) from None

    def _apply(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        if name == STATUS:
            return self.status().to_dict()
        if name == EVENTS:
            after = request.get("after", 0)
            if not isinstance(after, int) or isinstance(after, bool):
                raise ValueError("events: after must be an event number")
            return self.events_after(after)
        if name == FAULTS:
            return self.faults.to_dict()
        if name == SET:
            return self._set_limits(request)
        if name == FAULT_ADD:
            spec = RuleSpec.from_dict(request, where="rule")
            if spec.needs_crash_sim and self.crash is None:
                effect = "--crash" if spec.crash else "--drop-unsynced"
                raise ValueError(f"{effect}: {NEEDS_CRASH_SIM}")
            rule = self.faults.add(spec)
            return RuleAdded(rule.id, rule.effective_seed,
                             (*rule.spec.warnings(), *self._mount_warnings(rule.spec))
                             ).to_dict()
        if name == FAULT_CLEAR:
            rule_id = request.get("id")
            if rule_id is None:
                return {"cleared": self.faults.clear()}
            try:
                self.faults.remove(str(rule_id))
            except QuotafsError as exc:
                raise KeyError(str(exc)) from None
            return {"cleared": 1}
        if name == FORGET:
            return {"entries": self._forget_cached()}
        if name == CRASH:
            return self._crash(request)
        if name == CRASH_LAST:
            return {"report": None if self.last_crash is None else self.last_crash.to_dict()}
        if name == CRASH_REVIVE:
            if self.crash is None:
                raise ValueError(f"{self.info.get('mountpoint', 'the mount')} is not "
                                 "mounted with --crash-sim")
            return {"revived": self.faults.set_down(False)}
        raise ValueError(f"unknown control request {name!r}")

    def _crash(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.crash is None:
            raise ValueError(f"{self.info.get('mountpoint', 'the mount')} is not mounted "
                             "with --crash-sim")
        unknown = set(request) - {"model", "torn", "keep_fraction", "seed"}
        if unknown:
            raise ValueError(f"crash: unknown arguments: {', '.join(sorted(unknown))}")
        model, torn = request.get("model", "posix"), request.get("torn", False)
        fraction, seed = request.get("keep_fraction", 0.0), request.get("seed")
        if model not in CRASH_MODELS:
            raise ValueError(f"crash: model must be one of {', '.join(CRASH_MODELS)}, "
                             f"got {model!r}")
        if not isinstance(torn, bool):
            raise ValueError("crash: torn must be true or false")
        if (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                or not 0.0 <= fraction <= 1.0):
            raise ValueError(f"crash: keep_fraction must be a number from 0 to 1, "
                             f"got {fraction!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**64):
            raise ValueError(f"crash: seed must be a whole number from 0 to 2^64-1, "
                             f"got {seed!r}")
        try:
            return self.crash.cut(model, torn, float(fraction), seed).to_dict()
        except OSError as exc:  # the backing failed under the revert: say so, stay up
            log.exception("the power cut failed")
            raise Refused(exc.errno or errno.EIO, f"the cut failed: {exc}") from None

    async def settle(self) -> None:
        """After a request: what it left for the kernel to drop (a cut's caches)."""
        if self.crash is not None:
            await self.crash.settle()

    def _mount_warnings(self, spec: RuleSpec) -> list[str]:
        """Doubts about a rule on this mount in particular."""
        unsent = sorted(set(spec.ops) & _XATTR_OPS)
        if self.info.get("xattrs", True) or not unsent:
            return []
        return [f"{', '.join(unsent)}: the mount has --xattrs off, so the kernel never "
                "sends these requests"]

    def _set_limits(self, request: dict[str, Any]) -> dict[str, Any]:
        unknown = set(request) - {"limit", "inodes", "reserve"}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        for key, value in request.items():
            if key != "reserve" and value is not None and (
                    not isinstance(value, int) or isinstance(value, bool)
                    or not 0 <= value <= MAX_LIMIT):
                raise ValueError(f"{key} must be an integer from 0 to 2^63-1, or null")
        if "limit" in request or "reserve" in request:
            limit = request.get("limit", self.ledger.limit)
            self.ledger.set_limit(limit, self._reserve_of(request, limit))
        if "inodes" in request:
            self.ledger.set_inode_limit(request["inodes"])
        return Limits(self.ledger.limit, self.ledger.inode_limit,
                      self.ledger.root_reserve).to_dict()

    def _reserve_of(self, request: dict[str, Any], limit: int | None) -> int | None:
        """A reserve as --reserve takes it ("5%" of the limit in effect after this request,
        or a size), resolved as at mount; None: not asked to change."""
        if "reserve" not in request:
            return None
        unit = int(self.info.get("block_size", 1)) if self.info.get(
            "accounting", "blocks") == "blocks" else 1
        return resolve_reserve(request["reserve"], limit, unit)
