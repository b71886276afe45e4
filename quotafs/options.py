"""Mount options: one `MountOptions`, validated once, for the CLI, the API, the plugin and
the daemon.

`MountOptions.from_values(values)` takes the options as given (CLI strings, or Python values
as `quotafs.mounted()` and the marker take them), reads `rules_file` into `rules` (its
warnings go to stderr) and builds the object, whose constructor checks and normalises every
field: sizes in bytes, counts as ints, rules as RuleSpecs. A bad value raises
QuotafsError(USAGE) with one line naming the option; nothing else happens before, so every
caller builds its MountOptions before it makes a directory or starts a daemon.

`resolve()` then settles what depends on other options (like_ext4 measured into ext4's
limit, reserve and geometry; a "5%" reserve into bytes of the final limit; a random seed),
still before any side effect but a mkfs.ext4 on a temporary file. The starter adds where
the mount goes (mountpoint, the prepared backing directory) with `placed()`, and that
object, as JSON, is what the daemon reads from its memfd (`to_json`/`from_json`).

To add an option: a field of MountOptions and its entry in CHECKS (name -> checker); the
CLI flag in quotafs/cli/mountopts.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from quotafs.errors import ExitCode, QuotafsError
from quotafs.model.faults import RuleSpec, load_rules_file
from quotafs.model.reserve import resolve_reserve
from quotafs.reference.ext4geometry import like_ext4_settings
from quotafs.units import MAX_SIZE, parse_size

# The ledger counts in signed 64-bit (its UNLIMITED is 2^63-1) and statfs answers in u64
# blocks: a limit or inode count at or above 2^63 could not be reported (df got EIO).
MAX_LIMIT = MAX_SIZE

# Characters that would change the option string the daemon passes to mount(2): a comma
# starts another option (fsname=x,allow_other), "=" and quotes/backslashes are option
# syntax to libfuse and fusermount3, and control characters end up in /proc/self/mountinfo.
_OPTION_SYNTAX = re.compile(r'[,=\\"\'\s\x00-\x1f\x7f]')


def _fail(message: str) -> QuotafsError:
    return QuotafsError(message, ExitCode.USAGE)


def _show(value: Any) -> str:
    """repr() for a message, kept short (and an int of thousands of digits does not print)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"{'-' if value < 0 else ''}a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def check_size(name: str, value: Any, allow_none: bool = False) -> int | None:
    """A size: bytes as an int, or a string such as "10M"; below 2^63."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except QuotafsError as exc:
            raise _fail(f"{name}: {exc}") from None
    elif isinstance(value, bool) or not isinstance(value, int):
        none = " or None (no limit)" if allow_none else ""
        raise _fail(f"{name} must be a size like '10M' or a number of bytes{none}, "
                    f"got {_show(value)} ({type(value).__name__})")
    if value < 0:
        raise _fail(f"{name} must not be negative, got {_show(value)}")
    if value > MAX_LIMIT:
        raise _fail(f"{name} is too large: at most 2^63-1 bytes ({MAX_LIMIT})")
    return int(value)


def check_count(name: str, value: Any, maximum: int = MAX_LIMIT) -> int | None:
    """A whole number >= 0 (an int, or ASCII digits as the CLI gives them); below 2^63."""
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,30}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(f"{name} must be a whole number >= 0 or None, got {_show(value)}")
    if value > maximum:
        bound = "2^63-1" if maximum == MAX_LIMIT else "2^64-1"
        raise _fail(f"{name} is too large: at most {bound} ({maximum})")
    return value


def _limit(value: Any) -> int | None:
    return check_size("limit", value, allow_none=True)


def _block_size(value: Any) -> int | None:
    if value is None:  # not given: 4096, or ext4's with like_ext4
        return None
    size = check_size("block_size", value)
    if size is None or size < 512 or size & (size - 1):
        raise _fail(f"block_size must be a power of two >= 512, got {_show(value)}")
    return size


def _accounting(value: Any) -> str:
    if value not in ("blocks", "apparent"):
        raise _fail(f"accounting must be 'blocks' or 'apparent', got {_show(value)}")
    return str(value)


def _flag(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _fail(f"{name} must be True or False, got {_show(value)}")
        return value
    return check


def _path(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str | os.PathLike):
            raise _fail(f"{name} must be a path, got {_show(value)}")
        path = os.fspath(value)
        if not isinstance(path, str) or "\0" in path:
            raise _fail(f"{name} must be a path, got {_show(value)}")
        return path
    return check


def check_on_off(name: str) -> Callable[[Any], bool]:
    """A switch: True/False, or "on"/"off" as the command line gives it."""
    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if value in ("on", "off"):
            return bool(value == "on")
        raise _fail(f"{name} must be 'on' or 'off' (or True/False), got {_show(value)}")
    return check


def check_fsname(value: Any) -> str:
    """The source name shown by mount and df: it becomes fsname=VALUE in the option string."""
    if not isinstance(value, str) or not value:
        raise _fail(f"fsname must be a non-empty string without commas, got {_show(value)}")
    if _OPTION_SYNTAX.search(value):
        raise _fail("fsname must not contain commas, '=', quotes, backslashes, spaces or "
                    f"control characters (they are mount option syntax), got {_show(value)}")
    return value


def check_reserve(value: Any) -> int | str | None:
    """Root's reserve, syntax only ("5%" or a size): the percentage is of the limit in force
    where it is applied (MountOptions.resolve at mount, the daemon for `quotafs set`)."""
    try:
        resolve_reserve(value, MAX_LIMIT, 1)
    except QuotafsError as exc:
        message = str(exc)
        raise _fail(message if "reserve" in message else f"reserve: {message}") from None
    return value if isinstance(value, str) or value is None else int(value)


def _rules(value: Any) -> tuple[RuleSpec, ...]:
    if not isinstance(value, list | tuple):
        raise _fail(f"rules must be a list of rule dicts, got {_show(value)}")
    return tuple(rule if isinstance(rule, RuleSpec) else
                 RuleSpec.from_dict(rule, where=f"rules[{i}]") for i, rule in enumerate(value))


# name -> checker of its raw value (None is "not given" for every option but the flags).
# The order is MountOptions' field order, so that the first bad option is reported first
# whichever way the options came.
CHECKS: dict[str, Callable[[Any], Any]] = {
    "limit": _limit,
    "inodes": lambda value: check_count("inodes", value),
    "accounting": _accounting,
    "block_size": _block_size,
    "reserve": check_reserve,
    "like_ext4": lambda value: check_size("like_ext4", value, allow_none=True),
    "kept_back": lambda value: check_size("kept_back", value, allow_none=True),
    "mmap_sigbus": _flag("mmap_sigbus"),
    "seed": lambda value: check_count("seed", value, 2**64 - 1),  # any 64 bits
    "rules": _rules,
    "rules_file": _path("rules_file"),
    "log_file": _path("log_file"),
    "backing": _path("backing"),
    "keep_backing": _flag("keep_backing"),
    "allow_other": _flag("allow_other"),
    "no_cache": _flag("no_cache"),
    "fsname": check_fsname,
    "debug": _flag("debug"),
    "xattrs": check_on_off("xattrs"),
    "crash_sim": _flag("crash_sim"),
}
OPTION_NAMES = tuple(CHECKS)  # what a user may give (rules_file is read into rules)
SETTABLE = ("limit", "inodes", "reserve")  # what `quotafs set` changes on a live mount
DEFAULT_BLOCK_SIZE = 4096


def unknown_option(name: str) -> QuotafsError:
    close = ([o for o in OPTION_NAMES if o.startswith(name)]
             or difflib.get_close_matches(name, OPTION_NAMES, n=1))
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return _fail(f"unknown option {name!r}{hint}; the options are " + ", ".join(OPTION_NAMES))


def resolve_room(options: dict[str, Any]) -> dict[str, Any]:
    """The options with `like_ext4` (bytes) turned into ext4's limit, reserve, kept back,
    block size and inode limit (explicit limit/reserve/inodes win), and `reserve` into
    bytes of the final limit. Sizes in `options` are bytes already; None: not given."""
    out = dict(options)
    like = out.pop("like_ext4", None)
    if like is not None:
        out.update(like_ext4_settings(like, out))
    if out.get("block_size") is None:
        out.pop("block_size", None)
    blocks = out.get("accounting") in (None, "blocks")
    unit = int(out.get("block_size", DEFAULT_BLOCK_SIZE)) if blocks else 1
    out["reserve"] = resolve_reserve(out.get("reserve"), out.get("limit"), unit)
    return out


@dataclass(frozen=True)
class MountOptions:
    """Every mount option, checked: build it with `from_values` (raw values) or directly
    (the constructor runs the same checks). Sizes are bytes; None is "not given"."""

    limit: int | None = None
    inodes: int | None = None
    accounting: str = "blocks"  # "blocks" | "apparent"
    block_size: int | None = None  # None: 4096, or ext4's with like_ext4
    reserve: int | str | None = None  # root's: "5%" or bytes; bytes once resolved
    like_ext4: int | None = None  # an image size; None once resolved
    kept_back: int | None = None  # bytes below the limit for nobody (like_ext4 sets it)
    mmap_sigbus: bool = False
    seed: int | None = None  # fault rules' random seed; chosen by resolve() if None
    rules: tuple[RuleSpec, ...] = ()
    log_file: str | None = None  # the daemon's log (WARNING and up), else its stderr
    backing: str | None = None  # None: a private temporary directory
    keep_backing: bool = False
    allow_other: bool = False
    no_cache: bool = False
    fsname: str = "quotafs"
    debug: bool = False
    xattrs: bool = True  # False: no xattrs, ACLs (ENOSYS), no GETXATTR before each write
    crash_sim: bool = False  # record what is durable, for `quotafs crash` (docs/crash.md)
    # Where and how the mount is started: set by the starter with placed(), not options.
    mountpoint: str = ""
    private_backing: bool = False  # the backing directory was made for this mount
    die_with_parent: bool = False  # the API's daemons die with their caller

    def __post_init__(self) -> None:
        for name, check in CHECKS.items():
            if name != "rules_file":
                object.__setattr__(self, name, check(getattr(self, name)))
        for name in ("private_backing", "die_with_parent"):
            _flag(name)(getattr(self, name))
        if not isinstance(self.mountpoint, str):
            raise _fail(f"mountpoint must be a path, got {_show(self.mountpoint)}")

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> MountOptions:
        """Options as given (see the module docstring): unknown names and bad values
        raise QuotafsError(USAGE) with one line; `rules_file` is read into `rules`."""
        for name in values:
            if name not in CHECKS:
                raise unknown_option(name)
        options = cls(**{name: v for name, v in values.items() if name != "rules_file"})
        rules_file = CHECKS["rules_file"](values.get("rules_file"))
        if rules_file is None:
            return options
        loaded = load_rules_file(rules_file)  # read last: every other option is fine
        for warning in loaded.warnings:
            print(f"quotafs: warning: {rules_file}: {warning}", file=sys.stderr)
        seed = loaded.seed if options.seed is None else options.seed
        return dataclasses.replace(options, rules=(*loaded.rules, *options.rules), seed=seed)

    def value(self, name: str) -> Any:
        """One option as a plain value (rules as rule dicts), as `from_values` takes it."""
        value = getattr(self, name)
        return [rule.to_dict() for rule in value] if name == "rules" else value

    def resolve(self) -> MountOptions:
        """like_ext4 measured into ext4's room, the reserve in bytes of the final limit
        and block size, a random seed if none was given. Raises QuotafsError(USAGE) for
        combinations (a reserve above the limit, like_ext4 with a block size)."""
        room = resolve_room({name: getattr(self, name) for name in
                             ("limit", "inodes", "accounting", "block_size", "reserve",
                              "like_ext4")})
        room["like_ext4"] = None
        room.setdefault("block_size", DEFAULT_BLOCK_SIZE)
        room.setdefault("kept_back", self.kept_back or 0)
        room["seed"] = random.getrandbits(32) if self.seed is None else self.seed
        return dataclasses.replace(self, **room)

    def placed(self, mountpoint: str, backing: str, private_backing: bool,
               die_with_parent: bool = False) -> MountOptions:
        """These (resolved) options on a checked mount point and a prepared backing
        directory: what the daemon is started with."""
        return dataclasses.replace(self, mountpoint=mountpoint, backing=backing,
                                   private_backing=private_backing,
                                   die_with_parent=die_with_parent)

    # -- the daemon's view: plain values of resolved, placed options -------------------

    @property
    def backing_dir(self) -> str:
        if self.backing is None:
            raise ValueError("MountOptions.backing_dir of options not placed()")
        return self.backing

    @property
    def block_bytes(self) -> int:
        return DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size

    @property
    def reserve_bytes(self) -> int:
        if isinstance(self.reserve, str):
            raise ValueError(f"reserve {self.reserve!r} not resolved (MountOptions.resolve)")
        return self.reserve or 0

    @property
    def kept_back_bytes(self) -> int:
        return self.kept_back or 0

    # -- the daemon's configuration on the wire ----------------------------------------

    def to_json(self) -> str:
        return json.dumps({field.name: self.value(field.name)
                           for field in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, text: str) -> MountOptions:
        return cls(**json.loads(text))


def validate(values: Mapping[str, Any]) -> dict[str, Any]:
    """The given options, checked and normalised, as plain values (the plugin's
    mount_options): the keys given, `rules_file` read into `rules` (and its seed), so that
    validating the result again changes nothing."""
    options = MountOptions.from_values(values)
    names = [name for name in values if name != "rules_file"]
    if values.get("rules_file") is not None:
        names += [name for name in ("rules", "seed")
                  if name not in names and (name == "rules" or options.seed is not None)]
    return {name: options.value(name) for name in names}


def check_settings(changes: Mapping[str, Any]) -> dict[str, int | str | None]:
    """New limits of a live mount (`quotafs set`, QuotaMount.set_*), checked as at mount:
    None lifts a limit; a reserve "5%" is of the limit the daemon then has."""
    out: dict[str, int | str | None] = {}
    for name, value in changes.items():
        if name not in SETTABLE:
            raise _fail(f"{name} cannot be changed on a live mount; "
                        f"these can: {', '.join(SETTABLE)}")
        out[name] = CHECKS[name](value)
    return out
