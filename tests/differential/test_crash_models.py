"""quotafs's crash models against a real power cut on ext4 (root only; skipped with the
reason, and the doctor hint, where there is no FUSE or no loop device).

Hypothesis generates short sequences of operations over a few names (tests/differential/
crashes.py: create+write, append, overwrite, truncate, fsync, fdatasync, fsync of a
directory, rename also over an existing file, unlink, mkdir, link). Each sequence runs

- on a loop-ext4, which then has its power cut (FS_IOC_SHUTDOWN without log flush,
  unmount, mount again: Ext4Loop.power_cut);
- on a quotafs mounted with crash_sim=True, cut with QuotaMount.crash(model="ext4"), and
  again (in a directory of its own) cut with model="posix".

Each run has a fresh directory (made durable before it starts: an fsync of its parent), so
one image and one mount serve the whole module, and a cut's survivors are the next run's
durable past. Asserted: everything the ext4 model keeps, the real cut keeps (names, kinds,
contents: data of synced files, committed names, zero-length files whose data never was
synced); everything the posix model keeps, the real cut keeps too; and the posix model
keeps everything the standards promise (so all it drops, they allow to be lost). Where
real ext4 keeps more than a model (writeback, auto_da_alloc, a journal commit), that is
allowed and counted, in the terminal summary's line.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotafs.client.api import QuotaMount, mounted
from quotafs.errors import QuotafsError
from quotafs.reference.loopext4 import Ext4Loop, open_ext4_loop
from tests.conftest import needs_fuse_and_loop_ext4
from tests.differential.crashes import (
    DIR,
    FILES,
    Comparison,
    Fsync,
    FsyncDir,
    Link,
    Mkdir,
    Op,
    Oracle,
    Rename,
    Tree,
    Truncate,
    Unlink,
    Write,
    check_guaranteed,
    compare,
    read_tree,
    run_op,
)
from tests.differential.machinery import image_workdir, wait_until

pytestmark = needs_fuse_and_loop_ext4

# Few examples, each a handful of operations: the cuts (an unmount and a mount each) are
# what costs, about 40 ms on ext4 here.
EXAMPLES = int(os.environ.get("QUOTAFS_CRASH_EXAMPLES", "60"))
MAX_OPS = 12

OFFSETS = st.one_of(st.sampled_from([0, 1, 511, 4096, 10_000]), st.integers(0, 40_000))
LENGTHS = st.one_of(st.sampled_from([1, 100, 4096, 5_000]), st.integers(1, 20_000))
NAME = st.sampled_from(FILES)
WRITE = st.builds(Write, NAME, st.none() | OFFSETS, LENGTHS, st.integers(0, 250))
OPS = st.one_of(
    WRITE, WRITE,  # twice: about a quarter of the steps write
    st.builds(Truncate, NAME, OFFSETS),
    st.builds(Fsync, NAME, st.booleans()),
    st.builds(FsyncDir, st.sampled_from(("", "d"))),
    st.builds(Rename, NAME, NAME),
    st.builds(Unlink, NAME),
    st.just(Mkdir("d")),
    st.builds(Link, NAME, NAME),
)
SEQUENCES = st.lists(OPS, min_size=1, max_size=MAX_OPS)
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


# -- the targets ---------------------------------------------------------------------------

_runs = itertools.count()


def _fresh_dir(top: str) -> str:
    """A new directory for one run, its name made durable (its parent fsynced)."""
    path = os.path.join(top, f"run{next(_runs)}")
    os.mkdir(path)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _run(root: str, ops: list[Op]) -> tuple[Oracle, list[str | None]]:
    oracle, outcomes = Oracle(), []
    for op in ops:
        outcome = run_op(root, op)
        oracle.apply(op, outcome)
        outcomes.append(outcome)
    return oracle, outcomes


def _script(ops: list[Op], outcomes: list[str | None]) -> str:
    return "\n".join(f"  {i + 1}. {op}  ->  {out or 'ok'}"
                     for i, (op, out) in enumerate(zip(ops, outcomes, strict=True)))


@pytest.fixture(scope="module")
def ext4() -> Iterator[Ext4Loop]:
    try:
        with open_ext4_loop(8 * 1024 * 1024, workdir=image_workdir()) as loop:
            yield loop
    except QuotafsError as exc:
        pytest.skip(f"no loop-ext4 here: {exc}")


def real_cut(ext4: Ext4Loop, ops: list[Op]) -> tuple[Oracle, list[str | None], Tree]:
    """`ops` on the loop-ext4, its power cut, and the tree that came back."""
    root = _fresh_dir(ext4.mountpoint)
    oracle, outcomes = _run(root, ops)
    ext4.power_cut()
    tree = read_tree(root)
    shutil.rmtree(root)  # the image's inodes last for a few hundred runs only
    return oracle, outcomes, tree


@pytest.fixture(scope="module")
def quota() -> Iterator[QuotaMount]:
    with mounted(crash_sim=True) as mount:
        yield mount


def model_cut(mount: QuotaMount, ops: list[Op], model: str) -> tuple[list[str | None], Tree]:
    """`ops` on the quotafs mount, a cut under `model`, and the tree after it."""
    root = _fresh_dir(mount.path)
    _, outcomes = _run(root, ops)
    # FUSE sends RELEASE after close(2) returns: let every handle go before the cut, or
    # a late release lands on a dead handle and the next run's numbers are off.
    assert wait_until(lambda: mount.status()["open_handles"] == 0)
    mount.crash(model=model)
    return outcomes, read_tree(root)


# -- the reference alone: real ext4 keeps what the standards promise ----------------------

def test_the_issues_measurement_against_both_models(ext4: Ext4Loop,
                                                    quota: QuotaMount) -> None:
    """a fsynced at 10,000 B then appended; b created and written, never synced; c
    created, written, fsynced after b: real ext4 and the ext4 model keep a at 10,000 B, b
    at size 0, c at 100 B; the posix model keeps neither b nor c (no directory fsync)."""
    ops: list[Op] = [Write("a", 0, 10_000, 1), Fsync("a"), FsyncDir(""),
                     Write("a", None, 5_000, 2), Write("b", 0, 100, 3),
                     Write("c", 0, 100, 4), Fsync("c")]
    _, _, real = real_cut(ext4, ops)
    assert {k: len(v) for k, v in real.items()} == {"a": 10_000, "b": 0, "c": 100}
    _, ext4_model = model_cut(quota, ops, "ext4")
    assert ext4_model == real
    _, posix = model_cut(quota, ops, "posix")
    assert posix == {"a": real["a"]}


# What real ext4 does in the cases that decide a model (docs/crash.md, "Against real
# ext4"): the sizes after the cut. Every case starts with a = 100 B, fsynced, name durable.
SYNCED_A: list[Op] = [Write("a", 0, 100, 1), Fsync("a"), FsyncDir("")]
FACTS: dict[str, tuple[list[Op], dict[str, int]]] = {
    # Only a journal commit makes a name durable, and an fsync commits only when the file
    # has something to commit: a clean file's fsync (or an in-place overwrite's
    # fdatasync) leaves an earlier create uncommitted.
    "fsync of a clean file commits nothing": (
        [*SYNCED_A, Write("b", 0, 10, 2), Fsync("a")], {"a": 100}),
    "fdatasync of a clean file commits nothing": (
        [*SYNCED_A, Write("b", 0, 10, 2), Fsync("a", data_only=True)], {"a": 100}),
    "fdatasync of an in-place overwrite commits nothing": (
        [*SYNCED_A, Write("b", 0, 10, 2), Write("a", 0, 10, 3), Fsync("a", data_only=True)],
        {"a": 100}),
    # (An in-place overwrite's fsync commits only if the coarse clock ticked since the
    # last write changed the mtime: nothing a model can predict, so no case here.)
    # A directory's fsync always commits (ext4_fsync_journal forces a full commit for
    # anything but a regular file), clean or not.
    "fsync of a clean directory commits every earlier name": (
        [*SYNCED_A, Mkdir("d"), Write("d/b", 0, 10, 2), FsyncDir("d"), Write("b", 0, 10, 3),
         FsyncDir("d")], {"a": 100, "d": -1, "d/b": 0, "b": 0}),
    "fsync of an appended file commits every earlier name": (
        [*SYNCED_A, Write("b", 0, 10, 2), Write("a", None, 10, 3), Fsync("a")],
        {"a": 110, "b": 0}),
    "fdatasync of an appended file commits every earlier name": (
        [*SYNCED_A, Write("b", 0, 10, 2), Write("a", None, 10, 3), Fsync("a", data_only=True)],
        {"a": 110, "b": 0}),
    # auto_da_alloc: replacing a file by rename, or truncating it to 0 and writing it,
    # starts the new data's writeback at once; the next commit waits for it (data=ordered).
    "rename over a file writes the new data back (auto_da_alloc)": (
        [*SYNCED_A, Write("t", 0, 50, 2), Rename("t", "a"), Write("z", 0, 10, 3), Fsync("z")],
        {"a": 50, "z": 10}),
    "truncate to 0 and rewrite writes the new data back (auto_da_alloc)": (
        [*SYNCED_A, Truncate("a", 0), Write("a", 0, 50, 2), Write("z", 0, 10, 3),
         Fsync("z")], {"a": 50, "z": 10}),
    "an unsynced rename is undone": (
        [*SYNCED_A, Rename("a", "b")], {"a": 100}),
}


@pytest.mark.parametrize("case", FACTS)
def test_real_ext4_facts(ext4: Ext4Loop, case: str) -> None:
    ops, sizes = FACTS[case]
    _, outcomes, real = real_cut(ext4, ops)
    assert outcomes == [None] * len(ops)
    assert {path: -1 if data == DIR else len(data) for path, data in real.items()} == sizes


@pytest.mark.timeout(600)
@SETTINGS
@given(ops=SEQUENCES)
def test_real_ext4_keeps_what_the_standards_promise(ext4: Ext4Loop, ops: list[Op]) -> None:
    """The oracle against the reference: every name a directory fsync made durable and
    every synced file's data (or later data of it) survive the real cut."""
    oracle, outcomes, real = real_cut(ext4, ops)
    problems = check_guaranteed(real, oracle, "real ext4")
    assert not problems, "\n".join([*problems, _script(ops, outcomes)])


# -- the models against the reference --------------------------------------------------------

@dataclass
class Totals:
    examples: int = 0
    ops: int = 0
    by_model: dict[str, Comparison] = field(default_factory=lambda: {
        "ext4": Comparison(), "posix": Comparison()})

    def add(self, model: str, found: Comparison) -> None:
        into = self.by_model[model]
        into.matched += found.matched
        into.more_data += found.more_data
        into.more_names += found.more_names
        into.restored += found.restored

    def line(self, seconds: float) -> str:
        parts = [f"{m} model: {c.matched:,} names as real ext4, real kept more in "
                 f"{c.more_data:,} files and {c.more_names:,} names"
                 + (f", {c.restored:,} undone changes real ext4 had committed"
                    if m == "posix" else "")
                 for m, c in self.by_model.items()]
        return (f"crash models vs real ext4 (shutdown ioctl): {self.examples} examples, "
                f"{self.ops:,} ops; " + "; ".join(parts) + f"; {seconds:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_models_against_real_ext4(ext4: Ext4Loop, quota: QuotaMount,
                                  terminal_summary: Callable[[str], None],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    totals = Totals()

    def example(ops: list[Op]) -> None:
        totals.examples += 1
        totals.ops += len(ops)
        oracle, outcomes, real = real_cut(ext4, ops)
        problems = check_guaranteed(real, oracle, "real ext4")
        for model in ("ext4", "posix"):
            got, tree = model_cut(quota, ops, model)
            if got != outcomes:
                problems.append(f"quotafs ({model}) answered {got}, ext4 {outcomes}")
                continue
            found = compare(tree, real, oracle, restores=model == "posix")
            problems += [f"{model} model keeps what the real cut lost: {m}"
                         for m in found.missing]
            if model == "posix":
                problems += check_guaranteed(tree, oracle, "the posix model")
            totals.add(model, found)
        assert not problems, "\n".join([*problems, _script(ops, outcomes)])

    test = given(ops=SEQUENCES)(example)
    for ops, _ in FACTS.values():  # the cases that decide a model, always among them
        test = hypothesis.example(ops=ops)(test)
    start = time.monotonic()
    try:
        SETTINGS(test)()
    finally:
        line = totals.line(time.monotonic() - start)
        terminal_summary(line)
        with capsys.disabled():
            print("\n" + line)
    assert totals.examples >= min(EXAMPLES, 30)

