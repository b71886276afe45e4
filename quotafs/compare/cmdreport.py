"""The printed report of `quotafs compare -- CMD`: the runs side by side, the cells that
differ from the reference marked, then what differs, stderr tails and quotafs's events."""

from __future__ import annotations

import shlex

from quotafs.compare.command import CommandReport, TargetRun
from quotafs.errors import printable
from quotafs.units import format_size

MARK = "*"  # before a cell that differs from the reference's
TAIL_LINES = 3  # of each run's stderr
EVENT_LINES = 5  # of each quotafs run's events


def _cells(run: TargetRun) -> list[str]:
    return [run.target, run.ended, run.check_ended or "-", f"{run.wall_s:.2f}s",
            format_size(run.used_bytes), str(run.files), format_size(run.dir_bytes),
            str(len(run.events)), _last_line(run.stdout_tail)]


def _last_line(text: str, width: int = 30) -> str:
    lines = text.splitlines()
    last = printable(lines[-1]) if lines else "-"
    return last if len(last) <= width else last[:width - 3] + "..."


def table(report: CommandReport) -> str:
    header = ["target", "CMD", "CHECK", "time", "used", "files", "bytes in dir", "events",
              "stdout (last line)"]
    kind = report.reference["kind"]
    ref = next((r for r in report.runs if r.target == kind), None)
    rows = [header]
    for run in report.runs:
        cells = _cells(run)
        if ref is not None and run is not ref:
            if run.cmd_key() != ref.cmd_key():
                cells[1] = MARK + cells[1]
            if run.check_key() != ref.check_key():
                cells[2] = MARK + cells[2]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def details(report: CommandReport) -> list[str]:
    """stderr tails and events, per run, where there are any."""
    out: list[str] = []
    for run in report.runs:
        tail = run.stderr_tail.splitlines()[-TAIL_LINES:]
        if tail:
            out.append(f"{run.target} stderr (last lines):")
            out += [f"    {printable(line)}" for line in tail]
        if run.check_stderr_tail:
            out.append(f"{run.target} check stderr (last lines):")
            out += [f"    {printable(line)}"
                    for line in run.check_stderr_tail.splitlines()[-TAIL_LINES:]]
        if run.events:
            out.append(f"{run.target} events ({len(run.events)}; time from CMD's start):")
            for e in run.events[:EVENT_LINES]:
                out.append(f"    {e['time']:+.3f}s  {e['op']} {printable(e['path'])}: "
                           f"{e['effect']}")
            if len(run.events) > EVENT_LINES:
                out.append(f"    ... {len(run.events) - EVENT_LINES} more (--json has all)")
    return out


def render(report: CommandReport) -> str:
    ref = report.reference
    user = report.user or "the caller"
    head = [f"quotafs compare -- {printable(shlex.join(report.argv))}",
            f"reference: {ref['kind']}, {format_size(report.limit_requested)} free requested; "
            f"quotafs limit {report.quotafs_limit:,} B, reserve {report.quotafs_reserve:,} B; "
            f"run as {user}; Linux {report.kernel}"]
    for difference in ref.get("known_differences") or []:
        head.append(f"  {ref['kind']} vs ext4: {difference}")
    body = ["", table(report), ""]
    if report.differences:
        body += [f"DIFFERS  {line}" for line in report.differences]
    elif len(report.runs) > 1:
        body.append("same     CMD and CHECK ended alike on every target")
    if report.same is not None:
        body.append(f"{ref['kind']} vs quotafs-sigbus (the ext4-faithful target): "
                    + ("same outcome" if report.same else "DIFFERENT outcome"))
    extra = details(report)
    return "\n".join(head + body + (["", *extra] if extra else []))
