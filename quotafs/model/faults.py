"""Fault rules: (op, path, triggers) -> errno / delay / short write / corrupt read / crash — pure.

No FUSE and no syscalls here: the FUSE handlers ask `FaultEngine.check(op, path)` before
doing the real work and apply the `Effect` it returns; the write handler reports what
it wrote with `FaultEngine.note_written(path, nbytes)`. docs/faults.md is the user's
reference; this docstring is the implementer's.

Rules
    A `RuleSpec` is a validated, immutable description: ops, an optional path glob,
    exactly one effect (with its modifiers: a crash's model, torn and keep fraction;
    drop-unsynced on an fsync errno) and any number of triggers. Every way in — CLI options
    (`spec_from_args`), TOML rule files (`load_rules_toml`), control-channel dicts
    (`RuleSpec.from_dict`) — goes through one validator, so the three accept the same
    rules and word their errors the same way. Errors are QuotafsError(USAGE), one line,
    naming the rule and the field; doubtful but legal rules (an errno the operation never
    returns per its man page, ENOSPC-style errors on release, ...) give warnings instead.

Matching
    A request matches a rule when the rule is not retired, its op is one of the rule's
    ops (or the rule says "all") and, if the rule has a glob, the glob matches the path
    (or the second path of rename/link). Glob syntax, against "/"-prefixed paths
    relative to the mount root: `*` any run of characters within one segment, `?` one
    character, `[abc]`/`[!abc]` a class, all not crossing "/"; a `**` segment matches
    zero or more whole segments ("/a/**" is /a and everything below it, "/**/x" is x at
    any depth). A pattern with no "/" matches the basename at any depth ("*.log").
    A short-write rule only matches writes longer than its byte count (a shorter write
    could not be shortened). An `allocating` rule (op write only) matches only write
    requests that newly allocate blocks (in apparent mode: that grow the charge); the
    caller works that out only while such a rule is live (`FaultEngine.wants_allocation`)
    and passes it to check(). A drop-unsynced rule (op fsync only) matches only an fsync
    of a file with writes not yet durable (`FaultEngine.wants_unsynced`, `unsynced`):
    a writeback error needs something to write back, so the fsync after it succeeds.

Triggers and firing
    Each matching request increments `matched` and, if the rule has a probability,
    takes exactly one draw from the rule's own `random.Random` — whatever the other
    triggers say — so the firing pattern depends only on the seed and the sequence of
    matching requests. The rule is *eligible* when all of its triggers hold:
    probability (draw < P), nth (this is the Nth match), from-nth (this is the Nth match
    or a later one), after-bytes (at least SIZE
    bytes were written, since the rule was added, through the mount or to paths its
    glob matches). Every rule evaluates every request (so one rule's counters and draws
    never depend on another rule); of the eligible rules the first in insertion order
    fires and the others count the request as `shadowed`. A rule retires when it can
    never fire again: `times` firings done, or its nth match passed.

Seeds
    The engine has a seed (given, or 32 random bits from os.urandom) that the CLI
    prints. A rule without its own seed uses one derived from the engine seed and its
    id; `Rule.effective_seed` shows it, so any rule can be replayed alone with --seed.

The engine is not thread-safe: call it from the trio loop, which is single-threaded.
"""

from __future__ import annotations

import difflib
import errno as errno_mod
import hashlib
import os
import random
import re
import shlex
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args

from quotafs.errors import ExitCode, QuotafsError, errno_name
from quotafs.units import parse_size

__all__ = [
    "ALL_OPS",
    "CRASH_MODELS",
    "EFFECT_KEYS",
    "OPS",
    "PLAUSIBLE_ERRNOS",
    "CrashCut",
    "Effect",
    "EffectKind",
    "FaultEngine",
    "FaultStats",
    "Rule",
    "RuleFile",
    "RuleSpec",
    "compile_glob",
    "flip_one_bit",
    "format_duration",
    "load_rules_file",
    "load_rules_toml",
    "parse_duration",
    "spec_from_args",
]

# The operations a rule can name, in the order the docs list them. "truncate" is a
# setattr that changes the size: the FUSE layer reports those as "truncate", not setattr.
OPS: tuple[str, ...] = (
    "lookup", "getattr", "setattr", "truncate", "open", "create", "read", "write", "flush",
    "fsync", "release", "mkdir", "rmdir", "unlink", "rename", "link", "symlink", "readlink",
    "mknod", "opendir", "readdir", "fsyncdir", "statfs", "getxattr", "setxattr", "listxattr",
    "removexattr", "access",
)
ALL_OPS = "all"
_OP_SET = frozenset(OPS)

EffectKind = Literal["errno", "delay", "short_write", "corrupt_read", "crash"]
EFFECT_KEYS: tuple[EffectKind, ...] = get_args(EffectKind)
TRIGGER_KEYS = ("probability", "seed", "after_bytes", "nth", "from_nth", "times")
# Conditions narrow what a rule matches (beyond op and path).
CONDITION_KEYS = ("allocating",)
# Modifiers refine an effect: how a crash cuts (crash only); an fsync errno that also
# drops the file's unsynced writes, as ext4 does after a failed writeback (errno only).
MODIFIER_KEYS = ("crash_model", "crash_torn", "crash_keep_fraction", "drop_unsynced")
SPEC_KEYS = ("op", "path", *CONDITION_KEYS, *EFFECT_KEYS, *MODIFIER_KEYS, *TRIGGER_KEYS)
CRASH_MODELS = ("posix", "ext4")  # as protocol.CRASH_MODELS and `quotafs crash --model`
DEFAULT_CRASH_MODEL = "posix"
# What only a mount with --crash-sim can do (the daemon refuses such rules elsewhere).
NEEDS_CRASH_SIM = ("the mount is not mounted with --crash-sim (only then does it record "
                   "what is durable)")
DROP_UNSYNCED_OPS = ("fsync",)  # fsync(2) and fdatasync(2): FUSE sends both as FSYNC
# Keys Rule.to_dict() adds to the spec's; RuleSpec.from_dict(..., allow_status=True) skips them.
STATUS_KEYS = ("id", "effective_seed", "matched", "fired", "shadowed", "retired", "written",
               "warnings")

MAX_COUNT = 2**63 - 1  # nth, times, sizes: what 64-bit counters hold
MAX_SEED = 2**64 - 1  # seeds: any 64 bits
MAX_DELAY_US = 3600 * 1_000_000  # one hour: longer would only look like a hung mount
_SEED_BITS = 32


# -- effects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrashCut:
    """How a crash rule cuts the power: the arguments of the mount's CrashSim.cut (and of
    `quotafs crash`), the seed drawn per firing from the rule's generator."""

    model: str = DEFAULT_CRASH_MODEL
    torn: bool = False
    keep_fraction: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        """"crash posix", "crash ext4 torn keep 0.25" (the seed is in the event's rule)."""
        words = ["crash", self.model]
        if self.torn:
            words.append("torn")
        if self.keep_fraction:
            words.append(f"keep {self.keep_fraction:g}")
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class Effect:
    """What a fired rule asks the handler to do.

    kind         value
    errno        the errno number: raise FUSEError(value)
    delay        microseconds: await trio.sleep(effect.seconds), then serve the request
    short_write  bytes: write only buf[:value] and return value (< len(buf) if check got size)
    corrupt_read a token: serve the read, then return effect.corrupt(data)
    crash        the cut's seed: cut the power (effect.cut says how), answer EIO
    errno with drop_unsynced: revert the file's unsynced writes to its last sync, then
                 raise the errno (ext4 after a failed writeback; the next fsync succeeds)
    """

    kind: EffectKind
    value: int
    rule_id: str
    cut: CrashCut | None = None  # crash effects only
    drop_unsynced: bool = False  # errno effects on fsync only

    @property
    def seconds(self) -> float:
        """The delay in seconds (delay effects)."""
        return self.value / 1_000_000

    def corrupt(self, data: bytes) -> bytes:
        """`data` with one bit flipped, at a position fixed by this effect's token."""
        if self.kind != "corrupt_read":
            raise ValueError(f"corrupt() on a {self.kind} effect")
        return flip_one_bit(data, random.Random(self.value))

    def describe(self) -> str:
        """One short human phrase, e.g. "errno EIO", "delay 200ms", "short-write 4096",
        "crash ext4", "errno EIO, unsynced writes dropped"."""
        if self.kind == "errno":
            dropped = ", unsynced writes dropped" if self.drop_unsynced else ""
            return f"errno {errno_name(self.value)}{dropped}"
        if self.cut is not None:
            return self.cut.describe()
        if self.kind == "delay":
            return f"delay {format_duration(self.value)}"
        if self.kind == "short_write":
            return f"short-write {self.value}"
        return "corrupt-read"


def flip_one_bit(data: bytes, rng: random.Random) -> bytes:
    """Return `data` with exactly one bit flipped at rng.randrange(8 * len(data)).

    Empty data comes back unchanged (and consumes no randomness).
    """
    if not data:
        return data
    position = rng.randrange(len(data) * 8)
    out = bytearray(data)
    out[position >> 3] ^= 1 << (position & 7)
    return bytes(out)


# -- durations ----------------------------------------------------------------------------

_DURATION_RE = re.compile(r"([0-9]{1,30}(?:\.[0-9]{1,30})?)(us|µs|ms|s)")
_DURATION_UNITS = {"us": 1, "µs": 1, "ms": 1000, "s": 1_000_000}


def parse_duration(text: str) -> int:
    """"200ms", "2s", "1.5s", "500us" -> microseconds. Strict: a unit is required, no
    spaces or signs, a whole number of microseconds, at most one hour. ValueError if not."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use a number with us, ms or s, "
                         "e.g. 500us, 200ms, 1.5s")
    try:
        value = Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
        raise ValueError(f"invalid duration {text!r}") from exc
    if value != value.to_integral_value():
        raise ValueError(f"invalid duration {text!r}: not a whole number of microseconds")
    if value > MAX_DELAY_US:
        raise ValueError(f"invalid duration {text!r}: at most 1 hour (3600s)")
    return int(value)


def format_duration(us: int) -> str:
    """Microseconds -> the shortest exact text parse_duration reads back: 2s, 200ms, 500us."""
    if us % 1_000_000 == 0:
        return f"{us // 1_000_000}s"
    if us % 1000 == 0:
        return f"{us // 1000}ms"
    return f"{us}us"


# -- globs --------------------------------------------------------------------------------


def _segment_regex(segment: str) -> str:
    """One path segment's glob (no "/", not "**") as a regex that never crosses "/"."""
    out: list[str] = []
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch == "*":
            if segment.startswith("**", i):
                raise ValueError('"**" must be a whole path segment, as in "/a/**/b" or "/**"')
            out.append(_ANY_CHARS)
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            j = i + 1
            if j < len(segment) and segment[j] in "!^":
                j += 1
            if j < len(segment) and segment[j] == "]":
                j += 1  # a ] right after [ or [! is a literal ]
            end = segment.find("]", j)
            if end < 0:
                raise ValueError("unclosed [ in pattern (use [[] for a literal [)")
            body = segment[i + 1:end]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            if "--" in body:
                raise ValueError("-- in a [...] class: write - first or last in the class")
            chars = "".join(c if c == "-" and 0 < k < len(body) - 1 else re.escape(c)
                            for k, c in enumerate(body))
            out.append(f"[^/{chars}]" if negate else f"[{chars}]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return _chunks_regex(out, _ANY_CHARS, "")


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a rule's path glob to a regex to fullmatch against a mount path.

    Match paths as the engine does: "/"-prefixed, no trailing "/", and the root itself
    as "" (FaultEngine.check does that conversion). ValueError explains a bad pattern.

    The regex never backtracks across a wildcard it has passed, so a match costs time
    linear in the path's length times the pattern's (a naive translation of "/**/**/x" or
    "*a*a*a*b" is exponential: one stat took 21.8 s). Both levels are the classic
    wildcard problem: `*` over characters, `**` over whole segments, between chunks that
    consume a fixed number of characters (segments); placing each middle chunk at its
    leftmost fit is always right, so it is searched lazily inside an atomic group.
    """
    if not pattern:
        raise ValueError("empty pattern")
    if "\0" in pattern:
        raise ValueError("NUL byte in pattern")
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"longer than {MAX_PATTERN} characters")
    if pattern == "**":
        pattern = "/**"
    if "/" not in pattern:
        # A basename pattern: the last segment of a path at any depth (never the root).
        return _compile(_chunks_regex([_ANY_SEGMENTS, "/" + _segment_regex(pattern)],
                                      _ANY_SEGMENTS, _SEGMENT_END))
    if not pattern.startswith("/"):
        raise ValueError(f"a pattern with a / must start with /, e.g. /{pattern} "
                         f"or /**/{pattern}")
    if pattern == "/":
        return re.compile("")
    if pattern.endswith("/"):
        raise ValueError(f"must not end with /: use {pattern.rstrip('/')} for the directory "
                         f"or {pattern}** for it and everything below it")
    parts: list[str] = []
    for segment in pattern[1:].split("/"):
        if segment in ("", ".", ".."):
            raise ValueError("empty, . or .. path segment (write paths as /dir/name)")
        parts.append(_ANY_SEGMENTS if segment == "**" else "/" + _segment_regex(segment))
    return _compile(_chunks_regex(parts, _ANY_SEGMENTS, _SEGMENT_END))


MAX_PATTERN = 4096  # PATH_MAX: a longer glob matches no path a request can name
_ANY_SEGMENTS = "(?:/[^/]++)*"  # a "**" segment; possessive: a segment is never split
_ANY_CHARS = "[^/]*"  # a "*" within a segment
_SEGMENT_END = "(?=/|\\Z)"  # a segment's pattern ends where the path's segment does


def _chunks_regex(items: list[str], star: str, end: str) -> str:
    """Join fixed-width items and `star` wildcards into a regex without catastrophic
    backtracking: the items between two stars are found at their leftmost fit and
    committed ((?>...)); the last run is anchored at the end by plain backtracking over
    the last star alone. `end` follows every item (the chunk must end on a boundary)."""
    runs: list[list[str]] = [[]]  # items between stars; runs[0] before the first star
    for item in items:
        if item == star:
            runs.append([])
        else:
            runs[-1].append(item + end)
    out = "".join(runs[0])
    if len(runs) == 1:
        return out
    lazy = star[:-1] + "*?" if star.endswith("*") else star
    for run in runs[1:-1]:
        if run:  # consecutive stars are one star
            out += f"(?>{lazy}{''.join(run)})"
    return out + star + "".join(runs[-1])


_GLOB_CHARS = frozenset("*?[]!^\\{}")


def _literal_prefix(pattern: str | None) -> tuple[tuple[str, ...], bool] | None:
    """The leading path segments of a glob that hold no wildcard, and whether more
    segments follow; None when the glob can match below any directory (no path, a
    basename pattern, or one starting with a wildcard segment such as /**)."""
    if pattern is None or not pattern.startswith("/"):
        return None
    if pattern == "/":
        return (), False
    segments = pattern[1:].split("/")
    literal: list[str] = []
    for segment in segments:
        if _GLOB_CHARS & set(segment):
            break
        literal.append(segment)
    if not literal:
        return None
    return tuple(literal), len(literal) < len(segments)


def _compile(regex: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as exc:  # e.g. a reversed range [z-a]
        raise ValueError(f"invalid [...] class: {exc.msg}") from None


# -- plausible errnos per operation (from the syscalls' man pages) -------------------------


def _errnos(*names: str) -> frozenset[int]:
    return frozenset(getattr(errno_mod, name) for name in names)


# Any request can be interrupted (EINTR) or fail in the backing store (EIO, ENOMEM).
_ANY = _errnos("EIO", "EINTR", "ENOMEM")
_PATH = _ANY | _errnos("EACCES", "EFAULT", "ELOOP", "ENAMETOOLONG", "ENOENT", "ENOTDIR",
                       "EBADF")
_FD = _ANY | _errnos("EBADF", "EFAULT")
_CREATE_PATH = _PATH | _errnos("EDQUOT", "EEXIST", "ENOSPC", "EPERM", "EROFS", "EINVAL")
_OPEN = _CREATE_PATH | _errnos("EAGAIN", "EBUSY", "EFBIG", "EISDIR", "EMFILE", "ENFILE",
                               "ENODEV", "ENXIO", "EOPNOTSUPP", "EOVERFLOW", "ETXTBSY",
                               "EWOULDBLOCK")
_SYNC = _FD | _errnos("EDQUOT", "EINVAL", "ENOSPC", "EROFS")
_XATTR = _PATH | _errnos("E2BIG", "ENOTSUP", "EOPNOTSUPP", "ERANGE", "EPERM")
# The errnos each op can return per its man pages (a rule giving another gets a warning).
PLAUSIBLE_ERRNOS: dict[str, frozenset[int]] = {
    "lookup": _PATH | _errnos("EOVERFLOW"),
    "getattr": _PATH | _errnos("EOVERFLOW"),
    "setattr": _PATH | _errnos("EPERM", "EROFS", "EINVAL", "EDQUOT"),
    "truncate": _PATH | _errnos("EFBIG", "EINVAL", "EISDIR", "EPERM", "EROFS", "ETXTBSY"),
    "open": _OPEN,
    "create": _OPEN,
    "read": _FD | _errnos("EAGAIN", "EWOULDBLOCK", "EINVAL", "EISDIR", "EOVERFLOW", "ENXIO",
                          "ESPIPE"),
    "write": _FD | _errnos("EAGAIN", "EWOULDBLOCK", "EDQUOT", "EFBIG", "EINVAL", "ENOSPC",
                           "EPERM", "EPIPE", "EOVERFLOW", "ENXIO", "ESPIPE", "EDESTADDRREQ"),
    "flush": _SYNC,
    "fsync": _SYNC,
    "release": _SYNC,
    "mkdir": _CREATE_PATH | _errnos("EMLINK"),
    "rmdir": _PATH | _errnos("EBUSY", "EEXIST", "EINVAL", "ENOTEMPTY", "EPERM", "EROFS"),
    "unlink": _PATH | _errnos("EBUSY", "EINVAL", "EISDIR", "EPERM", "EROFS"),
    "rename": _CREATE_PATH | _errnos("EBUSY", "EISDIR", "EMLINK", "ENOTEMPTY", "EXDEV"),
    "link": _CREATE_PATH | _errnos("EMLINK", "EXDEV"),
    "symlink": _CREATE_PATH,
    "readlink": _PATH | _errnos("EINVAL"),
    "mknod": _CREATE_PATH,
    "opendir": _PATH | _errnos("EMFILE", "ENFILE"),
    "readdir": _FD | _errnos("EINVAL", "ENOENT", "ENOTDIR", "EOVERFLOW"),
    "fsyncdir": _SYNC,
    "statfs": _PATH | _errnos("ENOSYS", "EOVERFLOW"),
    "getxattr": _XATTR | _errnos("ENODATA"),
    "setxattr": _XATTR | _errnos("EDQUOT", "EEXIST", "ENODATA", "ENOSPC", "EROFS"),
    "listxattr": _XATTR,
    "removexattr": _XATTR | _errnos("ENODATA", "EROFS"),
    "access": _PATH | _errnos("EINVAL", "EPERM", "EROFS", "ETXTBSY"),
}
assert set(PLAUSIBLE_ERRNOS) == _OP_SET


def _errno_warnings(ops: tuple[str, ...], number: int, name: str) -> list[str]:
    warnings: list[str] = []
    if ops == (ALL_OPS,):
        if not any(number in allowed for allowed in PLAUSIBLE_ERRNOS.values()):
            warnings.append(f"no filesystem operation returns {name} per the man pages; "
                            "programs may not expect it")
    else:
        never = [op for op in ops if number not in PLAUSIBLE_ERRNOS[op]]
        if never:
            warnings.append(f"{name} is not an error {', '.join(never)} can return per "
                            "the man pages; programs may not expect it")
    if "release" in ops or ops == (ALL_OPS,):
        warnings.append("the kernel ignores errors from release: no program ever sees "
                        "them (use flush to fail close(2))")
    if number == errno_mod.ENOSYS:
        warnings.append("ENOSYS tells the FUSE kernel module the operation is not "
                        "implemented: for flush, fsync, fsyncdir, access, create and the "
                        "xattr operations it stops asking for the rest of the mount and "
                        "the program sees success or another error, not ENOSYS")
    return warnings


# -- rule specs and validation ------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    """A validated rule, as written by the user. Build it with spec_from_args,
    load_rules_toml or RuleSpec.from_dict; exactly one of the effect fields is set.

    ops is a tuple of names from OPS in OPS order, or ("all",). errno is the errno name
    (upper case, as given: EWOULDBLOCK stays EWOULDBLOCK); delay_us microseconds.
    crash_model, crash_torn and crash_keep_fraction are set with crash only (the model
    then always, "posix" by default); drop_unsynced with an errno on op fsync only.
    """

    ops: tuple[str, ...]
    path: str | None = None
    allocating: bool = False
    errno: str | None = None
    delay_us: int | None = None
    short_write: int | None = None
    corrupt_read: bool = False
    crash: bool = False
    crash_model: str | None = None
    crash_torn: bool = False
    crash_keep_fraction: float | None = None
    drop_unsynced: bool = False
    probability: float | None = None
    seed: int | None = None
    after_bytes: int | None = None
    nth: int | None = None
    from_nth: int | None = None
    times: int | None = None

    @property
    def effect(self) -> EffectKind:
        if self.errno is not None:
            return "errno"
        if self.delay_us is not None:
            return "delay"
        if self.short_write is not None:
            return "short_write"
        if self.crash:
            return "crash"
        return "corrupt_read"

    @property
    def needs_crash_sim(self) -> bool:
        """A crash or drop-unsynced rule: only a --crash-sim mount can act on it."""
        return self.crash or self.drop_unsynced

    def crash_cut(self, seed: int) -> CrashCut:
        """The cut a crash rule makes when it fires, with that firing's seed."""
        return CrashCut(self.crash_model or DEFAULT_CRASH_MODEL, self.crash_torn,
                        self.crash_keep_fraction or 0.0, seed)

    @property
    def effect_value(self) -> int:
        """The Effect.value this rule produces (corrupt_read, crash: 0, tokens and seeds
        come per firing)."""
        if self.errno is not None:
            return int(getattr(errno_mod, self.errno))
        if self.delay_us is not None:
            return self.delay_us
        if self.short_write is not None:
            return self.short_write
        return 0

    def warnings(self) -> list[str]:
        """Doubts about a legal rule, one sentence each (not prefixed with the rule)."""
        out: list[str] = []
        if self.errno is not None:
            out += _errno_warnings(self.ops, self.effect_value, self.errno)
        if self.probability == 0:
            out.append("probability 0: the rule never fires")
        if "access" in self.ops:
            out.append("access: quotafs mounts with default_permissions, so the kernel checks "
                       "permissions itself and never sends access requests")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able dict with the same keys as a [[rule]] table; unset
        triggers are left out. RuleSpec.from_dict(spec.to_dict()) == spec."""
        out: dict[str, Any] = {"op": list(self.ops)}
        if self.path is not None:
            out["path"] = self.path
        if self.allocating:
            out["allocating"] = True
        if self.errno is not None:
            out["errno"] = self.errno
        if self.delay_us is not None:
            out["delay"] = format_duration(self.delay_us)
        if self.short_write is not None:
            out["short_write"] = self.short_write
        if self.corrupt_read:
            out["corrupt_read"] = True
        if self.crash:
            out["crash"] = True
            out["crash_model"] = self.crash_model
        if self.crash_torn:
            out["crash_torn"] = True
        if self.crash_keep_fraction is not None:
            out["crash_keep_fraction"] = self.crash_keep_fraction
        if self.drop_unsynced:
            out["drop_unsynced"] = True
        for key in TRIGGER_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, allow_status: bool = False,
                  where: str = "rule") -> RuleSpec:
        """Validate a dict as a [[rule]] table is validated (None values mean "absent",
        for JSON). With allow_status the keys Rule.to_dict() adds are ignored."""
        if not isinstance(data, Mapping):
            raise _Where(where).error(None, f"must be a table of fields, got {_show(data)}")
        values = {k: v for k, v in data.items() if v is not None
                  and not (allow_status and k in STATUS_KEYS)}
        return _validate(values, _Where(where))

    def describe(self) -> str:
        """The rule as quotafs fault add options, e.g. "--op fsync --errno EIO --times 1"."""
        words = ["--op", ",".join(self.ops)]
        if self.path is not None:
            words += ["--path", self.path]
        if self.allocating:
            words.append("--allocating")
        if self.errno is not None:
            words += ["--errno", self.errno]
        if self.delay_us is not None:
            words += ["--delay", format_duration(self.delay_us)]
        if self.short_write is not None:
            words += ["--short-write", str(self.short_write)]
        if self.corrupt_read:
            words.append("--corrupt-read")
        if self.crash:
            words += ["--crash", "--crash-model", self.crash_model or DEFAULT_CRASH_MODEL]
        if self.crash_torn:
            words.append("--crash-torn")
        if self.crash_keep_fraction is not None:
            words += ["--crash-keep-fraction", str(self.crash_keep_fraction)]
        if self.drop_unsynced:
            words.append("--drop-unsynced")
        for key in TRIGGER_KEYS:
            value = getattr(self, key)
            if value is not None:
                words += [f"--{key.replace('_', '-')}", str(value)]
        return shlex.join(words)


class _Where:
    """How errors name their place: 'rule 2: field "x": ...' or '--x: ...' (CLI)."""

    def __init__(self, prefix: str | None, *, cli: bool = False) -> None:
        self.prefix = prefix
        self.cli = cli

    def name(self, key: str) -> str:
        return f"--{key.replace('_', '-')}" if self.cli else f'field "{key}"'

    def error(self, key: str | None, message: str) -> QuotafsError:
        parts = [p for p in (self.prefix, self.name(key) if key else None) if p]
        return QuotafsError(": ".join([*parts, message]), ExitCode.USAGE)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if len(value) <= 100 else f'"{value[:100]}..."'
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"a {value.bit_length()}-bit number"
    if isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def _int(values: Mapping[str, Any], key: str, where: _Where, text_ok: bool,
         minimum: int, maximum: int = MAX_COUNT) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    if text_ok and isinstance(value, str):
        if not re.fullmatch(r"-?[0-9]{1,30}", value):  # ASCII digits only, as sizes
            raise where.error(key, f"must be a whole number, got {_show(value)}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(key, f"must be a whole number, got {_show(value)}")
    if value < minimum:
        raise where.error(key, f"must be >= {minimum}, got {_show(value)}")
    if value > maximum:
        bound = "2^64-1" if maximum == MAX_SEED else "2^63-1"
        raise where.error(key, f"must be at most {bound}, got {_show(value)}")
    return value


def _size(values: Mapping[str, Any], key: str, where: _Where) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_size(value)
        except QuotafsError as exc:
            raise where.error(key, str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(key, f'must be a size such as 4096 or "4K", got {_show(value)}')
    if value < 0:
        raise where.error(key, f"must be >= 0, got {_show(value)}")
    if value > MAX_COUNT:
        raise where.error(key, f"must be at most 2^63-1, got {_show(value)}")
    return value


def _ops(value: object, where: _Where) -> tuple[str, ...]:
    if value is None:
        raise where.error("op", f'missing: name one or more operations, e.g. "fsync", '
                                f'or "{ALL_OPS}"')
    items: list[object]
    if isinstance(value, str):
        items = list(value.split(","))
    elif isinstance(value, list | tuple):
        items = []
        for item in value:
            items += item.split(",") if isinstance(item, str) else [item]
    else:
        raise where.error("op", f"must be an operation name or a list of them, got "
                                f"{_show(value)}")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise where.error("op", f"must be operation names, got {_show(item)}")
        name = item.strip().lower()
        if name != ALL_OPS and name not in _OP_SET:
            close = difflib.get_close_matches(name, [*OPS, ALL_OPS], n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise where.error("op", f'unknown operation "{item.strip()}"{hint} (known: '
                                    f"{', '.join(OPS)}, or {ALL_OPS})")
        names.append(name)
    if not names:
        raise where.error("op", "empty: name one or more operations")
    if ALL_OPS in names:
        if len(set(names)) > 1:
            raise where.error("op", f'"{ALL_OPS}" cannot be combined with other operations')
        return (ALL_OPS,)
    chosen = set(names)
    return tuple(op for op in OPS if op in chosen)


def _validate(values: Mapping[str, Any], where: _Where, *, text_ok: bool = False) -> RuleSpec:
    """The one validator behind the CLI, rule files and the control channel.

    text_ok: numbers may come as text (CLI arguments); rule files must use TOML types.
    """
    for key in values:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key).replace("-", "_"), SPEC_KEYS, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise where.error(str(key), f"unknown field{hint} (known: {', '.join(SPEC_KEYS)})")

    ops = _ops(values.get("op"), where)

    path = values.get("path")
    if path is not None:
        if not isinstance(path, str):
            raise where.error("path", f'must be a glob such as "/logs/*.log", got {_show(path)}')
        try:
            compile_glob(path)
        except ValueError as exc:
            raise where.error("path", f"bad pattern {_show(path)}: {exc}") from None

    given = [key for key in EFFECT_KEYS if key in values]
    if not given:
        names = (", ".join(f"--{k.replace('_', '-')}" for k in EFFECT_KEYS) if where.cli
                 else "the fields " + ", ".join(EFFECT_KEYS))
        raise where.error(None, f"no effect: give exactly one of {names}")
    if len(given) > 1:
        flags = [f"--{k.replace('_', '-')}" if where.cli else f'"{k}"' for k in given]
        both = ("options " if where.cli else "fields ") + " and ".join(flags)
        raise where.error(None, f"{both}: a rule has exactly one effect (errno, delay, "
                                "short_write, corrupt_read or crash)")
    effect = given[0]

    errno_name: str | None = None
    delay_us: int | None = None
    short_write: int | None = None
    corrupt_read = False
    value = values[effect]
    if effect == "errno":
        if not isinstance(value, str):
            raise where.error("errno", f'must be an errno name such as "EIO", got {_show(value)}')
        errno_name = value.strip().upper()
        if not (errno_name.startswith("E") and isinstance(getattr(errno_mod, errno_name, None),
                                                          int)):
            close = difflib.get_close_matches(errno_name, sorted(errno_mod.errorcode.values()),
                                              n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise where.error("errno", f"unknown errno name {_show(value)}{hint} (e.g. EIO, "
                                       "ENOSPC, EDQUOT, EROFS, EINTR)")
    elif effect == "delay":
        if not isinstance(value, str):
            raise where.error("delay", f'must be a duration such as "200ms", got {_show(value)}')
        try:
            delay_us = parse_duration(value)
        except ValueError as exc:
            raise where.error("delay", str(exc)) from None
    elif effect == "short_write":
        short_write = _size(values, "short_write", where)
        if short_write == 0:
            # 0 bytes stored of a write is no short write: the kernel would take it as
            # "no space" (ENOSPC, counted as a quota hit that never was).
            raise where.error("short_write", "must be at least 1 byte, got 0")
        if ops != ("write",):
            raise where.error("short_write", 'only valid with op "write" alone, got op '
                                             f'"{",".join(ops)}"')
    elif effect == "corrupt_read":
        if value is not True:
            raise where.error("corrupt_read", f"must be true (leave it out for no "
                                              f"corruption), got {_show(value)}")
        corrupt_read = True
        if ops != ("read",):
            raise where.error("corrupt_read", 'only valid with op "read" alone, got op '
                                              f'"{",".join(ops)}"')
    elif value is not True:
        raise where.error("crash", f"must be true (leave it out for no crash), got "
                                   f"{_show(value)}")
    crash = effect == "crash"
    crash_model, crash_torn, keep = _crash_modifiers(values, where, crash, text_ok)
    drop_unsynced = _drop_unsynced(values, where, ops, effect)

    allocating = values.get("allocating", False)
    if allocating is not False:
        if allocating is not True:
            raise where.error("allocating", f"must be true (leave it out to match every "
                                            f"write), got {_show(allocating)}")
        if ops != ("write",):
            raise where.error("allocating", 'only valid with op "write" alone, got op '
                                            f'"{",".join(ops)}"')

    nth = _int(values, "nth", where, text_ok, 1)
    from_nth = _int(values, "from_nth", where, text_ok, 1)
    if nth is not None and from_nth is not None:
        both = "options --nth and --from-nth" if where.cli else 'fields "nth" and "from_nth"'
        raise where.error(None, f"{both}: give one (the Nth match only, or the Nth and "
                                "every later one)")

    probability = _fraction(values, "probability", where, text_ok)

    return RuleSpec(
        ops=ops,
        path=path,
        allocating=allocating,
        errno=errno_name,
        delay_us=delay_us,
        short_write=short_write,
        corrupt_read=corrupt_read,
        crash=crash,
        crash_model=crash_model,
        crash_torn=crash_torn,
        crash_keep_fraction=keep,
        drop_unsynced=drop_unsynced,
        probability=probability,
        seed=_int(values, "seed", where, text_ok, 0, MAX_SEED),
        after_bytes=_size(values, "after_bytes", where),
        nth=nth,
        from_nth=from_nth,
        times=_int(values, "times", where, text_ok, 1),
    )


def _flag(values: Mapping[str, Any], key: str, where: _Where, meaning: str) -> bool:
    """An optional true-only field: absent or false is False (a CLI flag not given)."""
    value = values.get(key, False)
    if value is False:
        return False
    if value is not True:
        raise where.error(key, f"must be true (leave it out {meaning}), got {_show(value)}")
    return True


def _fraction(values: Mapping[str, Any], key: str, where: _Where,
              text_ok: bool) -> float | None:
    """A number in [0, 1] (a probability, a keep fraction); text from the CLI."""
    value = values.get(key)
    if value is None:
        return None
    if text_ok and isinstance(value, str):
        try:
            if not value.isascii():
                raise ValueError(value)  # float() takes other scripts' digits
            value = float(value)
        except ValueError:
            raise where.error(key, "must be a number between 0 and 1, got "
                                   f"{_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(key, f"must be a number between 0 and 1, got {_show(value)}")
    if not 0 <= value <= 1:  # also refuses NaN
        raise where.error(key, f"must be between 0 and 1, got {value}")
    return float(value)


def _crash_modifiers(values: Mapping[str, Any], where: _Where, crash: bool,
                     text_ok: bool) -> tuple[str | None, bool, float | None]:
    """crash_model (default posix), crash_torn, crash_keep_fraction: with crash only."""
    given = [key for key in MODIFIER_KEYS[:3] if values.get(key) not in (None, False)]
    if given and not crash:
        raise where.error(given[0], f"only valid with {where.name('crash')} (it says how "
                                    "the power cut is made)")
    if not crash:
        return None, False, None
    model = values.get("crash_model", DEFAULT_CRASH_MODEL)
    if not isinstance(model, str) or model.strip().lower() not in CRASH_MODELS:
        raise where.error("crash_model", f"must be {' or '.join(CRASH_MODELS)}, got "
                                         f"{_show(model)}")
    torn = _flag(values, "crash_torn", where, "to revert unsynced writes whole")
    return model.strip().lower(), torn, _fraction(values, "crash_keep_fraction", where,
                                                  text_ok)


def _drop_unsynced(values: Mapping[str, Any], where: _Where, ops: tuple[str, ...],
                   effect: str) -> bool:
    """drop_unsynced: an fsync (or fdatasync) errno that also drops the file's unsynced
    writes; refused with another effect or another op."""
    if not _flag(values, "drop_unsynced", where, "to keep the unsynced writes"):
        return False
    if effect != "errno":
        raise where.error("drop_unsynced", f"needs {where.name('errno')}: the error the "
                                           "failed fsync answers, e.g. EIO")
    if ops != DROP_UNSYNCED_OPS:
        raise where.error("drop_unsynced", 'only valid with op "fsync" alone (fsync and '
                                           f'fdatasync), got op "{",".join(ops)}"')
    return True


def spec_from_args(
    op: str | Sequence[str] | None,
    *,
    path: str | None = None,
    allocating: bool = False,
    errno: str | None = None,
    delay: str | None = None,
    short_write: str | int | None = None,
    corrupt_read: bool = False,
    crash: bool = False,
    crash_model: str | None = None,
    crash_torn: bool = False,
    crash_keep_fraction: str | float | None = None,
    drop_unsynced: bool = False,
    probability: str | float | None = None,
    seed: str | int | None = None,
    after_bytes: str | int | None = None,
    nth: str | int | None = None,
    from_nth: str | int | None = None,
    times: str | int | None = None,
) -> RuleSpec:
    """Build a rule from `quotafs fault add` options (strings as argparse gives them, or
    typed values); errors name the option: `--probability: must be between 0 and 1, ...`."""
    values: dict[str, Any] = {
        "op": op, "path": path, "allocating": True if allocating else None, "errno": errno,
        "delay": delay, "short_write": short_write,
        "corrupt_read": True if corrupt_read else None, "crash": True if crash else None,
        "crash_model": crash_model, "crash_torn": True if crash_torn else None,
        "crash_keep_fraction": crash_keep_fraction,
        "drop_unsynced": True if drop_unsynced else None, "probability": probability,
        "seed": seed, "after_bytes": after_bytes, "nth": nth, "from_nth": from_nth,
        "times": times,
    }
    return _validate({k: v for k, v in values.items() if v is not None}, _Where(None, cli=True),
                     text_ok=True)


# -- rule files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleFile:
    """A parsed --rules file: its optional mount seed, its rules in file order, and
    warnings already prefixed with their rule ("rule 2: ...")."""

    seed: int | None
    rules: list[RuleSpec]
    warnings: list[str] = field(default_factory=list)


def load_rules_toml(text: str, *, source: str = "rules file") -> RuleFile:
    """Parse and validate a rules file's text; QuotafsError(USAGE) names rule and field."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise QuotafsError(f"{source}: invalid TOML: {exc}", ExitCode.USAGE) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise QuotafsError(f"{source}: invalid TOML: nested too deeply", ExitCode.USAGE) from None
    top = _Where(source)
    for key in doc:
        if key not in ("seed", "rule"):
            hint = ' (each rule is a [[rule]] table)' if key in SPEC_KEYS else ""
            raise top.error(key, f'unknown field; a rules file has "seed" and [[rule]] '
                                 f"tables{hint}")
    seed = _int(doc, "seed", top, False, 0, MAX_SEED)
    tables = doc.get("rule", [])
    if isinstance(tables, dict):
        raise top.error("rule", "write each rule as [[rule]] (an array of tables), "
                                "not [rule]")
    if not isinstance(tables, list):
        raise top.error("rule", f"must be [[rule]] tables, got {_show(tables)}")
    rules: list[RuleSpec] = []
    warnings: list[str] = []
    for index, table in enumerate(tables, start=1):
        where = _Where(f"{source}: rule {index}" if source != "rules file" else f"rule {index}")
        if not isinstance(table, dict):
            raise where.error(None, f"must be a table of fields, got {_show(table)}")
        spec = _validate(table, where)
        rules.append(spec)
        warnings += [f"rule {index}: {w}" for w in spec.warnings()]
    return RuleFile(seed=seed, rules=rules, warnings=warnings)


def load_rules_file(path: str | os.PathLike[str]) -> RuleFile:
    """Read and validate a --rules FILE; errors start with the file name."""
    name = os.fspath(path)
    try:
        text = _read_small_file(name, MAX_RULES_FILE)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise QuotafsError(f"cannot read rules file {name}: {reason}", ExitCode.USAGE) from None
    return load_rules_toml(text, source=name)


MAX_RULES_FILE = 1 << 20  # 1 MiB: some ten thousand rules; /dev/zero is not a rules file


def _read_small_file(name: str, limit: int) -> str:
    """A regular file's text, at most `limit` bytes. O_NONBLOCK: opening a FIFO must not
    wait for a writer; a device, FIFO or directory is refused before any read."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno_mod.EINVAL, "not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno_mod.EFBIG, f"larger than {limit // 1024} KiB")
    return data.decode("utf-8")


# -- the engine ---------------------------------------------------------------------------


def _derive_seed(seed: int, salt: str) -> int:
    digest = hashlib.sha256(f"quotafs:{seed}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


class Rule:
    """A rule in an engine: its spec, id, counters and random generators."""

    __slots__ = ("_ops", "_prefix", "_regex", "_rng", "_token_rng", "effective_seed",
                 "fired", "id", "matched", "retired", "shadowed", "spec", "written")

    def __init__(self, rule_id: str, spec: RuleSpec, effective_seed: int) -> None:
        self.id = rule_id
        self.spec = spec
        self.effective_seed = effective_seed
        self.matched = 0  # requests that matched op, path (and size for short-write)
        self.fired = 0  # requests this rule's effect was applied to
        self.shadowed = 0  # eligible, but an earlier rule fired for the same request
        self.retired = False  # can never fire again (times used up, nth passed)
        self.written = 0  # bytes counted toward after_bytes since the rule was added
        self._rng = random.Random(effective_seed)
        # Per-firing values: corrupt-read's bit position, a crash's seed.
        self._token_rng = random.Random(_derive_seed(effective_seed,
                                                     "crash" if spec.crash else "corrupt"))
        self._ops: frozenset[str] | None = None if spec.ops == (ALL_OPS,) else frozenset(spec.ops)
        self._regex = compile_glob(spec.path) if spec.path is not None else None
        self._prefix = _literal_prefix(spec.path)

    def effect(self) -> Effect:
        """The effect of one firing (drawing its token or seed)."""
        spec = self.spec
        if spec.corrupt_read:
            return Effect("corrupt_read", self._token_rng.getrandbits(64), self.id)
        if spec.crash:
            seed = self._token_rng.getrandbits(_SEED_BITS)
            return Effect("crash", seed, self.id, cut=spec.crash_cut(seed))
        return Effect(spec.effect, spec.effect_value, self.id,
                      drop_unsynced=spec.drop_unsynced)

    def _path_matches(self, path: str) -> bool:
        assert self._regex is not None
        return self._regex.fullmatch("" if path == "/" else path) is not None

    def _may_match_below(self, directory: str) -> bool:
        """Could the glob match some path strictly below `directory`? Conservative."""
        if self._prefix is None:
            return True
        literal, more = self._prefix
        segments = () if directory == "/" else tuple(directory[1:].split("/"))
        if len(segments) < len(literal):
            return segments == literal[:len(segments)]
        return more and segments[:len(literal)] == literal

    def to_dict(self) -> dict[str, Any]:
        """{"id", spec fields..., "effective_seed", "matched", "fired", "shadowed",
        "retired", "written" (after_bytes rules only), "warnings"} — plain JSON."""
        out: dict[str, Any] = {"id": self.id, **self.spec.to_dict(),
                               "effective_seed": self.effective_seed, "matched": self.matched,
                               "fired": self.fired, "shadowed": self.shadowed,
                               "retired": self.retired}
        if self.spec.after_bytes is not None:
            out["written"] = self.written
        out["warnings"] = self.spec.warnings()
        return out

    def describe(self) -> str:
        """One line for `fault list` and status: id, options, counters."""
        state = " (retired)" if self.retired else ""
        extra = f" written={self.written}" if self.spec.after_bytes is not None else ""
        return (f"{self.id}: {self.spec.describe()}  [matched={self.matched} "
                f"fired={self.fired} shadowed={self.shadowed}{extra}]{state}")

    def __repr__(self) -> str:
        return f"<Rule {self.describe()}>"


@dataclass(frozen=True)
class FaultStats:
    seed: int
    rules: int
    active: int
    fired: int


class FaultEngine:
    """The rules of one mount, in insertion order. See the module docstring for the
    matching and firing rules."""

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int.from_bytes(os.urandom(_SEED_BITS // 8), "big")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise QuotafsError(f"--seed: must be a whole number >= 0, got {seed!r}",
                               ExitCode.USAGE)
        self.seed = seed
        self._rules: list[Rule] = []
        self._live: tuple[Rule, ...] = ()  # not retired, in order: what check() scans
        self._counting: tuple[Rule, ...] = ()  # live rules with after_bytes
        self.wants_allocation = False  # a live allocating rule: callers pass `allocating`
        self.wants_unsynced = False  # a live drop-unsynced rule: callers pass `unsynced`
        self._ops_in_play: frozenset[str] = frozenset()  # ops some live rule names
        self._next_id = 1
        self.active = False  # any live rule? Callers may skip check() when False.
        # The device is gone: a --crash rule's cut left it down until revived (set_down).
        # Callers that skip check() while not `active` still see it: it makes them active.
        self.down = False
        self.generation = 0  # changes whenever the live rules do: callers' caches expire

    def _refresh(self) -> None:
        self.generation += 1
        self._live = tuple(r for r in self._rules if not r.retired)
        self._counting = tuple(r for r in self._live if r.spec.after_bytes is not None)
        self.wants_allocation = any(r.spec.allocating for r in self._live)
        self.wants_unsynced = any(r.spec.drop_unsynced for r in self._live)
        self.active = bool(self._live) or self.down
        ops: set[str] = set()
        for rule in self._live:
            ops.update(OPS if rule._ops is None else rule._ops)
        self._ops_in_play = frozenset(ops)

    def set_down(self, down: bool) -> bool:
        """The device goes down (a --crash rule's cut: every request answers EIO until
        revived) or comes back; returns whether it was down."""
        was, self.down = self.down, down
        self._refresh()
        return was

    def add(self, spec: RuleSpec) -> Rule:
        """Append a rule (validated again, so a hand-built RuleSpec cannot slip through)."""
        rule = self._append(spec)
        self._refresh()
        return rule

    def _append(self, spec: RuleSpec) -> Rule:
        spec = RuleSpec.from_dict(spec.to_dict())
        rule_id = f"r{self._next_id}"
        self._next_id += 1
        seed = spec.seed if spec.seed is not None else _derive_seed(self.seed, rule_id)
        rule = Rule(rule_id, spec, seed)
        self._rules.append(rule)
        return rule

    def add_all(self, specs: Iterable[RuleSpec]) -> list[Rule]:
        # One refresh for all: refreshing per rule made a mount with n rules cost n^2.
        rules = [self._append(spec) for spec in specs]
        self._refresh()
        return rules

    def get(self, rule_id: str) -> Rule:
        for rule in self._rules:
            if rule.id == rule_id:
                return rule
        known = ", ".join(r.id for r in self._rules) or "none"
        raise QuotafsError(f"no fault rule {rule_id!r} (rules: {known})", ExitCode.USAGE)

    def remove(self, rule_id: str) -> Rule:
        """Remove one rule by id; QuotafsError(USAGE) for an unknown id."""
        rule = self.get(rule_id)
        self._rules.remove(rule)
        self._refresh()
        return rule

    def clear(self) -> int:
        """Remove every rule; return how many there were. Ids are not reused."""
        count = len(self._rules)
        self._rules.clear()
        self._refresh()
        return count

    def rules(self) -> list[Rule]:
        """All rules, retired ones included, in insertion order."""
        return list(self._rules)

    def check(self, op: str, path: str, path2: str | None = None,
              size: int | None = None, allocating: bool | None = None,
              unsynced: bool | None = None) -> Effect | None:
        """Called for each request before it is served; the effect to apply, or None.

        op: a name from OPS; path: "/"-prefixed relative to the mount root, "/" for the
        root; path2: the second path of rename (new name) and link (new link), matched
        as well; size: the byte count of a write (short-write rules need it);
        allocating: whether a write newly allocates blocks (allocating rules need it: a
        request without it never matches them); unsynced: whether an fsync's file has
        writes not yet durable (drop-unsynced rules need it: a writeback error needs
        something to write back, so the fsync after one succeeds).
        """
        winner: Effect | None = None
        retired = False
        for rule in self._live:
            spec = rule.spec
            if rule._ops is not None and op not in rule._ops:
                continue
            if rule._regex is not None and not (
                    rule._path_matches(path) or (path2 is not None and rule._path_matches(path2))):
                continue
            if spec.short_write is not None and size is not None and size <= spec.short_write:
                continue
            if spec.allocating and not allocating:
                continue
            if spec.drop_unsynced and not unsynced:
                continue
            rule.matched += 1
            eligible = True
            if spec.probability is not None:
                eligible = rule._rng.random() < spec.probability  # exactly one draw
            if spec.nth is not None and rule.matched != spec.nth:
                eligible = False
            if spec.from_nth is not None and rule.matched < spec.from_nth:
                eligible = False
            if spec.after_bytes is not None and rule.written < spec.after_bytes:
                eligible = False
            if eligible:
                if winner is None:
                    rule.fired += 1
                    winner = rule.effect()
                else:
                    rule.shadowed += 1
            if ((spec.times is not None and rule.fired >= spec.times)
                    or (spec.nth is not None and rule.matched >= spec.nth)):
                rule.retired = retired = True
        if retired:
            self._refresh()
        return winner

    def concerns(self, op: str) -> bool:
        """Could any live rule match a request of this op? If not, the caller need not
        work out the request's paths at all."""
        return op in self._ops_in_play

    def may_match_path(self, path: str) -> bool:
        """Could a live rule match a request on this path, for any op? If not, check()
        would return None for every request on it until the rules change."""
        return any(rule._regex is None or rule._path_matches(path) for rule in self._live)

    def may_match_below(self, directory: str) -> bool:
        """Could a live rule match a request on some path below this directory? If not,
        requests on its entries (lookup, create, unlink, ...) need no check()."""
        return any(rule._may_match_below(directory) for rule in self._live)

    def could_match(self, op: str, path: str) -> bool:
        """Could a live rule match a request of this op on this path (ignoring size and
        triggers)? quotafs asks at open: while a read rule could fire on a file, opening
        it drops the kernel's cached pages, so its reads reach the daemon and the rule."""
        if op not in self._ops_in_play:
            return False
        return any((rule._ops is None or op in rule._ops)
                   and (rule._regex is None or rule._path_matches(path))
                   for rule in self._live)

    @property
    def counting(self) -> bool:
        """Does any live rule count written bytes (after-bytes)? Else skip note_written."""
        return bool(self._counting)

    def note_written(self, path: str, nbytes: int) -> None:
        """Count bytes a write stored (after it succeeded) toward after-bytes triggers."""
        for rule in self._counting:
            if rule._regex is None or rule._path_matches(path):
                rule.written += nbytes

    def statistics(self) -> FaultStats:
        return FaultStats(seed=self.seed, rules=len(self._rules), active=len(self._live),
                          fired=sum(r.fired for r in self._rules))

    def to_dict(self) -> dict[str, Any]:
        """{"seed": int, "rules": [Rule.to_dict(), ...]} for status and the control channel."""
        return {"seed": self.seed, "rules": [r.to_dict() for r in self._rules]}
