"""Medians, spreads and ratios; the terminal table, markdown, JSON and CSV."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.workloads import Sample, Workload

QUOTA_COST_GOAL = 0.95  # quota / idle rules within 5% of --limit none
MOUNT_GOAL_S = 3.0
RSS_GOAL_BYTES = 150 * 10**6
APPEND_GROWTH_GOAL = 1.2  # per-append time with many files / with few: "must not grow"


@dataclass
class Result:
    target: str
    workload: str
    unit: str
    status: str  # "ok" or "skipped"
    values: list[float] = field(default_factory=list)
    median: float | None = None
    min: float | None = None
    max: float | None = None
    spread_pct: float | None = None  # (max - min) / median
    ratio_to_native: float | None = None  # median of per-round ratios
    ratio_min: float | None = None
    ratio_max: float | None = None
    goal: float | None = None
    meets: bool | None = None
    daemon_cpu_us_per_op: float | None = None
    daemon_busy: float | None = None  # daemon CPU / measured time (1.0: one core busy)
    foreign_load_max: float | None = None  # most cores other processes used during a sample
    note: str = ""


@dataclass
class Comparison:
    target: str
    baseline: str
    workload: str
    ratio: float
    ratio_min: float
    ratio_max: float
    goal: float | None  # None: a cost measured, with no goal
    meets: bool | None


def _spread(values: Sequence[float]) -> float:
    med = statistics.median(values)
    return (max(values) - min(values)) / med * 100 if med else 0.0


def summarise(samples: dict[tuple[str, str], list[Sample | None]],
              targets: Sequence[str], skipped: dict[str, str],
              workloads: Sequence[Workload],
              not_run: dict[tuple[str, str], str] | None = None) -> list[Result]:
    """One Result per target x workload; ratios are per round (same round as native).
    `skipped`: targets that did not run, and why; `not_run`: (target, workload) pairs."""
    results: list[Result] = []
    for w in workloads:
        native = samples.get(("native", w.name), [])
        for t in [*targets, *skipped]:
            note = skipped.get(t) or (not_run or {}).get((t, w.name))
            if note is not None:
                results.append(Result(t, w.name, w.unit, "skipped", goal=w.goal, note=note))
                continue
            rounds = samples.get((t, w.name), [])
            values = [s.value for s in rounds if s is not None]
            r = Result(t, w.name, w.unit, "ok", values=values,
                       goal=None if t == "native" else w.goal)
            if not values:
                r.status, r.note = "skipped", "no successful round"
                results.append(r)
                continue
            r.median, r.min, r.max = statistics.median(values), min(values), max(values)
            r.spread_pct = _spread(values)
            ratios = [s.value / n.value for s, n in zip(rounds, native, strict=False)
                      if s is not None and n is not None and n.value > 0]
            if ratios:
                r.ratio_to_native = statistics.median(ratios)
                r.ratio_min, r.ratio_max = min(ratios), max(ratios)
            if r.goal is not None and r.ratio_to_native is not None:
                r.meets = r.ratio_to_native >= r.goal
            cpu = [s.daemon_cpu / s.ops * 1e6 for s in rounds
                   if s is not None and s.daemon_cpu is not None and s.ops]
            busy = [s.daemon_cpu / s.seconds for s in rounds
                    if s is not None and s.daemon_cpu is not None and s.seconds > 0]
            r.foreign_load_max = max(s.foreign_load for s in rounds if s is not None)
            if cpu:
                r.daemon_cpu_us_per_op = statistics.median(cpu)
                r.daemon_busy = statistics.median(busy)
            results.append(r)
    return results


def compare(samples: dict[tuple[str, str], list[Sample | None]], target: str, baseline: str,
            workloads: Sequence[Workload],
            goal: float | None = QUOTA_COST_GOAL) -> list[Comparison]:
    out: list[Comparison] = []
    for w in workloads:
        pairs = zip(samples.get((target, w.name), []), samples.get((baseline, w.name), []),
                    strict=False)
        ratios = [a.value / b.value for a, b in pairs
                  if a is not None and b is not None and b.value > 0]
        if ratios:
            med = statistics.median(ratios)
            out.append(Comparison(target, baseline, w.name, med, min(ratios), max(ratios),
                                  goal, None if goal is None else med >= goal))
    return out


# -- formatting ---------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    if digits == 0 and abs(value) < 10:
        digits = 1 if abs(value) >= 1 else 2
    return f"{value:,.{digits}f}"


def _verdict(meets: bool | None) -> str:
    return "—" if meets is None else ("meets" if meets else "MISSES")


def result_rows(results: Sequence[Result], workloads: Sequence[Workload]) -> list[list[str]]:
    titles = {w.name: w for w in workloads}
    rows: list[list[str]] = []
    last = ""
    for r in results:
        w = titles[r.workload]
        name = w.title if r.workload != last else ""
        last = r.workload
        if r.status != "ok":
            rows.append([name, r.target, r.note, "", "", "", "", "", "", ""])
            continue
        ratio = _num(r.ratio_to_native, 2)
        rng = (f"[{r.ratio_min:.2f}-{r.ratio_max:.2f}]"
               if r.ratio_min is not None and r.ratio_max is not None
               and r.target != "native" else "")
        cpu = (f"{_num(r.daemon_cpu_us_per_op)} µs/{w.op}"
               if r.daemon_cpu_us_per_op is not None else "")
        busy = f"{r.daemon_busy * 100:.0f}%" if r.daemon_busy is not None else ""
        goal = f"≥ {r.goal:.2f}" if r.goal is not None else ""
        rows.append([name, r.target, f"{_num(r.median)} {r.unit}",
                     f"±{(r.spread_pct or 0) / 2:.1f}%", f"{ratio} {rng}".strip(),
                     goal, _verdict(r.meets) if r.goal is not None else "", cpu, busy,
                     f"{r.foreign_load_max or 0:.2f}"])
    return rows


RESULT_HEADER = ["workload", "target", "median", "spread", "x native [range]", "goal",
                 "verdict", "daemon CPU/op", "daemon busy", "others' CPU"]


def comparison_rows(comparisons: Sequence[Comparison],
                    workloads: Sequence[Workload]) -> list[list[str]]:
    titles = {w.name: w.title for w in workloads}
    return [[titles[c.workload], f"{c.target} / {c.baseline}",
             f"{c.ratio:.3f} [{c.ratio_min:.2f}-{c.ratio_max:.2f}]",
             "—" if c.goal is None else f"≥ {c.goal:.2f}",
             _verdict(c.meets)] for c in comparisons]


COMPARISON_HEADER = ["workload", "ratio", "median [range]", "goal", "verdict"]


def scale_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        out.append([r["target"], f"{r['files']:,}", _num(r["mount_cold_s"], 2),
                    _num(r["mount_warm_s"], 2), _num(r["rss_after_mount_mib"], 1),
                    f"{r['lookups_ok']:,}", _num(r["lookup_s"], 2),
                    _num(r["rss_after_lookups_mib"], 1),
                    _num(r["hwm_after_lookups_mib"], 1),
                    str(r["fds_after_lookups"]) if r["fds_after_lookups"] is not None else "—",
                    _num(r["append_us"], 1), _num(r["append_us_looked_up"], 1),
                    _num(r["append_cpu_us"], 1)])
    return out


SCALE_HEADER = ["target", "files", "mount s (cold)", "mount s (warm)", "RSS MiB mounted",
                "lookups ok", "stat all s", "RSS MiB after", "peak RSS MiB", "daemon fds",
                "µs/append", "µs/append looked-up", "daemon CPU µs/append"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(header))]
    right = {2, 3, 4} if header is RESULT_HEADER else set()

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str, document: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=2, sort_keys=False)
        f.write("\n")


CSV_FIELDS = ["target", "workload", "unit", "status", "median", "min", "max", "spread_pct",
              "ratio_to_native", "ratio_min", "ratio_max", "goal", "meets",
              "daemon_cpu_us_per_op", "daemon_busy", "foreign_load_max", "values", "note"]


def write_csv(path: str, results: Sequence[Result]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {k: getattr(r, k) for k in CSV_FIELDS if k != "values"}
            row["values"] = ";".join(f"{v:.6g}" for v in r.values)
            writer.writerow(row)
