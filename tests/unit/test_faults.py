"""The fault rule engine, pure: no FUSE, no mounts."""

from __future__ import annotations

import errno
import json
import random
import re
import shlex
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotafs.errors import ExitCode, QuotafsError
from quotafs.model.faults import (
    OPS,
    CrashCut,
    Effect,
    FaultEngine,
    RuleSpec,
    compile_glob,
    flip_one_bit,
    format_duration,
    load_rules_file,
    load_rules_toml,
    parse_duration,
    spec_from_args,
)


def engine_with(*specs: RuleSpec, seed: int = 1) -> FaultEngine:
    engine = FaultEngine(seed)
    engine.add_all(specs)
    return engine


def fired(engine: FaultEngine, requests: Sequence[tuple[str, str]]) -> list[str | None]:
    """The id of the rule that fired for each (op, path) request, or None."""
    out: list[str | None] = []
    for op, path in requests:
        effect = engine.check(op, path)
        out.append(effect.rule_id if effect else None)
    return out


def usage_error(message_part: str) -> Any:
    return pytest.raises(QuotafsError, match=re.escape(message_part))


# -- operations ---------------------------------------------------------------------------


def test_ops_are_the_documented_set() -> None:
    assert set(OPS) == {
        "lookup", "getattr", "setattr", "truncate", "open", "create", "read", "write",
        "flush", "fsync", "release", "mkdir", "rmdir", "unlink", "rename", "link",
        "symlink", "readlink", "mknod", "opendir", "readdir", "fsyncdir", "statfs",
        "getxattr", "setxattr", "listxattr", "removexattr", "access"}


def test_op_lists_are_canonical() -> None:
    assert spec_from_args("write,fsync,write", errno="EIO").ops == ("write", "fsync")
    assert spec_from_args(["fsync", "write"], errno="EIO").ops == ("write", "fsync")
    assert spec_from_args(" Read ", errno="EIO").ops == ("read",)


def test_unknown_op_is_refused_with_a_hint() -> None:
    with pytest.raises(QuotafsError) as info:
        spec_from_args("writ", errno="EIO")
    assert info.value.code == ExitCode.USAGE
    assert str(info.value).startswith('--op: unknown operation "writ"; did you mean "write"?')


def test_all_cannot_be_mixed_and_op_is_required() -> None:
    with usage_error('"all" cannot be combined'):
        spec_from_args("all,read", errno="EIO")
    with usage_error("--op: missing"):
        spec_from_args(None, errno="EIO")
    with usage_error("--op: empty"):
        spec_from_args([], errno="EIO")


def test_op_all_matches_every_operation() -> None:
    engine = engine_with(spec_from_args("all", errno="EIO"))
    for op in OPS:
        assert engine.check(op, "/x") == Effect("errno", errno.EIO, "r1")
    assert engine.rules()[0].matched == len(OPS)


def test_only_the_named_ops_match() -> None:
    engine = engine_with(spec_from_args("fsync,flush", errno="EIO"))
    hits = {op for op in OPS if engine.check(op, "/f") is not None}
    assert hits == {"fsync", "flush"}
    assert engine.rules()[0].matched == 2


# -- effects ------------------------------------------------------------------------------


def test_errno_effect_carries_the_number() -> None:
    engine = engine_with(spec_from_args("write", errno="enospc"))
    effect = engine.check("write", "/f")
    assert effect == Effect("errno", errno.ENOSPC, "r1")
    assert effect.describe() == "errno ENOSPC"
    assert engine.rules()[0].spec.errno == "ENOSPC"


@pytest.mark.parametrize("name", ["EIO", "ENOSPC", "EDQUOT", "EROFS", "EINTR", "EWOULDBLOCK"])
def test_any_errno_by_name(name: str) -> None:
    spec = spec_from_args("write", errno=name)
    assert spec.effect == "errno"
    assert spec.effect_value == getattr(errno, name)


@pytest.mark.parametrize("name", ["EFOO", "", "errorcode", "E", "5", "EIO2"])
def test_unknown_errno_is_refused(name: str) -> None:
    with usage_error("--errno: unknown errno name"):
        spec_from_args("write", errno=name)


def test_implausible_errno_warns() -> None:
    assert spec_from_args("write,fsync", errno="ENOSPC").warnings() == []
    assert spec_from_args("read", errno="EIO").warnings() == []
    (warning,) = spec_from_args("read,write", errno="EEXIST").warnings()
    assert "EEXIST" in warning and "read, write" in warning
    (warning,) = spec_from_args("read,mkdir", errno="EEXIST").warnings()
    assert "read" in warning and "mkdir" not in warning
    # "all": only warn when no operation at all can return it (plus the release note).
    assert not any("man pages" in w for w in spec_from_args("all", errno="EEXIST").warnings())
    assert any("ECHILD" in w for w in spec_from_args("all", errno="ECHILD").warnings())


def test_errno_on_release_and_enosys_warn() -> None:
    assert any("ignores errors from release" in w
               for w in spec_from_args("release", errno="EIO").warnings())
    assert any("not implemented" in w for w in spec_from_args("fsync", errno="ENOSYS").warnings())
    assert spec_from_args("release", delay="1ms").warnings() == []


def test_access_rules_warn_that_access_never_arrives() -> None:
    (warning,) = spec_from_args("access,open", delay="1ms").warnings()
    assert "default_permissions" in warning


def test_delay_effect() -> None:
    engine = engine_with(spec_from_args("read", delay="200ms"))
    effect = engine.check("read", "/f")
    assert effect is not None
    assert (effect.kind, effect.value, effect.seconds) == ("delay", 200_000, 0.2)
    assert effect.describe() == "delay 200ms"


@pytest.mark.parametrize(("text", "us"), [
    ("200ms", 200_000), ("2s", 2_000_000), ("1.5s", 1_500_000), ("500us", 500),
    ("500µs", 500), ("0s", 0), ("0.25ms", 250), ("3600s", 3_600_000_000)])
def test_parse_duration(text: str, us: int) -> None:
    assert parse_duration(text) == us


@pytest.mark.parametrize("text", [
    "2", "200", "ms", "1.5", " 2s", "2s ", "2 s", "-2s", "+2s", "2S", "2m", "2min", "1h",
    "1e3ms", "0.5us", ".5s", "2.s", "3601s", "inf s", "nan"])
def test_parse_duration_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=3600 * 1_000_000))
def test_format_duration_round_trips(us: int) -> None:
    assert parse_duration(format_duration(us)) == us


def test_short_write_effect_and_its_size() -> None:
    spec = spec_from_args("write", short_write="4K")
    assert spec.short_write == 4096
    engine = engine_with(spec)
    # Writes that could not be shortened do not match at all.
    assert engine.check("write", "/f", size=4096) is None
    assert engine.check("write", "/f", size=100) is None
    assert engine.check("write", "/f", size=4097) == Effect("short_write", 4096, "r1")
    assert engine.check("write", "/f") == Effect("short_write", 4096, "r1")  # size unknown
    assert engine.rules()[0].matched == 2


def test_short_write_only_with_write_alone() -> None:
    for ops in ("read", "write,read", "all"):
        with usage_error('--short-write: only valid with op "write" alone'):
            spec_from_args(ops, short_write=4096)


def test_corrupt_read_flips_one_bit_deterministically() -> None:
    data = bytes(range(256)) * 16

    def corruptions(seed: int) -> list[bytes]:
        engine = engine_with(spec_from_args("read", corrupt_read=True, seed=seed))
        effects = [engine.check("read", "/f") for _ in range(5)]
        return [e.corrupt(data) for e in effects if e is not None]

    first = corruptions(3)
    assert len(first) == 5
    for out in first:
        assert len(out) == len(data)
        assert sum(bin(a ^ b).count("1") for a, b in zip(out, data, strict=True)) == 1
    assert corruptions(3) == first
    assert corruptions(4) != first
    assert len(set(first)) > 1  # each firing picks its own position


# -- crash and drop-unsynced --------------------------------------------------------------


def test_crash_rule_gives_a_cut_with_a_seed_per_firing() -> None:
    spec = spec_from_args("write", path="/db/*", nth=3, crash=True, crash_model="ext4",
                          crash_torn=True)
    assert (spec.effect, spec.crash_model, spec.crash_torn) == ("crash", "ext4", True)
    assert spec.needs_crash_sim
    engine = engine_with(spec)
    effects = [engine.check("write", "/db/orders") for _ in range(4)]
    assert effects[:2] == [None, None] and effects[3] is None  # the 3rd match only
    cut = effects[2]
    assert cut is not None and cut.kind == "crash"
    assert cut.cut == CrashCut("ext4", True, 0.0, cut.value)
    assert cut.describe() == "crash ext4 torn"
    # The cut's seed is the rule's: the same rule seed gives the same cut.
    again = engine_with(spec_from_args("write", path="/db/*", nth=3, crash=True,
                                       crash_model="ext4", crash_torn=True,
                                       seed=engine.rules()[0].effective_seed), seed=99)
    assert [again.check("write", "/db/orders") for _ in range(3)][2] == cut


def test_crash_seeds_differ_per_firing_and_per_seed() -> None:
    def seeds(seed: int) -> list[int]:
        engine = engine_with(spec_from_args("fsync", crash=True, seed=seed))
        return [e.value for e in (engine.check("fsync", "/f") for _ in range(5)) if e]

    first = seeds(7)
    assert len(first) == 5 and len(set(first)) == 5
    assert seeds(7) == first and seeds(8) != first
    assert all(0 <= s < 2**32 for s in first)


def test_crash_defaults_to_posix_and_describes_itself() -> None:
    spec = spec_from_args("rename", crash=True, crash_keep_fraction="0.25")
    assert spec.to_dict() == {"op": ["rename"], "crash": True, "crash_model": "posix",
                              "crash_keep_fraction": 0.25}
    assert spec.describe() == "--op rename --crash --crash-model posix --crash-keep-fraction 0.25"
    assert spec.crash_cut(5).describe() == "crash posix keep 0.25"
    rules = load_rules_toml('[[rule]]\nop = "fsync"\ncrash = true\ncrash_model = "ext4"\n')
    assert rules.rules[0] == spec_from_args("fsync", crash=True, crash_model="ext4")


def test_drop_unsynced_is_an_fsync_errno() -> None:
    spec = spec_from_args("fsync", errno="EIO", drop_unsynced=True, times=1)
    assert spec.needs_crash_sim and spec.warnings() == []
    engine = engine_with(spec_from_args("fsync", errno="EIO", drop_unsynced=True))
    assert engine.wants_unsynced
    # Nothing to write back, no writeback error: such fsyncs are not even matched.
    assert engine.check("fsync", "/db/wal") is None
    assert engine.check("fsync", "/db/wal", unsynced=False) is None
    assert engine.rules()[0].matched == 0
    effect = engine.check("fsync", "/db/wal", unsynced=True)
    assert effect == Effect("errno", errno.EIO, "r1", drop_unsynced=True)
    assert not engine_with(spec_from_args("fsync", errno="EIO")).wants_unsynced
    assert effect.describe() == "errno EIO, unsynced writes dropped"
    assert spec.describe() == "--op fsync --errno EIO --drop-unsynced --times 1"
    assert not spec_from_args("fsync", errno="EIO").needs_crash_sim


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"op": "write", "errno": "EIO", "drop_unsynced": True},
     '--drop-unsynced: only valid with op "fsync" alone (fsync and fdatasync), got op "write"'),
    ({"op": "fsync,fsyncdir", "errno": "EIO", "drop_unsynced": True},
     '--drop-unsynced: only valid with op "fsync" alone'),
    ({"op": "fsync", "delay": "1s", "drop_unsynced": True},
     "--drop-unsynced: needs --errno: the error the failed fsync answers, e.g. EIO"),
    ({"op": "fsync", "crash": True, "drop_unsynced": True}, "--drop-unsynced: needs --errno"),
    ({"op": "fsync", "errno": "EIO", "crash_torn": True},
     "--crash-torn: only valid with --crash"),
    ({"op": "fsync", "errno": "EIO", "crash_model": "ext4"},
     "--crash-model: only valid with --crash"),
    ({"op": "fsync", "crash": True, "crash_model": "xfs"},
     '--crash-model: must be posix or ext4, got "xfs"'),
    ({"op": "fsync", "crash": True, "crash_keep_fraction": "1.5"},
     "--crash-keep-fraction: must be between 0 and 1, got 1.5"),
    ({"op": "fsync", "crash": True, "crash_keep_fraction": "half"},
     '--crash-keep-fraction: must be a number between 0 and 1, got "half"'),
    ({"op": "fsync", "crash": True, "errno": "EIO"},
     "options --errno and --crash: a rule has exactly one effect"),
])
def test_crash_and_drop_unsynced_mistakes_are_one_line(kwargs: dict[str, Any],
                                                       message: str) -> None:
    op = kwargs.pop("op")
    with pytest.raises(QuotafsError) as info:
        spec_from_args(op, **kwargs)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.code == ExitCode.USAGE


@pytest.mark.parametrize(("rule", "message"), [
    ('op = "fsync"\ncrash = false', 'rule 1: field "crash": must be true'),
    ('op = "fsync"\ncrash = true\ncrash_torn = 1', 'rule 1: field "crash_torn": must be true'),
    ('op = "fsync"\ncrash = true\ncrash_model = 2',
     'rule 1: field "crash_model": must be posix or ext4, got 2'),
    ('op = "fsync"\nerrno = "EIO"\ndrop_unsynced = "yes"',
     'rule 1: field "drop_unsynced": must be true'),
    ('op = "fsync"\ndelay = "1s"\ndrop_unsynced = true',
     'rule 1: field "drop_unsynced": needs field "errno"'),
    ('op = "write"\nerrno = "EIO"\ncrash_keep_fraction = 0.5',
     'rule 1: field "crash_keep_fraction": only valid with field "crash"'),
])
def test_crash_fields_in_rules_files_name_rule_and_field(rule: str, message: str) -> None:
    with pytest.raises(QuotafsError) as info:
        load_rules_toml(f"[[rule]]\n{rule}\n")
    assert str(info.value).startswith(message), str(info.value)


def test_corrupt_read_only_with_read_alone_and_must_be_true() -> None:
    with usage_error('--corrupt-read: only valid with op "read" alone'):
        spec_from_args("write", corrupt_read=True)
    with usage_error('rule 1: field "corrupt_read": must be true'):
        load_rules_toml('[[rule]]\nop = "read"\ncorrupt_read = false\n')


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=2**32))
def test_flip_one_bit(data: bytes, seed: int) -> None:
    out = flip_one_bit(data, random.Random(seed))
    assert out == flip_one_bit(data, random.Random(seed))
    if not data:
        assert out == data
    else:
        assert len(out) == len(data)
        assert sum(bin(a ^ b).count("1") for a, b in zip(out, data, strict=True)) == 1


def test_corrupt_on_other_effects_is_a_bug() -> None:
    with pytest.raises(ValueError):
        Effect("errno", 5, "r1").corrupt(b"x")


def test_exactly_one_effect() -> None:
    with usage_error("no effect: give exactly one of --errno, --delay"):
        spec_from_args("write")
    with usage_error("options --errno and --delay: a rule has exactly one effect"):
        spec_from_args("write", errno="EIO", delay="1s")


# -- triggers -----------------------------------------------------------------------------


def test_always_is_the_default() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO"))
    assert all(engine.check("write", f"/f{i}") for i in range(100))
    assert engine.check("read", "/f") is None
    rule = engine.rules()[0]
    assert (rule.matched, rule.fired, rule.retired) == (100, 100, False)


def test_probability_zero_never_fires() -> None:
    spec = spec_from_args("write", errno="EIO", probability="0")
    assert "never fires" in spec.warnings()[0]
    for seed in range(5):
        engine = engine_with(spec, seed=seed)
        assert not any(engine.check("write", "/f") for _ in range(10_000))
        assert engine.rules()[0].matched == 10_000


def test_probability_one_always_fires() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", probability=1))
    assert all(engine.check("write", "/f") for _ in range(10_000))


def test_probability_fires_at_about_its_rate() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", probability=0.25, seed=11))
    hits = sum(engine.check("write", "/f") is not None for _ in range(10_000))
    assert 2200 < hits < 2800


@settings(max_examples=50)
@given(seed=st.integers(min_value=0, max_value=2**32),
       p=st.floats(min_value=0.05, max_value=0.95),
       requests=st.lists(st.sampled_from([("write", "/a"), ("write", "/b/c"), ("read", "/a"),
                                          ("fsync", "/a")]), min_size=1, max_size=60))
def test_same_seed_same_firing_pattern(seed: int, p: float,
                                       requests: list[tuple[str, str]]) -> None:
    specs = [spec_from_args("write,fsync", errno="EIO", probability=p),
             spec_from_args("all", delay="1ms", probability=p)]
    assert fired(engine_with(*specs, seed=seed), requests) == \
        fired(engine_with(*specs, seed=seed), requests)


def test_different_seeds_differ() -> None:
    requests = [("write", "/f")] * 200
    spec = spec_from_args("write", errno="EIO", probability=0.5)
    patterns = {tuple(fired(engine_with(spec, seed=seed), requests)) for seed in range(10)}
    assert len(patterns) == 10
    # A per-rule seed wins over the engine seed.
    seeded = spec_from_args("write", errno="EIO", probability=0.5, seed=99)
    assert fired(engine_with(seeded, seed=1), requests) == fired(engine_with(seeded, seed=2),
                                                                 requests)


def test_one_draw_per_matching_request() -> None:
    """A rule's draws do not depend on its other triggers or on other rules."""
    n = 300
    plain = engine_with(spec_from_args("write", errno="EIO", probability=0.5, seed=5))
    reference = [plain.check("write", "/f") is not None for _ in range(n)]
    rng = random.Random(5)  # the rule's own seed is its generator's seed
    assert reference == [rng.random() < 0.5 for _ in range(n)]

    # Same seed, with after-bytes: before the threshold the draws are still taken.
    gated = engine_with(spec_from_args("write", errno="EIO", probability=0.5, seed=5,
                                       after_bytes=1))
    pattern = []
    for i in range(n):
        if i == 100:
            gated.note_written("/f", 1)
        pattern.append(gated.check("write", "/f") is not None)
    assert pattern[:100] == [False] * 100
    assert pattern[100:] == reference[100:]

    # An earlier rule that fires on some requests shadows, but does not shift the draws.
    both = engine_with(spec_from_args("write", errno="EROFS", nth=3),
                       spec_from_args("write", errno="EIO", probability=0.5, seed=5))
    got = [both.check("write", "/f") for _ in range(n)]
    assert [e is not None and e.rule_id == "r2" for e in got] == \
        [hit and i != 2 for i, hit in enumerate(reference)]


def test_nth_fires_exactly_once_on_the_nth_match() -> None:
    engine = engine_with(spec_from_args("fsync", path="/db/*", errno="EIO", nth=3))
    results = []
    for i in range(10):
        engine.check("write", "/db/x")  # other ops do not count
        engine.check("fsync", "/other")  # other paths do not count
        results.append(engine.check("fsync", f"/db/{i}") is not None)
    assert results == [False, False, True] + [False] * 7
    rule = engine.rules()[0]
    assert (rule.matched, rule.fired, rule.retired) == (3, 1, True)
    assert not engine.active


def test_nth_that_misses_its_chance_retires() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", nth=2, probability=0))
    for _ in range(5):
        assert engine.check("write", "/f") is None
    assert engine.rules()[0].retired and engine.rules()[0].matched == 2


def test_times_retires_the_rule() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", times=3))
    assert [engine.check("write", "/f") is not None for _ in range(6)] == [True] * 3 + [False] * 3
    rule = engine.rules()[0]
    assert (rule.matched, rule.fired, rule.retired) == (3, 3, True)
    assert not engine.active
    assert engine.rules() == [rule]  # retired rules stay listed


def test_nth_and_times_combine() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", nth=4, times=1))
    assert [engine.check("write", "/f") is not None for _ in range(8)] == \
        [False, False, False, True] + [False] * 4


def test_times_with_probability() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", times=5, probability=0.3))
    hits = sum(engine.check("write", "/f") is not None for _ in range(1000))
    assert hits == 5


def test_after_bytes_without_glob_counts_every_write() -> None:
    engine = engine_with(spec_from_args("write", errno="ENOSPC", after_bytes="10K"))
    assert engine.check("write", "/a") is None
    engine.note_written("/a", 6 * 1024)
    assert engine.check("write", "/b") is None
    engine.note_written("/deep/b", 4 * 1024 - 1)
    assert engine.check("write", "/a") is None
    engine.note_written("/c", 1)  # exactly 10K: fires from now on
    assert engine.check("write", "/a") is not None
    assert engine.check("write", "/z/z") is not None
    assert engine.rules()[0].to_dict()["written"] == 10 * 1024


def test_after_bytes_with_glob_counts_matching_files_only() -> None:
    engine = engine_with(spec_from_args("write", path="/logs/*.log", errno="ENOSPC",
                                        after_bytes="1M"))
    engine.note_written("/data/big", 50 * 2**20)
    engine.note_written("/logs/a.txt", 2**20)
    assert engine.check("write", "/logs/a.log") is None
    engine.note_written("/logs/a.log", 2**19)
    engine.note_written("/logs/new.log", 2**19)  # created after the rule: counts too
    assert engine.check("write", "/logs/a.log") is not None
    assert engine.check("write", "/logs/other.log") is not None
    assert engine.check("write", "/data/big") is None  # not matched by the glob


def test_after_bytes_counts_from_when_the_rule_was_added() -> None:
    engine = FaultEngine(1)
    engine.add(spec_from_args("write", errno="EIO", after_bytes=100))
    engine.note_written("/f", 100)
    late = engine.add(spec_from_args("write", errno="EROFS", after_bytes=100))
    assert late.written == 0
    assert engine.check("write", "/f") == Effect("errno", errno.EIO, "r1")


def test_after_bytes_with_probability() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", after_bytes=10, probability=0.5))
    assert not any(engine.check("write", "/f") for _ in range(200))
    engine.note_written("/f", 10)
    hits = sum(engine.check("write", "/f") is not None for _ in range(200))
    assert 50 < hits < 150


# -- paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "matches", "misses"), [
    ("/logs/*.log", ["/logs/a.log", "/logs/.log"], ["/logs/x/a.log", "/a.log", "/logs/a.logx"]),
    ("*.log", ["/a.log", "/x/y/a.log"], ["/", "/a.log/x", "/x.logs"]),
    ("/a/**", ["/a", "/a/b", "/a/b/c"], ["/ab", "/b/a", "/"]),
    ("/**/x", ["/x", "/a/x", "/a/b/x"], ["/ax", "/x/a"]),
    ("/a/**/b", ["/a/b", "/a/x/b", "/a/x/y/b"], ["/a/xb", "/b"]),
    ("/**", ["/", "/a", "/a/b/c"], []),
    ("**", ["/", "/a/b"], []),
    ("/", ["/"], ["/a"]),
    ("/f?", ["/f1"], ["/f", "/f12", "/f/"]),
    ("/[!a]*", ["/b", "/bcd"], ["/a", "/b/c"]),
    ("/[a-c]", ["/a", "/c"], ["/d"]),
    ("/[]x]", ["/]", "/x"], ["/y"]),
    ("/a.b", ["/a.b"], ["/axb"]),
    ("/db/(x)+", ["/db/(x)+"], ["/db/xx"]),
])
def test_glob_semantics(pattern: str, matches: list[str], misses: list[str]) -> None:
    engine = engine_with(spec_from_args("all", path=pattern, errno="EIO"))
    for path in matches:
        assert engine.check("getattr", path) is not None, path
    for path in misses:
        assert engine.check("getattr", path) is None, path


@pytest.mark.parametrize(("pattern", "reason"), [
    ("logs/*.log", "must start with /"), ("/logs/", "must not end with /"),
    ("/a//b", "empty, . or .."), ("/a/../b", "empty, . or .."), ("/a**", "whole path segment"),
    ("**.log", "whole path segment"), ("/[ab", "unclosed ["), ("/[z-a]", "invalid [...] class"),
    ("", "empty pattern"), ("/a\0", "NUL")])
def test_bad_globs_are_refused(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        compile_glob(pattern)
    with usage_error("--path: bad pattern"):
        spec_from_args("write", path=pattern, errno="EIO")


def test_glob_matches_either_path_of_rename() -> None:
    engine = engine_with(spec_from_args("rename", path="/logs/*", errno="EXDEV"))
    assert engine.check("rename", "/tmp/x", "/logs/x") is not None
    assert engine.check("rename", "/logs/x", "/tmp/x") is not None
    assert engine.check("rename", "/tmp/x", "/tmp/y") is None


# -- the engine ---------------------------------------------------------------------------


def test_empty_engine() -> None:
    engine = FaultEngine(None)
    assert isinstance(engine.seed, int) and 0 <= engine.seed < 2**32
    assert not engine.active
    assert engine.check("write", "/f") is None
    engine.note_written("/f", 10)
    assert engine.to_dict() == {"seed": engine.seed, "rules": []}


def test_bad_engine_seed() -> None:
    with usage_error("--seed"):
        FaultEngine(-1)


def test_ids_counters_remove_and_clear() -> None:
    engine = FaultEngine(7)
    r1 = engine.add(spec_from_args("write", errno="EIO"))
    r2 = engine.add(spec_from_args("read", errno="EIO"))
    assert [r.id for r in engine.rules()] == ["r1", "r2"]
    assert r1.effective_seed != r2.effective_seed  # derived per rule, not shared
    assert engine.remove("r1") is r1
    with pytest.raises(QuotafsError) as info:
        engine.remove("r1")
    assert info.value.code == ExitCode.USAGE and "rules: r2" in str(info.value)
    assert engine.add(spec_from_args("write", errno="EIO")).id == "r3"  # never reused
    assert engine.clear() == 2
    assert engine.rules() == [] and not engine.active
    assert engine.add(spec_from_args("write", errno="EIO")).id == "r4"
    stats = engine.statistics()
    assert (stats.seed, stats.rules, stats.active, stats.fired) == (7, 1, 1, 0)


def test_first_rule_that_fires_wins_and_others_are_shadowed() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", times=2),
                         spec_from_args("write", delay="1ms", times=1),
                         spec_from_args("all", errno="EROFS"))
    results = [engine.check("write", "/f") for _ in range(4)]
    assert [e.rule_id if e else None for e in results] == ["r1", "r1", "r2", "r3"]
    r1, r2, r3 = engine.rules()
    assert (r1.fired, r2.fired, r2.shadowed, r3.fired, r3.shadowed) == (2, 1, 2, 1, 3)
    assert r2.matched == 3  # it stopped matching once retired


def test_effective_seed_replays_a_rule_alone() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", probability=0.5), seed=1234)
    rule = engine.rules()[0]
    pattern = fired(engine, [("write", "/f")] * 100)
    replay = engine_with(spec_from_args("write", errno="EIO", probability=0.5,
                                        seed=rule.effective_seed), seed=1)
    assert fired(replay, [("write", "/f")] * 100) == pattern


def test_add_revalidates_hand_built_specs() -> None:
    with usage_error("must be between 0 and 1"):
        FaultEngine(1).add(RuleSpec(ops=("write",), errno="EIO", probability=2.0))
    with usage_error("unknown errno"):
        FaultEngine(1).add(RuleSpec(ops=("write",), errno="NOPE"))


# -- serialisation ------------------------------------------------------------------------

_valid_spec_args = st.fixed_dictionaries(
    {"op": st.sampled_from(["write", "read", "fsync,flush", "fsync", "all"])},
    optional={
        "path": st.sampled_from(["/logs/*.log", "*.wal", "/a/**/b", "/"]),
        "probability": st.floats(min_value=0, max_value=1),
        "seed": st.integers(min_value=0, max_value=2**63),
        "after_bytes": st.integers(min_value=0, max_value=2**40),
        "nth": st.integers(min_value=1, max_value=1000),
        "times": st.integers(min_value=1, max_value=1000),
    })


@st.composite
def valid_specs(draw: st.DrawFn) -> RuleSpec:
    args: dict[str, Any] = draw(_valid_spec_args)
    effects: list[dict[str, Any]] = [
        {"errno": draw(st.sampled_from(["EIO", "ENOSPC", "EEXIST", "EWOULDBLOCK"]))},
        {"delay": format_duration(draw(st.integers(min_value=0, max_value=3_600_000_000)))}]
    if args["op"] == "write":
        effects.append({"short_write": draw(st.integers(min_value=1, max_value=2**31))})
    if args["op"] == "read":
        effects.append({"corrupt_read": True})
    crash: dict[str, Any] = {"crash": True}
    crash.update(draw(st.fixed_dictionaries({}, optional={
        "crash_model": st.sampled_from(["posix", "ext4"]), "crash_torn": st.just(True),
        "crash_keep_fraction": st.floats(min_value=0, max_value=1)})))
    effects.append(crash)
    if args["op"] == "fsync":
        effects.append({"errno": "EIO", "drop_unsynced": True})
    return spec_from_args(**args, **draw(st.sampled_from(effects)))


@given(valid_specs())
def test_spec_dict_round_trip(spec: RuleSpec) -> None:
    data = json.loads(json.dumps(spec.to_dict()))
    assert RuleSpec.from_dict(data) == spec


FLAGS = ("corrupt_read", "crash", "crash_torn", "drop_unsynced")  # options with no value


@given(valid_specs())
def test_describe_round_trips_through_cli_options(spec: RuleSpec) -> None:
    words = shlex.split(spec.describe())
    kwargs: dict[str, Any] = {}
    while words:
        option = words.pop(0).removeprefix("--").replace("-", "_")
        kwargs[option] = True if option in FLAGS else words.pop(0)
    assert spec_from_args(**kwargs) == spec


def test_rule_to_dict_has_counters_and_round_trips() -> None:
    engine = engine_with(spec_from_args("write", path="/logs/*", errno="ENOSPC",
                                        after_bytes="1K", times=1))
    engine.note_written("/logs/a", 2048)
    engine.check("write", "/logs/a")
    data = json.loads(json.dumps(engine.to_dict()))
    (rule,) = data["rules"]
    assert rule == {"id": "r1", "op": ["write"], "path": "/logs/*", "errno": "ENOSPC",
                    "after_bytes": 1024, "times": 1,
                    "effective_seed": engine.rules()[0].effective_seed, "matched": 1,
                    "fired": 1, "shadowed": 0, "retired": True, "written": 2048,
                    "warnings": []}
    assert RuleSpec.from_dict(rule, allow_status=True) == engine.rules()[0].spec
    with usage_error('rule: field "id": unknown field'):
        RuleSpec.from_dict(rule)


def test_from_dict_treats_null_as_absent() -> None:
    spec = RuleSpec.from_dict({"op": "write", "errno": "EIO", "path": None, "times": None})
    assert spec == spec_from_args("write", errno="EIO")
    with usage_error("must be a table"):
        RuleSpec.from_dict(["op"])  # type: ignore[arg-type]


# -- CLI-ish arguments --------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"probability": "1.5"}, "--probability: must be between 0 and 1, got 1.5"),
    ({"probability": "-0.1"}, "--probability: must be between 0 and 1, got -0.1"),
    ({"probability": "nan"}, "--probability: must be between 0 and 1, got nan"),
    ({"probability": "half"}, '--probability: must be a number between 0 and 1, got "half"'),
    ({"nth": "0"}, "--nth: must be >= 1, got 0"),
    ({"nth": "2.5"}, '--nth: must be a whole number, got "2.5"'),
    ({"times": "-1"}, "--times: must be >= 1, got -1"),
    ({"seed": "-3"}, "--seed: must be >= 0, got -3"),
    ({"after_bytes": "10Q"}, "--after-bytes: invalid size '10Q'"),
    ({"after_bytes": -5}, "--after-bytes: must be >= 0, got -5"),
])
def test_cli_values_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(QuotafsError) as info:
        spec_from_args("write", errno="EIO", **kwargs)
    assert str(info.value).startswith(message)
    assert info.value.code == ExitCode.USAGE


def test_cli_accepts_typed_values_too() -> None:
    assert spec_from_args("write", errno="EIO", probability=0.5, nth=2, times=3, seed=4,
                          after_bytes=5) == \
        spec_from_args("write", errno="EIO", probability="0.5", nth="2", times="3", seed="4",
                       after_bytes="5")


def test_bad_cli_delay_and_size() -> None:
    with usage_error("--delay: invalid duration '2'"):
        spec_from_args("read", delay="2")
    with usage_error("--short-write: invalid size '4X'"):
        spec_from_args("write", short_write="4X")


# -- rule files ---------------------------------------------------------------------------

EXAMPLE = """
seed = 42            # optional

[[rule]]
op = ["fsync"]       # or "fsync"
path = "/db/*.wal"
errno = "EIO"
times = 1

[[rule]]
op = "write"
path = "/logs/**"
errno = "ENOSPC"
after_bytes = "10M"

[[rule]]
op = ["read", "write"]
delay = "200ms"
probability = 0.1
seed = 7
"""


def test_example_rules_file() -> None:
    parsed = load_rules_toml(EXAMPLE)
    assert parsed.seed == 42 and parsed.warnings == []
    assert parsed.rules == [
        RuleSpec(ops=("fsync",), path="/db/*.wal", errno="EIO", times=1),
        RuleSpec(ops=("write",), path="/logs/**", errno="ENOSPC", after_bytes=10 * 2**20),
        RuleSpec(ops=("read", "write"), delay_us=200_000, probability=0.1, seed=7),
    ]
    engine = FaultEngine(parsed.seed)
    engine.add_all(parsed.rules)
    assert engine.check("fsync", "/db/x.wal") == Effect("errno", errno.EIO, "r1")
    assert engine.check("fsync", "/db/x.wal") is None


def test_empty_rules_file() -> None:
    parsed = load_rules_toml("")
    assert (parsed.seed, parsed.rules) == (None, [])


def test_rules_file_warnings_name_the_rule() -> None:
    parsed = load_rules_toml('[[rule]]\nop="write"\nerrno="EIO"\n'
                             '[[rule]]\nop="read"\nerrno="EEXIST"\n')
    assert len(parsed.warnings) == 1 and parsed.warnings[0].startswith("rule 2: EEXIST")


GOOD = 'op = "write"\nerrno = "EIO"\n'


@pytest.mark.parametrize(("rule", "message"), [
    # unknown keys
    (GOOD + "probabilty = 0.5", 'rule 2: field "probabilty": unknown field; did you mean '
                                '"probability"?'),
    (GOOD + "short-write = 1", 'rule 2: field "short-write": unknown field; did you mean '
                               '"short_write"?'),
    # wrong types
    ('op = 5\nerrno = "EIO"', 'rule 2: field "op": must be an operation name or a list'),
    ('op = ["write", 5]\nerrno = "EIO"', 'rule 2: field "op": must be operation names, got 5'),
    (GOOD + "path = 5", 'rule 2: field "path": must be a glob'),
    ('op = "write"\nerrno = 5', 'rule 2: field "errno": must be an errno name such as "EIO", '
                                "got 5"),
    ('op = "read"\ndelay = 2', 'rule 2: field "delay": must be a duration such as "200ms", '
                               "got 2"),
    (GOOD + 'probability = "0.5"', 'rule 2: field "probability": must be a number between 0 '
                                   'and 1, got "0.5"'),
    (GOOD + "probability = true", 'rule 2: field "probability": must be a number between 0 '
                                  "and 1, got true"),
    (GOOD + "nth = 2.0", 'rule 2: field "nth": must be a whole number, got 2.0'),
    (GOOD + 'times = "3"', 'rule 2: field "times": must be a whole number, got "3"'),
    (GOOD + "seed = true", 'rule 2: field "seed": must be a whole number, got true'),
    (GOOD + "after_bytes = 1.5", 'rule 2: field "after_bytes": must be a size such as 4096'),
    # bad values
    (GOOD + "probability = 1.5", 'rule 2: field "probability": must be between 0 and 1, '
                                 "got 1.5"),
    (GOOD + "probability = -1", 'rule 2: field "probability": must be between 0 and 1, got -1'),
    (GOOD + "nth = 0", 'rule 2: field "nth": must be >= 1, got 0'),
    (GOOD + "times = -2", 'rule 2: field "times": must be >= 1, got -2'),
    (GOOD + "seed = -1", 'rule 2: field "seed": must be >= 0, got -1'),
    (GOOD + "after_bytes = -1", 'rule 2: field "after_bytes": must be >= 0, got -1'),
    (GOOD + 'after_bytes = "ten"', "rule 2: field \"after_bytes\": invalid size 'ten'"),
    ('op = "read"\ndelay = "2"', "rule 2: field \"delay\": invalid duration '2'"),
    ('op = "read"\ndelay = "2h"', "rule 2: field \"delay\": invalid duration '2h'"),
    ('op = "write"\nshort_write = "4Q"', "rule 2: field \"short_write\": invalid size '4Q'"),
    ('op = "write"\nerrno = "EFOO"', 'rule 2: field "errno": unknown errno name "EFOO"'),
    ('op = "wrte"\nerrno = "EIO"', 'rule 2: field "op": unknown operation "wrte"'),
    ('errno = "EIO"', 'rule 2: field "op": missing'),
    (GOOD + 'path = "logs/*"', 'rule 2: field "path": bad pattern "logs/*": a pattern with a / '
                               "must start with /"),
    # effects
    ('op = "write"', "rule 2: no effect: give exactly one of the fields errno, delay, "
                     "short_write, corrupt_read"),
    (GOOD + 'delay = "1s"', 'rule 2: fields "errno" and "delay": a rule has exactly one effect'),
    ('op = "read"\nshort_write = 4096', 'rule 2: field "short_write": only valid with op '
                                        '"write" alone, got op "read"'),
    ('op = ["write", "fsync"]\nshort_write = 1', 'rule 2: field "short_write": only valid with '
                                                 'op "write" alone, got op "write,fsync"'),
    ('op = "write"\ncorrupt_read = true', 'rule 2: field "corrupt_read": only valid with op '
                                          '"read" alone'),
])
def test_rules_file_errors_name_rule_and_field(rule: str, message: str) -> None:
    text = f"[[rule]]\n{GOOD}\n[[rule]]\n{rule}\n"
    with pytest.raises(QuotafsError) as info:
        load_rules_toml(text)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.code == ExitCode.USAGE


@pytest.mark.parametrize(("text", "message"), [
    ("seed = 1\n[rule]\nop = 'write'\nerrno = 'EIO'\n",
     'rules file: field "rule": write each rule as [[rule]]'),
    ("rule = 5\n", 'rules file: field "rule": must be [[rule]] tables, got 5'),
    ("rule = [5]\n", "rule 1: must be a table of fields, got 5"),
    ("seed = -1\n", 'rules file: field "seed": must be >= 0, got -1'),
    ("seed = 'x'\n", 'rules file: field "seed": must be a whole number'),
    ("op = 'write'\n", 'rules file: field "op": unknown field; a rules file has "seed" and '
                       "[[rule]] tables (each rule is a [[rule]] table)"),
    ("[[rule]\n", "rules file: invalid TOML"),
    ("[[rule]]\nop = 'write'\nop = 'read'\n", "rules file: invalid TOML"),
])
def test_rules_file_structure_errors(text: str, message: str) -> None:
    with pytest.raises(QuotafsError) as info:
        load_rules_toml(text)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.code == ExitCode.USAGE


def test_load_rules_file(tmp_path: Any) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(EXAMPLE)
    assert load_rules_file(path).seed == 42
    path.write_text("[[rule]]\nop = 'write'\n")
    with usage_error(f"{path}: rule 1: no effect"):
        load_rules_file(path)
    with usage_error(f"cannot read rules file {tmp_path / 'missing.toml'}: No such file"):
        load_rules_file(tmp_path / "missing.toml")


def test_could_match_follows_ops_paths_and_retirement() -> None:
    engine = engine_with(spec_from_args("read", path="/logs/*.log", errno="EIO", times=1),
                         spec_from_args("all", path="/never/here", errno="EIO"))
    assert engine.could_match("read", "/logs/a.log")
    assert not engine.could_match("read", "/logs/a.txt")
    assert not engine.could_match("write", "/logs/a.log")
    assert engine.could_match("write", "/never/here")  # "all" names every op
    assert engine.check("read", "/logs/a.log") is not None  # fires once, then retires
    assert not engine.could_match("read", "/logs/a.log")
    assert not engine_with().could_match("read", "/any")


@pytest.mark.parametrize(("pattern", "directory", "expected"), [
    ("/a/b", "/", True), ("/a/b", "/a", True), ("/a/b", "/a/b", False),
    ("/a/b", "/x", False), ("/a/*.log", "/a", True), ("/a/*.log", "/a/sub", True),
    ("/a/*.log", "/b", False), ("/a/**", "/a/b/c", True), ("/**", "/any", True),
    ("*.log", "/any/where", True), ("/", "/", False), ("/[ab]/c", "/z", True),
])
def test_may_match_below_is_conservative(pattern: str, directory: str,
                                         expected: bool) -> None:
    engine = engine_with(spec_from_args("all", path=pattern, errno="EIO"))
    assert engine.may_match_below(directory) is expected
    # Whatever it says, it never says no where a path below would match:
    regex = compile_glob(pattern)
    below = ("" if directory == "/" else directory) + "/x"
    if regex.fullmatch(below):
        assert engine.may_match_below(directory)


def test_generation_changes_with_the_live_rules() -> None:
    engine = FaultEngine(1)
    g0 = engine.generation
    engine.add(spec_from_args("read", errno="EIO", times=1))
    g1 = engine.generation
    assert g1 != g0
    engine.check("read", "/f")  # fires once and retires
    assert engine.generation != g1
    assert not engine.may_match_path("/f")


# -- from-nth and allocating (sweep --each-write: ENOSPC from the k-th allocating write) ----


def test_from_nth_fires_on_the_nth_match_and_every_later_one() -> None:
    engine = engine_with(spec_from_args("write", path="/db/*", errno="ENOSPC", from_nth=3))
    results = []
    for i in range(6):
        engine.check("fsync", "/db/x")  # other ops do not count
        engine.check("write", "/other")  # other paths do not count
        results.append(engine.check("write", f"/db/{i}") is not None)
    assert results == [False, False, True, True, True, True]
    rule = engine.rules()[0]
    assert (rule.matched, rule.fired, rule.retired) == (6, 4, False)


def test_from_nth_with_times_retires_after_the_firings() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO", from_nth=2, times=2))
    assert [engine.check("write", "/f") is not None for _ in range(5)] == \
        [False, True, True, False, False]
    assert not engine.active


def test_allocating_rule_matches_only_allocating_writes() -> None:
    engine = engine_with(spec_from_args("write", allocating=True, errno="ENOSPC", from_nth=2))
    assert engine.wants_allocation
    got = [engine.check("write", "/f", size=10, allocating=a) is not None
           for a in (True, False, None, False, True, False, True)]
    # overwrites (False) and requests that do not say (None) neither match nor count
    assert got == [False, False, False, False, True, False, True]
    assert engine.rules()[0].matched == 3


def test_wants_allocation_only_while_an_allocating_rule_is_live() -> None:
    engine = engine_with(spec_from_args("write", errno="EIO"))
    assert not engine.wants_allocation
    rule = engine.add(spec_from_args("write", allocating=True, errno="ENOSPC", nth=1))
    assert engine.wants_allocation
    engine.check("write", "/f", allocating=True)  # nth 1 fired: retired
    assert engine.get(rule.id).retired and not engine.wants_allocation


@pytest.mark.parametrize(("args", "message"), [
    ({"op": "read", "allocating": True},
     '--allocating: only valid with op "write" alone, got op "read"'),
    ({"op": "write,fsync", "allocating": True},
     '--allocating: only valid with op "write" alone, got op "write,fsync"'),
    ({"op": "write", "nth": "2", "from_nth": "3"},
     "options --nth and --from-nth: give one (the Nth match only, or the Nth and every "
     "later one)"),
    ({"op": "write", "from_nth": "0"}, "--from-nth: must be >= 1, got 0"),
    ({"op": "write", "from_nth": "x"}, '--from-nth: must be a whole number, got "x"'),
])
def test_from_nth_and_allocating_errors_name_the_option(args: dict[str, Any],
                                                        message: str) -> None:
    op = args.pop("op")
    with pytest.raises(QuotafsError) as info:
        spec_from_args(op, errno="ENOSPC", **args)
    assert str(info.value) == message


def test_from_nth_and_allocating_in_a_rules_file_round_trip() -> None:
    text = 'seed = 1\n[[rule]]\nop = "write"\nallocating = true\nerrno = "ENOSPC"\nfrom_nth = 4\n'
    [spec] = load_rules_toml(text).rules
    assert (spec.allocating, spec.from_nth) == (True, 4)
    assert RuleSpec.from_dict(spec.to_dict()) == spec
    assert spec.describe() == "--op write --allocating --errno ENOSPC --from-nth 4"
    with pytest.raises(QuotafsError, match='rule 1: field "allocating": must be true'):
        load_rules_toml('[[rule]]\nop = "write"\nallocating = 1\nerrno = "EIO"\n')
    with pytest.raises(QuotafsError, match='rule 1: fields "nth" and "from_nth": give one'):
        load_rules_toml('[[rule]]\nop = "write"\nnth = 1\nfrom_nth = 2\nerrno = "EIO"\n')


def test_a_down_device_makes_the_engine_active_until_revived() -> None:
    # Handlers skip the gate while no rule is live: a device a cut left down must not be
    # skipped once its (nth) rule has retired.
    engine = FaultEngine(seed=1)
    assert not engine.active
    assert engine.set_down(True) is False
    assert engine.active and engine.down
    engine.add(spec_from_args("write", errno="EIO"))
    engine.clear()
    assert engine.active  # still down with no rule at all
    assert engine.set_down(False) is True
    assert not engine.active and not engine.down
