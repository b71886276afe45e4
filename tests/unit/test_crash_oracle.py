"""The crash differential's oracle (tests/differential/crashes.py), pure: what the
standards promise after a sequence, and how a post-crash tree is judged against it."""

from __future__ import annotations

from tests.differential.crashes import (
    DIR,
    Fsync,
    FsyncDir,
    Link,
    Mkdir,
    Op,
    Oracle,
    Rename,
    Truncate,
    Unlink,
    Write,
    check_guaranteed,
    compare,
    mixes,
)
from tests.differential.machinery import pattern


def _oracle(*ops: Op) -> Oracle:
    oracle = Oracle()
    for op in ops:
        oracle.apply(op, None)
    return oracle


def test_only_synced_data_under_synced_names_is_promised() -> None:
    oracle = _oracle(Write("a", 0, 100, 1), Fsync("a"), FsyncDir(""), Write("a", None, 50, 2),
                     Write("b", 0, 10, 3), Mkdir("d"), FsyncDir(""), Write("d/a", 0, 5, 4),
                     Fsync("d/a"))
    promised = oracle.guaranteed()
    assert set(promised) == {"a", "b", "d"}  # d/a's name: d never fsynced
    assert promised["b"] is None and promised["d"] == DIR  # b never synced: any contents
    a = pattern(1, 0, 100)
    assert check_guaranteed({"a": a, "b": b"", "d": DIR}, oracle, "t") == []
    assert check_guaranteed({"a": a + pattern(2, 100, 50), "b": b"", "d": DIR}, oracle,
                            "t") == []  # the later append written back: allowed
    assert check_guaranteed({"a": a[:50], "b": b"", "d": DIR}, oracle, "t") == [
        "t lost a: the standards keep 100 B or later, it has 50 B"]
    assert check_guaranteed({"a": a, "d": DIR}, oracle, "t") == [
        "t lost b: the standards keep a file, it has missing"]


def test_a_name_changed_since_its_directory_sync_is_not_promised() -> None:
    oracle = _oracle(Write("a", 0, 10, 1), Write("b", 0, 10, 2), Fsync("a"), Fsync("b"),
                     FsyncDir(""), Rename("b", "a"), Unlink("a"))
    assert oracle.guaranteed() == {}  # both names changed since: either state is allowed


def test_renames_links_and_truncates_are_replayed() -> None:
    oracle = _oracle(Write("a", 0, 10, 1), Link("a", "b"), Rename("a", "b"),  # same file
                     Truncate("b", 4), Rename("b", "c"))
    assert oracle.entries[""] == {"a": 0, "c": 0}
    assert oracle.inodes[0].versions == [b"", pattern(1, 0, 10), pattern(1, 0, 4)]
    assert oracle.later_versions("c") == oracle.inodes[0].versions  # never synced


def test_compare_allows_later_contents_and_counts_them() -> None:
    oracle = _oracle(Write("a", 0, 600, 1), Fsync("a"), Write("a", 0, 600, 2))
    old, new = pattern(1, 0, 600), pattern(2, 0, 600)
    assert mixes(new[:512] + old[512:], [old, new])  # a sector of each
    assert not mixes(old[:100] + new[100:], [old, new])  # a split inside a sector
    found = compare({"a": old}, {"a": new, "x": b""}, oracle)
    assert (found.missing, found.matched, found.more_data, found.more_names) == ([], 0, 1, 1)
    found = compare({"a": old, "b": b""}, {"a": old[:10]}, oracle)
    assert found.missing == ["a: kept 600 B, real ext4 has 10 B",
                             "b: kept 0 B, real ext4 has missing"]


def test_a_rename_across_directories_needs_both_synced() -> None:
    ops: list[Op] = [Mkdir("d"), FsyncDir(""), Write("d/b", 0, 10, 1), Fsync("d/b"),
                     FsyncDir("d"), Rename("d/b", "a"), FsyncDir("")]
    assert set(_oracle(*ops).guaranteed()) == {"d"}  # d's removal of b not synced
    assert set(_oracle(*ops, FsyncDir("d")).guaranteed()) == {"d", "a"}


def test_a_posix_restore_may_be_missing_from_real_ext4() -> None:
    oracle = _oracle(Mkdir("d"), Write("a", None, 1, 1), Rename("a", "d/a"), FsyncDir(""))
    assert oracle.stable("d") and not oracle.stable("a")
    undone = {"d": DIR, "a": b""}  # the rename undone (d never synced); real committed it
    real = {"d": DIR, "d/a": pattern(1, 0, 1)}
    assert compare(undone, real, oracle).missing == ["a: kept 0 B, real ext4 has missing"]
    found = compare(undone, real, oracle, restores=True)
    assert (found.missing, found.restored, found.more_names) == ([], 1, 1)
    relinked = _oracle(Mkdir("d"), Write("a", None, 1, 1), FsyncDir(""), Rename("a", "d/a"),
                       Link("d/a", "a"))  # unbound and bound again: not stable
    assert not relinked.stable("a") and "a" not in relinked.guaranteed()
