"""The control channel's protocol: extended attribute names on a mount's root, and the
typed documents they carry. The daemon (quotafs.daemon.control) serves them, the client
(quotafs.client.control) asks for them; neither pyfuse3 nor trio is imported here.

    getxattr(MOUNT, "user.quotafs.status")          -> Status (JSON)
    getxattr(MOUNT, "user.quotafs.events[.SEQ]")    -> Events after SEQ, one JSON line each
    getxattr(MOUNT, "user.quotafs.faults[.N]")      -> FaultListing page: rules after rN
    getxattr(MOUNT, "user.quotafs.result")          -> outcome of this process's last set
    setxattr(MOUNT, "user.quotafs.set", JSON)       -> Limits
    setxattr(MOUNT, "user.quotafs.fault.add", JSON) -> RuleAdded
    setxattr(MOUNT, "user.quotafs.fault.clear", JSON) -> {"cleared": N}
    setxattr(MOUNT, "user.quotafs.forget", "{}")    -> {"entries": N} (for tests)

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

PREFIX = b"user.quotafs."
STATUS = PREFIX + b"status"
EVENTS = PREFIX + b"events"
FAULTS = PREFIX + b"faults"
RESULT = PREFIX + b"result"
SET = PREFIX + b"set"
FAULT_ADD = PREFIX + b"fault.add"
FAULT_CLEAR = PREFIX + b"fault.clear"
FORGET = PREFIX + b"forget"

XATTR_SIZE_MAX = 65536  # the kernel's limit of one xattr value: one page of a listing
# An event's path is cut here (with a marker): a JSON line of its event, even with every
# character escaped as \uXXXX, then fits an xattr value (a page of events). PATH_MAX.
MAX_EVENT_PATH = 4096


# -- paging: "LISTING.N" asks for the entries after N --------------------------------------

def page_name(listing: bytes, after: int) -> bytes:
    """The name that asks `listing` (EVENTS, FAULTS) for its entries after `after`."""
    return listing + b"." + str(after).encode()


def page_after(name: bytes, listing: bytes) -> int | None:
    """N of "LISTING.N" (0 for "LISTING"); None if `name` is not of `listing`.
    ValueError if it is, with a suffix that is not a number."""
    if name == listing:
        return 0
    if not name.startswith(listing + b"."):
        return None
    after = name[len(listing) + 1:]
    if not after.isdigit():
        raise ValueError(f"not a page of {listing.decode()}: {name.decode(errors='replace')}")
    return int(after)


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
    """The status document ("user.quotafs.status", `quotafs status --json`)."""

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

    def usage(self) -> Usage:
        return Usage(self.limit, self.used, self.reserved, self.free, self.root_reserve,
                     self.available, self.inode_limit, self.inodes_used, self.enospc_count)


@dataclass(frozen=True, eq=False)
class Event(Document):
    """A quota ENOSPC or a fired fault, as recorded ("user.quotafs.events", one a line)."""

    seq: int
    time: float
    kind: str  # "quota" for an ENOSPC from the quota, "fault" for an injected fault
    op: str
    path: str
    errno: str | None  # the errno answered, if any
    effect: str  # "ENOSPC (quota)", "errno EIO", "delay 200ms", "short-write 4096", ...
    rule: str | None  # the fault rule that fired
    pid: int | None  # the caller, where FUSE tells it (not for read/write/flush/fsync)


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
    """A mount's fault rules, all pages joined (`quotafs fault list --json`)."""

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
    """The outcome of "user.quotafs.fault.add" (`quotafs fault add --json`)."""

    id: str
    effective_seed: int
    warnings: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Limits(Document):
    """The outcome of "user.quotafs.set": the settings in effect after it."""

    limit: int | None
    inodes: int | None
    reserve: int
