"""`--reserve PERCENT|SIZE`: the space below the limit that only root may use (ext4's
reserved blocks). One validation for the CLI, the API, the plugin and `quotafs set`."""

from __future__ import annotations

import re
from decimal import Decimal

from quotafs.errors import ExitCode, QuotafsError
from quotafs.units import parse_size

_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*$", re.ASCII)


def resolve_reserve(value: int | str | None, limit: int | None, unit: int) -> int:
    """The reserve in bytes: "5%" of the limit (in whole `unit`s, rounded down, as mke2fs
    counts blocks), or a size ("6M", 6291456). Raises QuotafsError(USAGE) with one line."""
    if isinstance(value, bool) or not isinstance(value, int | str | None):
        raise QuotafsError(f"invalid reserve {value!r}: a percentage like 5% or a size "
                           "like 6M", ExitCode.USAGE)
    if value is None or value == 0:
        return 0
    match = _PERCENT_RE.match(value) if isinstance(value, str) else None
    if match is None and isinstance(value, str) and "%" in value:
        raise QuotafsError(f"invalid reserve {value!r}: a percentage like 5% or 0.5%",
                           ExitCode.USAGE)
    if limit is None:
        raise QuotafsError(f"--reserve {value} needs a limit: root's reserve is a part of it",
                           ExitCode.USAGE)
    if match is not None:
        percent = Decimal(match.group(1))
        if percent > 100:
            raise QuotafsError(f"invalid reserve {value!r}: at most 100%", ExitCode.USAGE)
        return int(limit // unit * percent / 100) * unit
    nbytes = value if isinstance(value, int) else parse_size(value)
    if nbytes < 0:
        raise QuotafsError(f"invalid reserve {value!r}: must be >= 0", ExitCode.USAGE)
    if nbytes > limit:
        raise QuotafsError(f"reserve {nbytes:,} bytes is larger than the limit "
                           f"({limit:,} bytes)", ExitCode.USAGE)
    return nbytes
