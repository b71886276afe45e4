"""Human sizes <-> bytes: "120M", "1.5GiB", "10MB", "4096".

K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024 (as truncate(1) and dd read them);
KB/MB/GB/TB are powers of 1000. A trailing "B" alone means bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from quotafs.errors import ExitCode, QuotafsError

MAX_SIZE = 2**63 - 1  # the ledger's UNLIMITED; statfs fields are u64 blocks

_UNITS: dict[str, int] = {"": 1, "B": 1}
for _power, _letter in enumerate("KMGTP", start=1):
    _UNITS[_letter] = 1024**_power
    _UNITS[_letter + "IB"] = 1024**_power
    _UNITS[_letter + "B"] = 1000**_power

# ASCII only: str.isdigit() and \d also take other scripts' digits (Arabic-Indic), \s other
# spaces; a size is typed in ASCII, anything else is a mistake to report.
_SIZE_RE = re.compile(r"[ \t]*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)[ \t]*([A-Za-z]*)[ \t]*")


def parse_size(text: str) -> int:
    """Parse a size as people type it; raise QuotafsError(USAGE) with one clear line."""
    match = _SIZE_RE.fullmatch(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise QuotafsError(
            f"invalid size {text!r}: use bytes or a number with K, M, G, T (powers of 1024), "
            "KiB..TiB, or KB..TB (powers of 1000), e.g. 120M or 1.5G",
            ExitCode.USAGE,
        )
    try:
        value = Decimal(match.group(1)) * _UNITS[unit]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
        raise QuotafsError(f"invalid size {text!r}", ExitCode.USAGE) from exc
    if value != value.to_integral_value():
        # "1.5K" is 1536 bytes; "0.1K" would be a fraction of a byte: refuse, don't round.
        raise QuotafsError(f"invalid size {text!r}: not a whole number of bytes", ExitCode.USAGE)
    if value > MAX_SIZE:
        # Nothing holds more (the ledger and statfs count in 64 bits), and an int of
        # thousands of digits would not even print.
        raise QuotafsError(f"invalid size {text!r}: at most 2^63-1 bytes (8 EiB)",
                           ExitCode.USAGE)
    return int(value)


def format_size(n: int) -> str:
    """Bytes as a short human string in powers of 1024 (exact bytes below 1 KiB)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"
