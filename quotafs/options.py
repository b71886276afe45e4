"""Mount options: one validation for the CLI, the Python API and the pytest plugin.

`validate(values)` takes the options as given (CLI strings, or Python values as
`quotafs.mounted()` and the marker take them) and returns them checked and normalised:
sizes in bytes, counts as ints, the rules of `rules_file` read and merged into `rules`
(so validating the result again changes nothing; the file's warnings go to stderr). It
raises QuotafsError(USAGE) with one line naming the option, and has no side effect but
reading the rules file, so every caller runs it before it makes a directory or starts a
daemon.

To add an option: one entry in CHECKS (name -> checker), and the MountConfig field.
Options that depend on each other (like_ext4, reserve "5%" of the limit) are resolved by
config_fields, after validation and before any side effect.
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from quotafs.errors import ExitCode, QuotafsError
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
    where it is applied (config_fields at mount, the daemon for `quotafs set`)."""
    from quotafs.model.reserve import resolve_reserve

    try:
        resolve_reserve(value, MAX_LIMIT, 1)
    except QuotafsError as exc:
        message = str(exc)
        raise _fail(message if "reserve" in message else f"reserve: {message}") from None
    return value if isinstance(value, str) or value is None else int(value)


def _rules(value: Any) -> list[dict[str, Any]]:
    from quotafs.model.faults import RuleSpec

    if not isinstance(value, list | tuple):
        raise _fail(f"rules must be a list of rule dicts, got {_show(value)}")
    return [RuleSpec.from_dict(rule, where=f"rules[{i}]").to_dict()
            for i, rule in enumerate(value)]


# name -> checker of its raw value (None is "not given" for every option but the flags).
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
}
OPTION_NAMES = tuple(CHECKS)


def unknown_option(name: str) -> QuotafsError:
    import difflib

    close = ([o for o in OPTION_NAMES if o.startswith(name)]
             or difflib.get_close_matches(name, OPTION_NAMES, n=1))
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return _fail(f"unknown option {name!r}{hint}; the options are " + ", ".join(OPTION_NAMES))


def validate(values: Mapping[str, Any]) -> dict[str, Any]:
    """The given options, checked and normalised (see the module docstring)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in CHECKS:
            raise unknown_option(name)
        out[name] = CHECKS[name](value)
    rules_file = out.pop("rules_file", None)
    if rules_file is not None:
        from quotafs.model.faults import load_rules_file

        loaded = load_rules_file(rules_file)
        out["rules"] = [spec.to_dict() for spec in loaded.rules] + out.get("rules", [])
        for warning in loaded.warnings:
            print(f"quotafs: warning: {rules_file}: {warning}", file=sys.stderr)
        if out.get("seed") is None and loaded.seed is not None:
            out["seed"] = loaded.seed
    return out


def config_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validated options as MountConfig keywords (all but backing, which the caller
    prepares): like_ext4 measured into ext4's limit, reserve and geometry, the reserve in
    bytes of the final limit, and a random seed if none was given. Raises QuotafsError
    (USAGE) for combinations (a reserve above the limit); no side effect but running
    mkfs.ext4 on a temporary file for like_ext4, so callers run it before theirs."""
    from quotafs.model.reserve import resolve_room

    fields = resolve_room({k: v for k, v in options.items() if k != "backing"})
    fields["rules"] = list(fields.get("rules") or [])
    if fields.get("seed") is None:
        fields["seed"] = random.getrandbits(32)
    return fields
