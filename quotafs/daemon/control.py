"""The runtime control channel, served: extended attributes on the mount root (the
names and documents are quotafs.protocol's).

A setxattr can only answer an errno, so the outcome of every set (the new rule's id, or
the validation message) is kept for the calling process and read back with
"user.quotafs.result"; the kernel tells the daemon the caller's pid with each request.

An xattr round trip is a FUSE request answered by the daemon itself, so a command returns
only once the daemon has applied it, needs no socket file, and finds the daemon through
the mount. Changing settings, and reading events and fault rules (paths and pids), is
allowed to root and to the user who mounted; the caller's uid comes from the kernel with
the request, so other users let in by --allow-other get EPERM. The status is public, as
df is. These names are never listed by listxattr, so copying the root's xattrs does not
copy them.
"""

from __future__ import annotations

import collections
import errno
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import pyfuse3

from quotafs.daemon.inodes import TableStats
from quotafs.errors import QuotafsError, errno_name
from quotafs.model.faults import Effect, FaultEngine, RuleSpec
from quotafs.model.ledger import Ledger
from quotafs.model.reserve import resolve_reserve
from quotafs.options import MAX_LIMIT
from quotafs.protocol import (
    EVENTS,
    FAULT_ADD,
    FAULT_CLEAR,
    FAULTS,
    FORGET,
    MAX_EVENT_PATH,
    PREFIX,
    RESULT,
    SET,
    STATUS,
    XATTR_SIZE_MAX,
    Event,
    Limits,
    RuleAdded,
    Status,
    page_after,
)

EVENT_RING_SIZE = 1000


def _page_after(name: bytes, listing: bytes) -> int | None:
    """protocol.page_after, a bad page number answered as no such attribute."""
    try:
        return page_after(name, listing)
    except ValueError:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None


def _page(lines: Iterable[str], used: int) -> list[str]:
    """The leading lines that fit one xattr value (each costs its length and a separator;
    `used` is what the page holds besides). Never returns a line that alone is too long."""
    out: list[str] = []
    size = used + 1
    for line in lines:
        size += len(line) + 2
        if size > XATTR_SIZE_MAX:
            break
        out.append(line)
    return out


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
        self._results: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self.info = info  # static facts: backing, pid, options, accounting mode
        self.owner_uid = owner_uid
        self.events: collections.deque[Event] = collections.deque(maxlen=EVENT_RING_SIZE)
        self._next_seq = 1
        self._statistics = statistics
        self._forget_cached = forget_cached

    @staticmethod
    def owns(name: bytes) -> bool:
        return name.startswith(PREFIX)

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

    def record_fault(self, op: str, path: str, effect: Effect, pid: int | None) -> None:
        err = effect.value if effect.kind == "errno" else None
        self._record("fault", op, path, err, effect.describe(), effect.rule_id, pid)

    # -- requests -------------------------------------------------------------------------

    def status(self) -> Status:
        stats = asdict(self.ledger.stats())
        faults = self.faults.statistics()
        return Status.exactly({**self.info, **stats, **asdict(self._statistics()),
                               "events_recorded": self._next_seq - 1, "seed": faults.seed,
                               "fault_rules": faults.rules, "fault_rules_active": faults.active,
                               "faults_fired": faults.fired})

    def _events_after(self, seq: int) -> bytes:
        lines = (e.to_json() for e in self.events if e.seq > seq)
        # An xattr value is at most 64 KiB: the oldest that fit; the caller asks again.
        return "".join(line + "\n" for line in _page(lines, 0)).encode()

    def _faults_after(self, rule_number: int) -> bytes:
        """{"seed", "rules": the rules after r<rule_number> that fit in 64 KiB, "more"}: a
        page of the listing (ids only grow, so a removal between pages skips nothing)."""
        listing = self.faults.to_dict()
        rules = [json.dumps(r, sort_keys=True) for r in listing["rules"]
                 if int(r["id"][1:]) > rule_number]

        def text(page: list[str], more: bool) -> str:
            return (f'{{"more": {json.dumps(more)}, "seed": {listing["seed"]}, '
                    f'"rules": [{", ".join(page)}]}}')

        page = _page(rules, len(text([], False)))
        return text(page, len(page) < len(rules)).encode()

    def _require_owner(self, ctx: pyfuse3.RequestContext) -> None:
        if ctx.uid not in (0, self.owner_uid):
            raise pyfuse3.FUSEError(errno.EPERM)

    def get(self, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == STATUS:
            return self.status().to_json().encode()
        if name in (EVENTS, FAULTS) or name.startswith((EVENTS + b".", FAULTS + b".")):
            # Paths (of directories the caller may not list) and pids: the owner's and root's.
            self._require_owner(ctx)
        if (after := _page_after(name, EVENTS)) is not None:
            return self._events_after(after)
        if (after := _page_after(name, FAULTS)) is not None:
            return self._faults_after(after)
        if name == RESULT:
            # Not popped: a reader may ask twice (size probe, then the value).
            return json.dumps(self._results.get(ctx.pid, {}), sort_keys=True).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    def _answer(self, ctx: pyfuse3.RequestContext, result: dict[str, Any]) -> None:
        self._results[ctx.pid] = result
        while len(self._results) > 100:  # callers that never read their result
            self._results.popitem(last=False)

    def set(self, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._results.pop(ctx.pid, None)  # never answer with an older request's outcome
        self._require_owner(ctx)
        try:
            request = json.loads(value)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            request = None
        if not isinstance(request, dict):
            self._answer(ctx, {"error": "the control value must be a JSON object"})
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            result = self._apply(name, request)
        except (QuotafsError, ValueError) as exc:
            self._answer(ctx, {"error": str(exc)})
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except KeyError as exc:
            self._answer(ctx, {"error": str(exc.args[0])})
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        self._answer(ctx, result)

    def _apply(self, name: bytes, request: dict[str, Any]) -> dict[str, Any]:
        if name == SET:
            return self._set_limits(request)
        if name == FAULT_ADD:
            rule = self.faults.add(RuleSpec.from_dict(request, where="rule"))
            return RuleAdded(rule.id, rule.effective_seed,
                             tuple(rule.spec.warnings())).to_dict()
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
        raise ValueError(f"unknown control request {name.decode(errors='replace')}")

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
