"""Which recorded changes a power cut keeps: pure decisions, no FUSE, no I/O.

The daemon (quotafs/daemon/crashsim.py) records every change that is not durable yet, in
issue order, as a `Change`; a cut asks `decide()` which of them survive under a model, and
reverts the rest, newest first. docs/crash.md describes the models:

- posix: a file's data is durable at its fsync/fdatasync only (the recorder drops the
  changes then, so every data change here is unsynced and lost); a namespace change once
  every directory it changed was fsynced after it, and every earlier change it builds
  on (one that touched one of the same directories or inodes) is kept too.
- ext4: as data=ordered: every fsyncdir, and an fsync or fdatasync of a file with a
  journalled change since the last commit (a size, a name: the recorder tracks them),
  commits the journal, so every namespace change issued before the last commit is kept;
  data as under posix. (Measured: the fsync of a clean file commits nothing on ext4.)

`keep_fraction` lets a seeded share of each file's unsynced data changes survive, as a
prefix in issue order (what writeback of them in order would have left); `torn` lets each
file's last unsynced write that was not kept survive as a 512-byte-sector prefix.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Key = tuple[int, int]  # (st_dev, st_ino) of a backing inode

MODELS = ("posix", "ext4")
SECTOR = 512
DATA_KINDS = ("write", "truncate")


@dataclass(frozen=True, slots=True)  # slots: the recorder may keep 262,144 of them
class Change:
    """A recorded change, as the decisions see it.

    kind: "write" or "truncate" (data: `file` is the inode), or a namespace change
    ("create", "remove", "rename", "link"): `dirs` are the directories whose entries it
    changed, `subjects` the inodes it named (the new one, the removed one, the moved one
    and the one it replaced). `offset`/`length`: a write's range.
    """

    seq: int
    kind: str
    file: Key | None = None
    dirs: tuple[Key, ...] = ()
    subjects: tuple[Key, ...] = ()
    offset: int = 0
    length: int = 0

    @property
    def is_data(self) -> bool:
        return self.kind in DATA_KINDS


@dataclass(frozen=True)
class Syncs:
    """What was made durable: each directory's last fsyncdir, the last journal commit
    (ext4's: any fsyncdir, an fsync or fdatasync of a file with uncommitted changes), as
    the sequence number then current (a change with a lower seq came before it)."""

    dir_synced: Mapping[Key, int] = field(default_factory=dict)
    committed: int = 0


@dataclass(frozen=True)
class Decision:
    """kept: the seqs that survive whole; torn: seq -> bytes of that write that survive
    (a prefix); every other recorded change is reverted."""

    kept: frozenset[int]
    torn: Mapping[int, int]


def posix_kept(changes: Iterable[Change], syncs: Syncs) -> set[int]:
    """The namespace changes durable under posix: every directory they changed fsynced
    after them, and no earlier change they build on lost (a name made in a directory whose
    own creation is lost cannot survive either)."""
    kept: set[int] = set()
    lost_keys: set[Key] = set()
    for change in sorted(changes, key=lambda c: c.seq):
        if change.is_data:
            continue
        keys = set(change.dirs) | set(change.subjects)
        synced = all(syncs.dir_synced.get(d, -1) > change.seq for d in change.dirs)
        if synced and not keys & lost_keys:
            kept.add(change.seq)
        else:
            lost_keys |= keys
    return kept


def decide(changes: Iterable[Change], syncs: Syncs, model: str, *, torn: bool = False,
           keep_fraction: float = 0.0, rng: random.Random | None = None) -> Decision:
    """Which recorded changes a cut keeps under `model` (see the module docstring)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be from 0 to 1, got {keep_fraction!r}")
    ordered = sorted(changes, key=lambda c: c.seq)
    rng = rng or random.Random(0)
    if model == "posix":
        kept = posix_kept(ordered, syncs)
    else:
        kept = {c.seq for c in ordered if not c.is_data and c.seq < syncs.committed}
    torn_bytes: dict[int, int] = {}
    by_file: dict[Key, list[Change]] = {}
    for change in ordered:
        if change.is_data and change.file is not None:
            by_file.setdefault(change.file, []).append(change)
    for file in sorted(by_file):  # a fixed order: the same seed makes the same choices
        data = by_file[file]
        prefix = sum(1 for _ in data if keep_fraction and rng.random() < keep_fraction)
        kept.update(c.seq for c in data[:prefix])
        if torn:
            rest = [c for c in data[prefix:] if c.kind == "write" and c.length]
            if rest:
                torn_bytes[rest[-1].seq] = torn_prefix(rest[-1], rng)
    return Decision(frozenset(kept), torn_bytes)


def torn_prefix(write: Change, rng: random.Random) -> int:
    """How many bytes of `write` a torn cut keeps: up to a sector boundary of the file,
    chosen at random, never the whole write (0 for one inside a single sector)."""
    start, end = write.offset, write.offset + write.length
    first = (start // SECTOR + 1) * SECTOR
    cuts = [start, *range(first, end, SECTOR)]
    return int(rng.choice(cuts)) - start
