"""compare -- CMD's pure logic: target names, what differs from the reference, the
--expect-same verdict and the printed table (no processes, no mounts)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from quotafs.compare import cmdreport
from quotafs.compare.command import CommandReport, TargetRun, differences, parse_targets
from quotafs.errors import QuotafsError


def run(target: str, **changes: Any) -> TargetRun:
    values: dict[str, Any] = dict(
        target=target, exit_code=0, signal=None, timed_out=False, check_exit_code=0,
        used_bytes=4096, files=1, dir_bytes=10, wall_s=0.5, events=[], ended="exit 0",
        check_ended="exit 0", check_signal=None, check_timed_out=False,
        stdout_tail="line 1\nlast \x1b[31mred", stderr_tail="", check_stderr_tail="")
    values.update(changes)
    return TargetRun(**values)


def report(runs: list[TargetRun], same: bool | None = None) -> CommandReport:
    return CommandReport(argv=("prog",), setup=None, check="true", timeout=5.0, user=None,
                         limit_requested=1 << 20, quotafs_limit=1000000,
                         quotafs_reserve=0, reference={"kind": "ext4"}, runs=runs,
                         differences=differences(runs, "ext4"), same=same)


def test_target_names() -> None:
    assert parse_targets("reference,quotafs-sigbus", "ext4") == ["ext4", "quotafs-sigbus"]
    assert parse_targets(["quotafs", "tmpfs"], "tmpfs") == ["quotafs", "tmpfs"]
    with pytest.raises(QuotafsError, match="the reference is tmpfs: --reference chooses"):
        parse_targets("ext4", "tmpfs")
    with pytest.raises(QuotafsError, match="given twice"):
        parse_targets("reference,ext4", "ext4")


def test_differences_name_cmd_and_check_separately() -> None:
    runs = [run("ext4", exit_code=None, signal="SIGBUS", ended="killed by SIGBUS"),
            run("quotafs", check_exit_code=1, check_ended="exit 1"),
            run("quotafs-sigbus", exit_code=None, signal="SIGBUS", ended="killed by SIGBUS",
                used_bytes=8192)]
    assert differences(runs, "ext4") == [
        "quotafs: CMD exit 0, ext4: killed by SIGBUS",
        "quotafs: CHECK exit 1, ext4: exit 0"]  # used bytes are not an outcome
    assert differences(runs[1:], "ext4") == []  # no reference, nothing to differ from
    hung = run("quotafs", exit_code=None, timed_out=True, ended="hung (killed after 5s)")
    assert differences([run("ext4"), hung], "ext4") == [
        "quotafs: CMD hung (killed after 5s), ext4: exit 0"]


def test_outcome_key_is_what_expect_same_compares() -> None:
    assert run("ext4").outcome_key() == run("quotafs-sigbus", used_bytes=1).outcome_key()
    assert run("ext4").outcome_key() != run("quotafs-sigbus", check_exit_code=2).outcome_key()


def test_table_marks_what_differs_and_escapes_output() -> None:
    runs = [run("ext4", exit_code=None, signal="SIGBUS", ended="killed by SIGBUS"),
            run("quotafs")]
    header, rule, ext4, quotafs = cmdreport.table(report(runs)).splitlines()
    assert set(rule) == {"-"} and header.split()[:3] == ["target", "CMD", "CHECK"]
    assert quotafs.split()[:4] == ["quotafs", "*exit", "0", "exit"]  # CMD marked, CHECK not
    assert "*" not in ext4
    text = cmdreport.render(report(runs))
    assert "DIFFERS  quotafs: CMD exit 0, ext4: killed by SIGBUS" in text.splitlines()
    assert "\x1b" not in text and "last \\033[31mred" in text


def test_the_command_line_is_shown_quoted_and_escaped() -> None:
    runs = [run("ext4")]
    argv = ("sh", "-c", "dd if=/dev/zero of=f | tail -1; echo \x1b[2Jdone")
    shown = cmdreport.render(dataclasses.replace(report(runs), argv=argv)).splitlines()[0]
    # as a shell would take it again: the -c script one word, no escape sequence
    assert shown == "quotafs compare -- sh -c 'dd if=/dev/zero of=f | tail -1; echo \\033[2Jdone'"


def test_to_json_keeps_the_issue_keys() -> None:
    data = report([run("ext4"), run("quotafs-sigbus")], same=True).to_json()
    assert set(data) >= {"reference", "runs"}
    assert data["reference"]["quotafs_limit"] == 1000000
    for entry in data["runs"]:
        assert set(entry) >= {"target", "exit_code", "signal", "timed_out",
                              "check_exit_code", "used_bytes", "files", "wall_s", "events"}
