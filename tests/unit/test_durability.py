"""model/durability.py: which recorded changes a power cut keeps (pure; Hypothesis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotafs.model.durability import SECTOR, Change, Syncs, decide, posix_kept, torn_prefix

ROOT, D, E = (0, 1), (0, 2), (0, 3)
F, G = (0, 10), (0, 11)


def write(seq: int, file: tuple[int, int] = F, off: int = 0, n: int = 100) -> Change:
    return Change(seq, "write", file=file, offset=off, length=n)


def test_posix_keeps_a_name_once_its_directory_was_synced() -> None:
    made = Change(1, "create", dirs=(ROOT,), subjects=(F,))
    assert decide([made], Syncs({}, committed=5), "posix").kept == frozenset()
    assert decide([made], Syncs({ROOT: 2}), "posix").kept == {1}
    assert decide([made], Syncs({ROOT: 1}), "posix").kept == frozenset()  # synced before


def test_ext4_keeps_every_name_before_the_last_commit() -> None:
    changes = [Change(1, "create", dirs=(ROOT,), subjects=(F,)), write(2),
               Change(4, "create", dirs=(ROOT,), subjects=(G,))]
    assert decide(changes, Syncs({}, committed=3), "ext4").kept == {1}  # not the data


def test_a_name_in_a_directory_whose_creation_is_lost_is_lost() -> None:
    changes = [Change(1, "create", dirs=(ROOT,), subjects=(D,)),
               Change(2, "create", dirs=(D,), subjects=(F,))]
    assert posix_kept(changes, Syncs({D: 3})) == set()
    assert posix_kept(changes, Syncs({D: 3, ROOT: 3})) == {1, 2}


def test_a_rename_needs_both_directories() -> None:
    moved = Change(1, "rename", dirs=(D, E), subjects=(F,))
    assert posix_kept([moved], Syncs({D: 2})) == set()
    assert posix_kept([moved], Syncs({D: 2, E: 2})) == {1}


def test_torn_prefixes_end_on_a_sector_boundary_and_never_take_it_all() -> None:
    rng = random.Random(1)
    for off, n in [(0, 10_000), (100, 5000), (700, 300), (0, 512), (3, 2)]:
        for _ in range(50):
            kept = torn_prefix(write(1, off=off, n=n), rng)
            assert 0 <= kept < n
            assert kept == 0 or (off + kept) % SECTOR == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="model"):
        decide([], Syncs(), "zfs")
    with pytest.raises(ValueError, match="keep_fraction"):
        decide([], Syncs(), "posix", keep_fraction=2.0)


changes_strategy = st.lists(
    st.tuples(st.sampled_from(["write", "truncate", "create", "remove", "rename"]),
              st.sampled_from([F, G]), st.sampled_from([ROOT, D, E]),
              st.integers(0, 5000), st.integers(1, 5000)),
    max_size=30)


def build(raw: list[tuple[str, tuple[int, int], tuple[int, int], int, int]]) -> list[Change]:
    out = []
    for seq, (kind, file, directory, off, n) in enumerate(raw, start=1):
        if kind in ("write", "truncate"):
            out.append(Change(seq, kind, file=file, offset=off,
                              length=n if kind == "write" else 0))
        else:
            out.append(Change(seq, kind, dirs=(directory,), subjects=(file,)))
    return out


@given(changes_strategy, st.dictionaries(st.sampled_from([ROOT, D, E]), st.integers(0, 31)),
       st.integers(0, 31), st.floats(0, 1), st.booleans(), st.integers(0, 2**32))
def test_what_survives_is_a_state_some_order_allows(
        raw: list[tuple[str, tuple[int, int], tuple[int, int], int, int]],
        dir_synced: dict[tuple[int, int], int], committed: int, fraction: float,
        torn: bool, seed: int) -> None:
    changes = build(raw)
    # As the recorder keeps them: every fsyncdir is also a commit.
    syncs = Syncs(dir_synced, max([committed, *dir_synced.values()]))
    for model in ("posix", "ext4"):
        decision = decide(changes, syncs, model, torn=torn, keep_fraction=fraction,
                          rng=random.Random(seed))
        again = decide(changes, syncs, model, torn=torn, keep_fraction=fraction,
                       rng=random.Random(seed))
        assert decision == again  # seeded: the same choices
        names = [c for c in changes if not c.is_data]
        posix = posix_kept(changes, syncs)
        if model == "ext4":
            # ext4 keeps every namespace change before its last commit: a prefix.
            ext4_names = {c.seq for c in names if c.seq in decision.kept}
            assert ext4_names == {c.seq for c in names if c.seq < syncs.committed}
            assert posix <= ext4_names  # what posix keeps, ext4 keeps too
        else:
            assert {c.seq for c in names if c.seq in decision.kept} == posix
        for file in (F, G):
            data = [c for c in changes if c.is_data and c.file == file]
            kept = [c.seq in decision.kept for c in data]
            assert kept == sorted(kept, reverse=True)  # a prefix in issue order
            if fraction == 0.0:
                assert not any(kept)
            torn_here = [c for c in data if c.seq in decision.torn]
            assert len(torn_here) <= (1 if torn else 0)
            for c in torn_here:
                assert c.seq not in decision.kept and decision.torn[c.seq] < c.length
