"""The control channel's protocol: requests over a mount's control socket (where it is
and who may reach it: quotafs.controlsocket), and the typed documents they carry. The
daemon (quotafs.daemon.control) serves them, the client (quotafs.client.control) asks for
them; neither pyfuse3 nor trio is imported here.

One JSON line each way: {"request": NAME, "args": {...}} in, then either
{"result": DOCUMENT} or {"error": MESSAGE, "errno": "EPERM"|"EINVAL"|"ENOENT"} out.

    status                     -> Status (anyone, as df)
    events {"after": SEQ}      -> {"events": [Event, ...]} after SEQ (owner and root)
    faults                     -> FaultListing (owner and root)
    set {limit, inodes, reserve} -> Limits (owner and root, as every change)
    fault.add RULE             -> RuleAdded
    fault.clear {"id": ID|null} -> {"cleared": N}
    forget                     -> {"entries": N} (for tests: drop the kernel's entries)
    crash {model, torn, keep_fraction, seed} -> CrashReport (a power cut; --crash-sim only)
    crash.last                 -> {"report": CrashReport|null}: the last cut's, whoever
                                  made it (a --crash fault rule, for the crash sweep)
    crash.revive               -> {"revived": BOOL}: a --crash rule's cut left the device
                                  down (EIO to every request); bring it back (BOOL: it was down)

Every document is a frozen dataclass whose JSON object has the keys of its fields (tuples
as lists): `to_dict()` gives exactly what the daemon sends, and the command line's --json
prints it. A key added in a later version needs a default here, so that a client still
reads an older daemon's document; keys this version does not know are ignored.

The documents are also read-only mappings of their JSON keys (`status["used"]`), as the
Python API's results were plain dicts in 0.1.0; attributes (`status.used`) are the typed way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

from quotafs.errors import ExitCode, QuotafsError
from quotafs.model.faults import STATUS_KEYS, RuleSpec

STATUS = "status"
EVENTS = "events"
FAULTS = "faults"
SET = "set"
FAULT_ADD = "fault.add"
FAULT_CLEAR = "fault.clear"
FORGET = "forget"
CRASH = "crash"
CRASH_LAST = "crash.last"
CRASH_REVIVE = "crash.revive"
REQUESTS = (STATUS, EVENTS, FAULTS, SET, FAULT_ADD, FAULT_CLEAR, FORGET, CRASH, CRASH_LAST,
            CRASH_REVIVE)
PUBLIC = (STATUS,)  # the rest show paths and pids, or change the mount

# An event's path is cut here (with a marker), so one pathological name cannot make the
# events reply megabytes long. PATH_MAX.
MAX_EVENT_PATH = 4096


# -- the wire: one JSON line each way ------------------------------------------------------

def request_line(name: str, args: Mapping[str, Any] | None = None) -> bytes:
    return (json.dumps({"request": name, "args": dict(args or {})}) + "\n").encode()


def reply_line(result: Mapping[str, Any] | None = None, error: str | None = None,
               errno_name: str | None = None) -> bytes:
    body: dict[str, Any] = ({"error": error, "errno": errno_name} if error is not None
                            else {"result": dict(result or {})})
    return (json.dumps(body, sort_keys=True) + "\n").encode()


# -- documents ----------------------------------------------------------------------------

class ProtocolError(QuotafsError):
    """A document that is not what this version of quotafs reads (another version's daemon)."""

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(f"the daemon answered a {what} this quotafs cannot read ({problem}): "
                         "is it another version? remount it", ExitCode.FAILURE)


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _thawed(value: Any) -> Any:
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


class Document(Mapping[str, Any]):
    """Base of the documents: JSON object <-> frozen dataclass, one key per field."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise ProtocolError(cls._what(), f"not a JSON object: {type(data).__name__}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # subclasses are dataclasses
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING]
        if missing:
            raise ProtocolError(cls._what(), "no " + ", ".join(missing))
        return cls(**{f.name: _frozen(data[f.name]) for f in fields if f.name in data})

    @classmethod
    def exactly(cls, data: Mapping[str, Any]) -> Self:
        """from_dict for the writer (the daemon): a key without a field is a bug here, not
        a newer daemon's addition, and would vanish from the document unseen."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field for {', '.join(unknown)}")
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: bytes | str) -> Self:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ProtocolError(cls._what(), f"not JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, as the daemon sends it."""
        return {f.name: _thawed(getattr(self, f.name))
                for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def _what(cls) -> str:
        return cls.__name__

    # Read-only mapping of the JSON keys: 0.1.0's results were dicts.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        # A document equals another of its type with equal fields, and a plain mapping
        # with its JSON keys and values (as 0.1.0's dicts did).
        if isinstance(other, Document):
            return type(self) is type(other) and self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to dicts, which are unhashable


@dataclass(frozen=True, eq=False)
class Usage(Document):
    """How full a mount is, in bytes and inodes (QuotaMount.usage, Ext4Mount.usage)."""

    limit: int | None  # None: no limit
    used: int
    reserved: int | None  # mmap pages held for --mmap-sigbus; None on ext4
    free: int  # what root may still allocate
    root_reserve: int
    available: int  # what every other user may (df's Avail)
    inode_limit: int | None
    inodes_used: int
    enospc_count: int | None  # ENOSPCs answered for the quota; None on ext4


@dataclass(frozen=True, eq=False)
class Status(Document):
    """The status document (request "status", `quotafs status --json`)."""

    # what the mount is (fixed at mount)
    version: str
    mountpoint: str
    backing: str
    private_backing: bool
    pid: int
    accounting: str  # "blocks" or "apparent"
    block_size: int
    mmap_sigbus: bool
    mount_options: tuple[str, ...]
    owner_uid: int
    existing_bytes_at_mount: int
    # the ledger (model.ledger.LedgerStats)
    limit: int | None
    used: int
    reserved: int
    free: int
    root_reserve: int
    available: int
    kept_back: int
    unallocated: int
    inode_limit: int | None
    inodes_used: int
    enospc_count: int
    peak_used: int  # the highest `used` since mount
    allocating_writes: int  # write requests that newly allocated blocks
    # the daemon's tables
    known_inodes: int
    open_handles: int
    reserved_blocks: int
    # events and fault rules (model.faults.FaultStats)
    events_recorded: int
    seed: int
    fault_rules: int
    fault_rules_active: int
    faults_fired: int
    # later additions (defaults: an older daemon's document lacks them)
    xattrs: bool = True  # False: mounted with --xattrs off
    getxattr_requests: int = 0  # GETXATTR requests the kernel sent (one a write with xattrs)
    crash_sim: bool = False  # mounted with --crash-sim (docs/crash.md)
    durability_ops: int = 0  # fsync, fdatasync, fsyncdir and renames seen (--crash-sim)
    crashes: int = 0  # power cuts so far
    crash_journal_bytes: int = 0  # old contents saved to undo unsynced writes
    crash_journal_entries: int = 0  # recorded changes not yet durable
    crash_forced_syncs: int = 0  # times the journal's bound made everything durable
    crash_down: bool = False  # a --crash rule's cut left the device down (crash --revive)
    crash_stash_bytes: int = 0  # blocks of removed files kept for a cut (in the bound)
    crash_unrecorded: int = 0  # changes made durable at once: no descriptor to record them

    def usage(self) -> Usage:
        return Usage(self.limit, self.used, self.reserved, self.free, self.root_reserve,
                     self.available, self.inode_limit, self.inodes_used, self.enospc_count)


@dataclass(frozen=True, eq=False)
class Event(Document):
    """A quota ENOSPC or a fired fault, as recorded (request "events")."""

    seq: int
    time: float
    kind: str  # "quota" for an ENOSPC from the quota, "fault" for an injected fault
    op: str
    path: str
    errno: str | None  # the errno answered, if any
    effect: str  # "ENOSPC (quota)", "errno EIO", "delay 200ms", "short-write 4096", ...
    rule: str | None  # the fault rule that fired
    pid: int | None  # the caller, where FUSE tells it (not for read/write/flush/fsync)


LOST_KINDS = ("data", "size", "created", "removed", "renamed", "torn", "kept")
CRASH_MODELS = ("posix", "ext4")


@dataclass(frozen=True, eq=False)
class LostItem(Document):
    """One thing a power cut reverted (or, for "torn" and "kept", let survive in part):
    kind is one of LOST_KINDS (docs/crash.md says what each means)."""

    path: str
    kind: str
    bytes: int


@dataclass(frozen=True, eq=False)
class CrashReport(Document):
    """The outcome of request "crash" (`quotafs crash --json`, QuotaMount.crash)."""

    model: str  # "posix" or "ext4"
    torn: bool
    keep_fraction: float
    seed: int  # the seed the cut's random choices used
    lost: tuple[LostItem, ...]
    lost_bytes: int  # bytes of unsynced writes reverted (torn writes: the part cut off)
    lost_names: int  # namespace changes undone (created, removed, renamed)
    crashes: int  # power cuts of this mount so far, this one included

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping) or not isinstance(data.get("lost"), list):
            raise ProtocolError(cls._what(), "no list of lost items")
        fields: dict[str, Any] = dict(data)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in fields]
        if missing:
            raise ProtocolError(cls._what(), "no " + ", ".join(missing))
        fields["lost"] = tuple(LostItem.from_dict(item) for item in data["lost"])
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["lost"] = [item.to_dict() for item in self.lost]
        return out


@dataclass(frozen=True, eq=False)
class RuleStatus(Document):
    """A fault rule with its counters (an entry of `quotafs fault list --json`): the
    rule's fields as in a rules file, then id, effective_seed and the counters."""

    id: str
    spec: RuleSpec
    effective_seed: int
    matched: int  # requests that matched op and path
    fired: int  # requests the effect was applied to
    shadowed: int  # eligible, but an earlier rule fired for the same request
    retired: bool  # can never fire again
    warnings: tuple[str, ...]
    written: int | None = None  # bytes counted toward after_bytes (such rules only)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise ProtocolError(cls._what(), f"not a JSON object: {type(data).__name__}")
        missing = [k for k in STATUS_KEYS if k not in data and k != "written"]
        if missing:
            raise ProtocolError(cls._what(), "no " + ", ".join(missing))
        return cls(id=data["id"], spec=RuleSpec.from_dict(data, allow_status=True),
                   effective_seed=data["effective_seed"], matched=data["matched"],
                   fired=data["fired"], shadowed=data["shadowed"], retired=data["retired"],
                   warnings=_frozen(data["warnings"]), written=data.get("written"))

    def to_dict(self) -> dict[str, Any]:
        """As model.faults.Rule.to_dict() makes it in the daemon."""
        out: dict[str, Any] = {"id": self.id, **self.spec.to_dict(),
                               "effective_seed": self.effective_seed, "matched": self.matched,
                               "fired": self.fired, "shadowed": self.shadowed,
                               "retired": self.retired}
        if self.written is not None:
            out["written"] = self.written
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True, eq=False)
class FaultListing(Document):
    """A mount's fault rules (request "faults", `quotafs fault list --json`)."""

    seed: int
    rules: tuple[RuleStatus, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping) or not isinstance(data.get("rules"), list):
            raise ProtocolError(cls._what(), "no list of rules")
        if "seed" not in data:
            raise ProtocolError(cls._what(), "no seed")
        return cls(seed=data["seed"],
                   rules=tuple(RuleStatus.from_dict(rule) for rule in data["rules"]))

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rules": [rule.to_dict() for rule in self.rules]}


@dataclass(frozen=True, eq=False)
class RuleAdded(Document):
    """The outcome of request "fault.add" (`quotafs fault add --json`)."""

    id: str
    effective_seed: int
    warnings: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Limits(Document):
    """The outcome of request "set": the settings in effect after it."""

    limit: int | None
    inodes: int | None
    reserve: int
