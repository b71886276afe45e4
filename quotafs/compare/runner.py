"""The comparison: the same writers against a real kernel filesystem and against quotafs
(`quotafs compare`, whose command line is quotafs/cli/compare.py), and its report.

Targets: the reference — ext4 (a loop-ext4, root) or tmpfs (a tmpfs in a private
namespace, no root needed) — then quotafs (plain FUSE mmap semantics) and quotafs-sigbus
(--mmap-sigbus, the ext4-faithful mode). Every writer runs as its own child process on a
fresh file; what reached the disk is read back after an unmount (ext4 is remounted,
quotafs's backing file is read once its daemon is gone). tmpfs has no device: what is in
its page cache is its data, read back through the holder's /proc/PID/root.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from quotafs.client.api import mounted_with
from quotafs.client.lifecycle import check_fuse
from quotafs.compare.writers import WriterResult, bytes_on_disk, run_writer
from quotafs.errors import ExitCode, QuotafsError
from quotafs.options import MountOptions
from quotafs.reference.loopext4 import open_ext4_loop
from quotafs.reference.tmpfs import TmpfsReference, open_tmpfs
from quotafs.reference.tools import find_tool, last_line, run_tool
from quotafs.units import format_size
from quotafs.users import passwd_entry

TARGETS = ("ext4", "quotafs", "quotafs-sigbus")
MMAP_TOLERANCE = 0.01  # the ext4-faithful SIGBUS must land within 1% of ext4's
BLOCK = 4096


@dataclass
class Record:
    target: str
    writer: str
    outcome: str  # "completed" | "errno" | "signal"
    errno: str | None
    signal: str | None
    failed_call: str | None
    bytes_acknowledged: int
    bytes_on_disk: int
    bytes_lost: int  # acknowledged but not on disk after unmount
    allocated_bytes: int | None
    wall_time: float
    exit_status: int
    summary: str


@dataclass
class Verdict:
    writer: str
    target: str
    matched: bool
    difference_bytes: int
    tolerance_bytes: int
    explanation: str


def describe(result: WriterResult, on_disk: int) -> str:
    """How a writer ended, in one line a person can read."""
    lost = result.bytes_acknowledged - on_disk
    if result.outcome == "signal":
        how = f"killed by {result.signal_name}"
    elif result.outcome == "errno":
        how = f"{result.errno_name} at {result.failed_call}"
    else:
        how = "completed"
    extra = f", {format_size(lost)} acknowledged but lost" if lost > 0 else ""
    if result.allocated_bytes is not None and result.writer == "fallocate":
        extra += f", {format_size(result.allocated_bytes)} allocated"
    if result.writer == "mmap" and result.outcome != "signal":
        extra += ", no signal"
    return how + extra


# -- the targets --------------------------------------------------------------------------

def _remount(device: str, mountpoint: str) -> None:
    """Unmount and mount again, so that what we read back is what reached the disk."""
    for cmd in ([find_tool("umount"), mountpoint], [find_tool("mount"), device, mountpoint]):
        result = run_tool(cmd)
        if result.returncode != 0:
            raise QuotafsError(f"{' '.join(cmd)} failed: {last_line(result)}", ExitCode.LOOP)


@dataclass
class Plan:
    limit: int
    writers: list[str]
    file_size: int
    chunk: int
    keep: bool
    workdir: str | None = None
    as_user: str | None = None  # the writers run as this user (None: as root)
    reference: str = "ext4"  # "ext4" (root) or "tmpfs" (reference/tmpfs.py)


class Runner:
    """Runs every writer on every target and keeps the records."""

    def __init__(self, plan: Plan, progress: Callable[[str], None]) -> None:
        self.plan = plan
        self.progress = progress
        self.records: list[Record] = []

    def _run(self, target: str, writer: str, path: str,
             settle: Callable[[], str], prefix: tuple[str, ...] = (),
             cwd: str | None = None) -> Record:
        """Run one writer on `path`; `settle()` unmounts/remounts and returns where the
        file can be read back. `prefix` and `cwd`: how to start it inside a reference's
        namespace (the tmpfs reference)."""
        def tick(acked: int) -> None:
            self.progress(f"{target:<15} {writer:<9} {format_size(acked):>10}")

        self.progress(f"{target:<15} {writer:<9} starting")
        result = run_writer(writer, path, self.plan.file_size, self.plan.chunk, progress=tick,
                            user=self.plan.as_user, prefix=prefix, cwd=cwd)
        readable = settle()
        on_disk = bytes_on_disk(readable, self.plan.chunk, result.bytes_acknowledged) \
            if os.path.exists(readable) else 0
        if not self.plan.keep and os.path.exists(readable):
            os.unlink(readable)
        record = Record(
            target=target, writer=writer, outcome=result.outcome, errno=result.errno_name,
            signal=result.signal_name, failed_call=result.failed_call,
            bytes_acknowledged=result.bytes_acknowledged, bytes_on_disk=on_disk,
            bytes_lost=max(0, result.bytes_acknowledged - on_disk),
            allocated_bytes=result.allocated_bytes, wall_time=round(result.wall_time, 3),
            exit_status=result.exit_status, summary=describe(result, on_disk))
        self.progress(f"{target:<15} {writer:<9} {record.summary}", )
        self.records.append(record)
        return record

    def _give_to_writer(self, path: str) -> None:
        """The writers' directory belongs to the user who runs them (chown persists on
        ext4 across the remounts, and in quotafs's backing directory)."""
        if self.plan.as_user is not None:
            entry = passwd_entry(self.plan.as_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def run_ext4(self, device: str, mountpoint: str) -> None:
        self._give_to_writer(mountpoint)
        for writer in self.plan.writers:
            path = os.path.join(mountpoint, f"{writer}.dat")

            def settle(path: str = path) -> str:
                _remount(device, mountpoint)
                return path

            self._run("ext4", writer, path, settle)

    def run_tmpfs(self, ref: TmpfsReference) -> None:
        """The writers inside the tmpfs's namespace, through its launch prefix: as the
        caller (a user without root keeps its uid), or, for root's --as-user, entered as
        root and dropped to the user by the writer itself (as on ext4: the interpreter may
        sit where that user cannot execute it). No remount: the file is read back as it is."""
        self._give_to_writer(ref.outside_path)
        prefix = ref.launch(None).prefix
        for writer in self.plan.writers:
            name = f"{writer}.dat"

            def settle(name: str = name) -> str:
                return ref.outside(name)  # nothing to unmount: the page cache is the data

            self._run("tmpfs", writer, os.path.join(ref.inside_path, name), settle, prefix,
                      ref.outside_path)

    def run_quotafs(self, target: str, limit: int, backing: str, reserve: int = 0) -> None:
        mountpoint = backing + "-mnt"
        os.makedirs(backing, exist_ok=True)
        os.makedirs(mountpoint, exist_ok=True)
        self._give_to_writer(backing)
        options = MountOptions(limit=limit, backing=backing, reserve=reserve,
                               allow_other=self.plan.as_user is not None,
                               mmap_sigbus=target == "quotafs-sigbus")
        for writer in self.plan.writers:
            with contextlib.ExitStack() as stack:
                m = stack.enter_context(mounted_with(options, mountpoint))
                path = os.path.join(m.path, f"{writer}.dat")

                def settle(stack: contextlib.ExitStack = stack, writer: str = writer) -> str:
                    stack.close()  # unmount: the daemon is gone before we read back
                    return os.path.join(backing, f"{writer}.dat")

                self._run(target, writer, path, settle)


# -- verdicts -----------------------------------------------------------------------------

def write_verdict(ext4: Record, mine: Record, chunk: int) -> Verdict:
    """write(2) must hit ENOSPC within one block of ext4. ext4 (Linux 6.x, large folios)
    reserves space per folio and refuses a whole write(2) call whose folio does not fit;
    quotafs refuses whole write requests (of up to 1 MiB), so a larger call may keep the
    requests that fitted: when ext4 refused a whole call, that part is the difference, not a
    miss, and is allowed on top of the block."""
    diff = mine.bytes_acknowledged - ext4.bytes_acknowledged
    refused_whole_call = ext4.errno == "ENOSPC" and ext4.bytes_acknowledged % chunk == 0
    tolerance = BLOCK + (chunk if refused_whole_call else 0)
    same_end = (mine.errno, mine.failed_call) == (ext4.errno, ext4.failed_call)
    matched = same_end and -BLOCK <= diff <= tolerance
    why = f"write(2) must hit ENOSPC within one block of {ext4.target}"
    if refused_whole_call and diff > BLOCK:
        why += (f"; ext4 refused its whole last {format_size(chunk)} write(2) call (per-folio "
                f"reservation), quotafs wrote the {diff:,} bytes of it that fit "
                "(docs/semantics.md)")
    return Verdict("write", mine.target, matched, diff, tolerance, why)


def verdicts(records: list[Record], chunk: int, reference: str = "ext4") -> list[Verdict]:
    """quotafs's records against the reference's (target `reference`: "ext4" or "tmpfs",
    both kernel filesystems that SIGBUS an mmap writer and ENOSPC a write(2))."""
    by = {(r.target, r.writer): r for r in records}
    out: list[Verdict] = []
    ext4_mmap, faithful = by.get((reference, "mmap")), by.get(("quotafs-sigbus", "mmap"))
    if ext4_mmap is not None and faithful is not None:
        diff = faithful.bytes_acknowledged - ext4_mmap.bytes_acknowledged
        tolerance = int(ext4_mmap.bytes_acknowledged * MMAP_TOLERANCE)
        both_sigbus = ext4_mmap.signal == faithful.signal == "SIGBUS"
        out.append(Verdict(
            "mmap", "quotafs-sigbus", both_sigbus and abs(diff) <= tolerance, diff, tolerance,
            f"ext4-faithful mode must die by SIGBUS within 1% of where {reference} does"
            + ("" if both_sigbus else f" ({reference}: {ext4_mmap.summary}; quotafs-sigbus: "
               f"{faithful.summary})")))
    plain = by.get(("quotafs", "mmap"))
    if ext4_mmap is not None and plain is not None:
        out.append(Verdict(
            "mmap", "quotafs", True, plain.bytes_acknowledged - ext4_mmap.bytes_acknowledged,
            0, "informational: plain FUSE never signals an mmap writer; dirty pages are "
               f"refused at writeback ({plain.summary})"))
    ext4_write = by.get((reference, "write"))
    for target in ("quotafs", "quotafs-sigbus"):
        mine = by.get((target, "write"))
        if ext4_write is None or mine is None:
            continue
        out.append(write_verdict(ext4_write, mine, chunk))
    ext4_falloc = by.get((reference, "fallocate"))
    for target in ("quotafs", "quotafs-sigbus"):
        mine = by.get((target, "fallocate"))
        if ext4_falloc is None or mine is None:
            continue
        out.append(Verdict(
            "fallocate", target, True, mine.bytes_acknowledged - ext4_falloc.bytes_acknowledged,
            0, "informational: FUSE (pyfuse3) has no fallocate handler, the kernel answers "
               "EOPNOTSUPP and glibc's posix_fallocate falls back to writing one byte per "
               f"block through write(2) ({reference}: {ext4_falloc.summary}; {target}: "
               f"{mine.summary})"))
    return out


# -- the report ---------------------------------------------------------------------------

def table(records: list[Record]) -> str:
    header = ("target", "writer", "acknowledged", "on disk", "lost", "time", "how it ended")
    rows = [header] + [
        (r.target, r.writer, f"{r.bytes_acknowledged:,}", f"{r.bytes_on_disk:,}",
         f"{r.bytes_lost:,}", f"{r.wall_time:.1f}s", r.summary) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in range(2, len(header) - 1)]
        lines.append("  ".join([*cells, row[-1]]))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def verdict_lines(found: list[Verdict]) -> list[str]:
    lines = []
    for v in found:
        mark = "note" if v.tolerance_bytes == 0 else "MATCH" if v.matched else "DIFFERS"
        lines.append(f"{mark:>7}  {v.writer}/{v.target}: difference {v.difference_bytes:+,} "
                     f"bytes (tolerance {v.tolerance_bytes:,}) — {v.explanation}")
    return lines


def _check_allowed(plan: Plan) -> None:
    if plan.reference not in ("ext4", "tmpfs"):
        raise QuotafsError(f"unknown reference {plan.reference!r}: choose ext4 or tmpfs",
                           ExitCode.USAGE)
    if os.geteuid() == 0:
        return
    if plan.reference == "ext4":
        raise QuotafsError("compare with the ext4 reference needs root: it attaches a loop "
                           "device and mounts ext4 (--reference tmpfs needs no root)",
                           ExitCode.PERMISSION)
    if plan.as_user is not None:
        raise QuotafsError("--as-user needs root: without root the writers run as you",
                           ExitCode.PERMISSION)


@contextlib.contextmanager
def _reference(plan: Plan, runner: Runner,
               progress: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Build the plan's reference, run the writers on it, and yield what the report says
    of it (quotafs_limit, quotafs_reserve, the reference's own section, kept); it is torn
    down when the block ends, after the quotafs targets ran beside it."""
    if plan.reference == "tmpfs":
        with open_tmpfs(plan.limit, workdir=plan.workdir, keep=plan.keep) as ref:
            progress(f"tmpfs in a private namespace (holder pid {ref.holder.pid}): "
                     f"{format_size(ref.size)} for every writer; quotafs limit "
                     f"{ref.quotafs_limit:,} bytes, reserve 0")
            runner.run_tmpfs(ref)
            yield {"quotafs_limit": ref.quotafs_limit, "quotafs_reserve": 0,
                   "reference": ref.describe(),
                   "kept": ref.cleanup_commands() if plan.keep else []}
        return
    with open_ext4_loop(plan.limit, workdir=plan.workdir, keep=plan.keep) as ext4:
        # ext4 keeps back min(2% of blocks, 4096 clusters) from every writer: the room a
        # writer really has is the free space minus that, and that is quotafs's limit;
        # its reserved blocks are root's, and are quotafs's reserve, so that writers of
        # any user have the room they have on ext4.
        quota, reserve = ext4.write_capacity_hint, ext4.root_reserve_bytes
        progress(f"ext4 on {ext4.device}: {format_size(ext4.free_bytes)} free, "
                 f"{format_size(quota)} writable by root, {format_size(quota - reserve)} "
                 f"by others; quotafs limit {quota:,} bytes, reserve {reserve:,}")
        runner.run_ext4(ext4.device, ext4.mountpoint)
        ext4_info = {k: v for k, v in asdict(ext4).items() if k != "rounds"}
        yield {"quotafs_limit": quota, "quotafs_reserve": reserve, "ext4": ext4_info,
               "reference": {"kind": "ext4", **ext4_info, "known_differences": []},
               "kept": ext4.cleanup_commands() if plan.keep else []}


def run_compare(plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every writer on every target; the report (as `quotafs compare --json` prints it)."""
    _check_allowed(plan)
    check_fuse()
    runner = Runner(plan, progress)
    scratch = tempfile.mkdtemp(prefix="quotafs-compare-", dir=plan.workdir or "/var/tmp")
    if plan.as_user is not None:
        os.chmod(scratch, 0o755)  # the writers' user must reach the mount points below it
    try:
        with _reference(plan, runner, progress) as ref:
            for target in TARGETS[1:]:
                runner.run_quotafs(target, ref["quotafs_limit"],
                                   os.path.join(scratch, target), ref["quotafs_reserve"])
    finally:
        if plan.keep:
            kept_scratch = scratch
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            kept_scratch = ""
    found = verdicts(runner.records, plan.chunk, plan.reference)
    checked = [v for v in found if v.tolerance_bytes]
    kept = ref.pop("kept")
    return {
        "limit_requested": plan.limit,
        **ref,
        "writers_user": plan.as_user or ("root" if os.geteuid() == 0 else _me()),
        "file_size": plan.file_size,
        "chunk": plan.chunk,
        "kernel": platform.release(),
        "records": [asdict(r) for r in runner.records],
        "verdicts": [asdict(v) for v in found],
        "matched": all(v.matched for v in checked),
        "kept": kept + ([f"rm -rf {kept_scratch}"] if kept_scratch else []),
    }


def _me() -> str:
    try:
        return passwd_entry(str(os.geteuid())).pw_name
    except QuotafsError:
        return str(os.geteuid())
