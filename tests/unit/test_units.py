"""Pure parts without FUSE: size parsing, block arithmetic, the ledger's invariants."""

from __future__ import annotations

import errno
import re
from decimal import Decimal

import pyfuse3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from quotafs.daemon.boundary import boundary
from quotafs.errors import ExitCode, QuotafsError
from quotafs.model.allocation import count_blocks, hole_blocks
from quotafs.model.ledger import UNLIMITED, Ledger
from quotafs.units import format_size, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("0", 0), ("1K", 1024), ("120M", 120 * 2**20), ("1.5G", 3 * 2**29),
    ("2T", 2 * 2**40), ("1KiB", 1024), ("10MiB", 10 * 2**20), ("1GiB", 2**30),
    ("1KB", 1000), ("10MB", 10**7), ("1.5GB", 15 * 10**8), ("7b", 7), ("1k", 1024),
    (" 3M ", 3 * 2**20),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-1", "1..5M", "1.2.3", "1e6", "0.1K",
                                  "1 2", "ten"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(QuotafsError) as exc:
        parse_size(text)
    assert exc.value.code == ExitCode.USAGE
    assert "\n" not in str(exc.value)


_FORMAT_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}


@given(st.integers(min_value=0, max_value=2**60))
def test_bytes_roundtrip(n: int) -> None:
    assert parse_size(str(n)) == n
    number, unit = format_size(n).split(" ")
    scale = _FORMAT_UNITS[unit]
    if unit == "B":
        assert number == str(n) and n < 1024
        return
    # One decimal of the largest unit that keeps the number below 1024 (PiB has no cap).
    assert re.fullmatch(r"\d+\.\d", number), number
    assert Decimal(number) >= 1 and (unit == "PiB" or Decimal(number) <= 1024)
    assert abs(Decimal(number) * scale - n) <= Decimal("0.05") * scale
    assert n < 1024 * scale or unit == "PiB"


@given(st.integers(min_value=0, max_value=1023), st.sampled_from(list(_FORMAT_UNITS.values())))
def test_whole_units_round_trip_through_parse_size(count: int, scale: int) -> None:
    assert parse_size(format_size(count * scale)) == count * scale


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (2**20 - 1, "1024.0 KiB"), (2**20, "1.0 MiB"), (120 * 2**20, "120.0 MiB"),
    (3 * 2**29, "1.5 GiB"), (2**40, "1.0 TiB"), (2**50, "1.0 PiB"), (2**60, "1024.0 PiB"),
])
def test_format_size_exact(n: int, text: str) -> None:
    assert format_size(n) == text


def test_count_and_hole_blocks() -> None:
    assert count_blocks([(0, 1), (4095, 4097), (10000, 10001)], 4096) == 3
    assert count_blocks([], 4096) == 0
    assert hole_blocks(0, 5 * 4096, [(4096, 8192), (12288, 12289)], 4096) == [0, 2, 4]
    assert hole_blocks(100, 200, [(0, 4096)], 4096) == []


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), max_size=8),
       st.integers(0, 300), st.integers(0, 100), st.sampled_from([512, 4096]))
def test_hole_blocks_matches_a_bitmap(raw: list[tuple[int, int]], start: int, length: int,
                                      block: int) -> None:
    # Build sorted, disjoint extents (in units of 100 bytes) and compare with a bitmap.
    extents, cursor = [], 0
    for gap, size in raw:
        s = cursor + gap * 100
        extents.append((s, s + size * 100))
        cursor = s + size * 100 + 1
    start, end = start * 100, start * 100 + length * 100
    covered = {b for s, e in extents for b in range(s // block, -(-e // block))}
    touched = range(start // block, -(-end // block)) if end > start else range(0)
    expected = [b for b in touched if b not in covered]
    assert hole_blocks(start, end, extents, block) == expected
    assert count_blocks(extents, block) == len(covered)


def test_ledger_basics() -> None:
    ledger = Ledger(limit=10)
    assert ledger.try_charge(6, privileged=True)
    assert not ledger.try_charge(5, privileged=True)
    assert ledger.enospc_count == 1
    assert ledger.try_reserve(4, privileged=True)
    assert ledger.free_for(True) == 0
    ledger.convert(2)
    assert (ledger.used, ledger.reserved) == (8, 2)
    ledger.release(2)
    ledger.credit(8)
    assert ledger.free_for(True) == 10
    with pytest.raises(ValueError):
        ledger.credit(1)
    with pytest.raises(ValueError):
        Ledger(limit=-1)
    ledger.set_limit(None)
    assert ledger.try_charge(2**40, privileged=True)


class LedgerMachine(RuleBasedStateMachine):
    """Whatever sequence of requests: used + reserved never passes the limit through a
    grant (nor limit - root reserve for a caller other than root), credits never go below
    zero, and the books balance."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(limit=1000, inode_limit=5, kept_back=40)
        self.charged = 0
        self.reserved = 0
        self.inodes = 0
        self.peak = 0  # the highest usage seen after any step (each step moves it one way)
        self.privileged = True  # is the current caller root?

    def _ceiling(self) -> int | None:
        """Where the current caller's grants must stop."""
        limit = self.ledger.limit
        if limit is None:
            return None
        limit -= self.ledger.kept_back  # nobody's, root's neither
        return limit if self.privileged else limit - self.ledger.root_reserve

    @rule(n=st.integers(0, 400))
    def charge(self, n: int) -> None:
        before = self.ledger.used + self.ledger.reserved
        ceiling = self._ceiling()
        if self.ledger.try_charge(n, privileged=self.privileged):
            self.charged += n
            # a grant never takes usage past the ceiling (a zero charge takes nothing)
            assert ceiling is None or n == 0 or before + n <= ceiling
        else:
            assert ceiling is not None and before + n > ceiling

    @rule(n=st.integers(0, 400))
    def credit(self, n: int) -> None:
        n = min(n, self.charged)
        self.ledger.credit(n)
        self.charged -= n

    @rule(n=st.integers(0, 300))
    def reserve(self, n: int) -> None:
        before, ceiling = self.ledger.used + self.ledger.reserved, self._ceiling()
        if self.ledger.try_reserve(n, privileged=self.privileged):
            self.reserved += n
            assert ceiling is None or n == 0 or before + n <= ceiling

    @rule(n=st.integers(0, 300), convert=st.booleans())
    def settle(self, n: int, convert: bool) -> None:
        n = min(n, self.reserved)
        if convert:
            self.ledger.convert(n)
            self.charged += n
        else:
            self.ledger.release(n)
        self.reserved -= n

    @rule(limit=st.integers(0, 1500))
    def set_limit(self, limit: int) -> None:
        self.ledger.set_limit(limit)  # may drop below usage: nothing is taken away

    @rule(reserve=st.integers(0, 600))
    def set_root_reserve(self, reserve: int) -> None:
        self.ledger.set_limit(self.ledger.limit, reserve)  # may exceed the limit too

    @rule(privileged=st.booleans())
    def next_caller(self, privileged: bool) -> None:
        self.privileged = privileged

    @rule()
    def add_inode(self) -> None:
        if self.ledger.try_add_inode():
            self.inodes += 1
        assert self.inodes <= 5

    @rule()
    def remove_inode(self) -> None:
        if self.inodes:
            self.ledger.remove_inode()
            self.inodes -= 1

    @invariant()
    def books_balance(self) -> None:
        assert self.ledger.used == self.charged >= 0
        assert self.ledger.reserved == self.reserved >= 0
        assert self.ledger.inodes_used == self.inodes
        self.peak = max(self.peak, self.charged)
        assert self.ledger.peak_used == self.peak  # credits never lower it
        limit = self.ledger.limit if self.ledger.limit is not None else 2**63
        unallocated = max(0, limit - self.charged - self.reserved)  # df's f_bfree
        for_root = max(0, limit - 40 - self.charged - self.reserved)
        for_others = max(0, limit - 40 - self.ledger.root_reserve - self.charged
                         - self.reserved)
        stats = self.ledger.stats()
        assert (stats.free, stats.available) == (for_root, for_others)
        assert stats.unallocated == unallocated
        assert self.ledger.free_for(self.privileged) == (for_root if self.privileged
                                                          else for_others)
        assert stats.available == max(0, stats.free - stats.root_reserve)  # df's f_bavail


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=200, stateful_step_count=40)


async def test_error_boundary_maps_errors() -> None:
    @boundary
    async def raises_oserror() -> None:
        raise FileNotFoundError(errno.ENOENT, "gone")

    @boundary
    async def raises_bug() -> None:
        raise ZeroDivisionError

    with pytest.raises(pyfuse3.FUSEError) as exc:
        await raises_oserror()
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await raises_bug()
    assert exc.value.errno == errno.EIO


def test_dropping_the_limit_of_a_like_ext4_ledger() -> None:
    """`quotafs set --limit none --reserve 0` on a --like-ext4 mount: what ext4 keeps back is
    a part of the limit, so without a limit nothing is kept back."""
    ledger = Ledger(100 << 20, None, 0, 4 << 20)
    assert ledger.free_for(True) == 96 << 20
    ledger.set_limit(None, 0)
    assert (ledger.limit, ledger.kept_back, ledger.free_for(True)) == (None, 0, UNLIMITED)
