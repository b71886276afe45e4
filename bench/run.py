"""quotafs benchmark: one command that mounts every target itself and runs the workloads.

    sudo python bench/run.py                    # the full run (~10-15 min on 2 cores)
    sudo python bench/run.py --smoke --json out.json

Targets, all over the same ext4 (a sparse image on a tmpfs of our own, loop device):
native (ext4 itself), pyfuse3's own passthroughfs.py example (downloaded into bench/.cache
with pip from pyfuse3's source distribution; run with the fsync handler it lacks), two
ceilings (bench/nullfs.py: pyfuse3 doing no I/O, without and with xattr support),
quotafs --limit none, quotafs with a quota, quotafs with a quota and one fault rule that
never matches, and quotafs with a quota and --no-cache. The workloads are fio-like
(bench/workloads.py) and programs users run: SQLite inserts, tar, git clone
(bench/apps.py). They run
interleaved — every round runs each workload on every target, in a rotating order — and
the report gives medians, spreads and ratios to native from the same rounds. A scale part
measures mount time and daemon memory with 100,000 files and the per-append cost of the
accounting as the number of files grows. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report, scale
from bench.apps import APP_WORKLOADS
from bench.system import (
    FOREIGN,
    BenchError,
    log,
    machine_info,
    memory_kib,
    open_fds,
    pin_to_cpu,
)
from bench.targets import (
    IDLE_RULE,
    Ext4,
    NativeTarget,
    QuotafsTarget,
    SettingsVariant,
    Target,
    TargetUnavailable,
    check_passthrough_argv,
    crash_sim_support,
    fault_support,
    fetch_passthrough_example,
    null_target,
    open_ext4,
    passthrough_target,
)
from bench.workloads import (
    FULL,
    SMOKE,
    WARMUP,
    Context,
    Sample,
    Sizes,
    Workload,
)
from bench.workloads import WORKLOADS as BLOCK_WORKLOADS
from quotafs.interrupts import signals_deferred, sigterm_as_interrupt

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024
QUIET_CORES = 0.15  # other processes using more than this during a sample disturb it

TARGETS = {
    "native": "the loop-ext4 itself (the reference)",
    "pyfuse3-passthrough": "pyfuse3's examples/passthroughfs.py plus an fsync handler "
                           "(entry/attr timeout 0)",
    "pyfuse3-passthrough-xattr": "the same with a getxattr handler that passes through "
                                 "(getxattr(2) of the backing path): the least a storing "
                                 "filesystem with extended attributes does, as quotafs",
    "pyfuse3-null": "bench/nullfs.py: pyfuse3 and trio doing no I/O at all, the ceiling "
                    "of any pyfuse3 daemon (getxattr: ENOSYS, so the kernel stops asking)",
    "pyfuse3-null-xattr": "bench/nullfs.py --xattr: the same, answering getxattr like a "
                          "filesystem with extended attributes (ENODATA), as quotafs must",
    "pyfuse3-mem-xattr": "bench/nullfs.py --xattr --keep-data: the same, keeping the data "
                         "in memory, the ceiling of the application workloads",
    "quotafs": "quotafs mount --limit SIZE --backing DIR (default options)",
    "quotafs-baseline": "quotafs mount --limit SIZE (default options) run from the source "
                        "tree given with --baseline DIR, an earlier commit's checkout: "
                        "what a change costs, side by side",
    "quotafs-noxattr": "quotafs with the quota and --xattrs off (getxattr: ENOSYS, so the "
                       "kernel stops asking before every write)",
    "quotafs-nolimit": "the quotafs daemon with its limit set to none (quotafs set) for "
                       "each of these samples",
    "quotafs-rule": "the quotafs daemon with one fault rule that never matches added for "
                    "each of these samples",
    "quotafs-nocache": "quotafs with the quota and --no-cache (no kernel caching: what the "
                       "cache levers are worth)",
    "quotafs-crashsim": "quotafs with the quota and --crash-sim (recording what is durable: "
                        "what crash simulation costs)",
}


WORKLOADS: dict[str, Workload] = {**BLOCK_WORKLOADS, **{w.name: w for w in APP_WORKLOADS}}

VARIANTS = ("quotafs-nolimit", "quotafs-rule")  # settings of the quotafs target's daemon
# The write goals of docs/performance.md, as ratios taken round by round (the targets of
# one round run back to back, so a machine's drift between rounds cancels): (target,
# against, workloads, goal; None: a cost shown, with no goal).
WRITE_GOALS: tuple[tuple[str, str, tuple[str, ...], float | None], ...] = (
    ("quotafs-noxattr", "pyfuse3-passthrough", ("randwrite", "seqwrite", "mmap"), 1.0),
    ("quotafs", "pyfuse3-passthrough", ("seqwrite", "mmap"), 1.0),
    ("quotafs", "pyfuse3-null-xattr", ("randwrite",), 0.9),
    ("quotafs", "pyfuse3-passthrough-xattr", ("randwrite", "seqwrite", "mmap"), 1.0),
    # What storing the data costs a filesystem with xattrs, against the ceiling.
    ("pyfuse3-passthrough-xattr", "pyfuse3-null-xattr", ("randwrite",), None),
)
QUOTAFS_EXTRA = {"quotafs-nocache": ["--no-cache"], "quotafs-noxattr": ["--xattrs", "off"],
                 "quotafs-crashsim": ["--crash-sim"]}
NO_DATA = "skipped: reads return zeros here, and this program reads back what it wrote"


def _size(text: str) -> int:
    units = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in units else ""
    try:
        return int(float(text[:len(text) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def _names(choices: dict[str, Any]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'} (known: {', '.join(choices)})")
        return names
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, 1 round, 200/2,000-file scale test (a check that it runs)")
    p.add_argument("--rounds", type=int, help="rounds of every workload on every target "
                   "(default 5; --smoke: 1)")
    p.add_argument("--size", type=_size, help="sequential write/read file size (default 256M)")
    p.add_argument("--rand-size", type=_size, help="random 4K write file size (default 64M)")
    p.add_argument("--mmap-size", type=_size, help="mmap writer file size (default 128M)")
    p.add_argument("--files", type=int, help="create+stat+unlink file count (default 2000)")
    p.add_argument("--sqlite-txns", type=int, metavar="N",
                   help="transactions of the SQLite workloads (default 300; --smoke: 20)")
    p.add_argument("--tar-files", type=int, metavar="N",
                   help="files in the tar workload's archive (default 3000; --smoke: 200)")
    p.add_argument("--git-files", type=int, metavar="N",
                   help="files in the git-clone workload's repository (default 500; "
                        "--smoke: 50)")
    p.add_argument("--tree", type=int, nargs=2, metavar=("DIRS", "FILES"),
                   help="tree walk: DIRS directories of FILES files (default 40 100)")
    p.add_argument("--workloads", type=_names(WORKLOADS), default=list(WORKLOADS),
                   help=f"comma-separated subset of: {', '.join(WORKLOADS)}")
    p.add_argument("--targets", type=_names(TARGETS), default=None,
                   help=f"comma-separated subset of: {', '.join(TARGETS)} (native is "
                        "always run: ratios need it)")
    p.add_argument("--engine", choices=["auto", "fio", "python"], default="auto",
                   help="fio for the block workloads where installed (auto), or the Python "
                        "fallback")
    p.add_argument("--skip-scale", action="store_true", help="no scale measurements")
    p.add_argument("--scale-files", type=int,
                   help="files for the scale test (default 100000; --smoke: 2000); it is "
                        "compared with 1%% of that (at least 200)")
    p.add_argument("--warm", action="store_true",
                   help="do not drop caches before the read and walk workloads")
    p.add_argument("--rule", default=" ".join(IDLE_RULE),
                   help="`quotafs fault add MOUNT` arguments of the quotafs-rule target "
                        "(default: %(default)s)")
    p.add_argument("--quiet-budget", type=float, metavar="S",
                   help="before each sample wait (up to 10 s) for other processes to use "
                        f"less than {QUIET_CORES} cores, S seconds of waiting in all "
                        "(default 300; --smoke: 0, no waiting)")
    p.add_argument("--retries", type=int,
                   help="measure a sample again when other processes used more than "
                        f"{QUIET_CORES} cores during it, while the quiet budget lasts "
                        "(default 1; --smoke: 0)")
    p.add_argument("--nice", type=int, metavar="N",
                   help="run the bench, fio and the daemons at this nice value (e.g. -5 on "
                        "a shared machine; default: unchanged)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run the quotafs-baseline target: quotafs from the source tree "
                        "DIR (e.g. `git worktree add /tmp/base COMMIT`), compared with the "
                        "quotafs target workload by workload")
    p.add_argument("--cpu", type=int, metavar="N",
                   help="run the bench, its writers, fio and every daemon on CPU N only: on "
                        "a VM a wake-up that crosses CPUs costs the daemon tens of µs, and "
                        "whether it does changes from sample to sample (default: every CPU)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the workload results as CSV")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    p.add_argument("--cache-dir", default=str(HERE / ".cache"),
                   help="where the pyfuse3 source distribution is kept (default bench/.cache)")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    for flag in ("sqlite_txns", "tar_files", "git_files"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    explicit = args.targets is not None
    args.targets = args.targets or [t for t in TARGETS if t != "quotafs-baseline"]
    if args.baseline is None:
        if "quotafs-baseline" in args.targets and explicit:
            p.error("the quotafs-baseline target needs --baseline DIR")
        args.targets = [t for t in args.targets if t != "quotafs-baseline"]
    else:
        if not os.path.isfile(os.path.join(args.baseline, "quotafs", "__init__.py")):
            p.error(f"--baseline {args.baseline}: not a quotafs source tree (no "
                    "quotafs/__init__.py)")
        args.baseline = os.path.abspath(args.baseline)
        if "quotafs-baseline" not in args.targets:
            args.targets.append("quotafs-baseline")
    return args


def choose_sizes(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.smoke else FULL
    changes: dict[str, int] = {}
    for arg, key in (("size", "seq"), ("rand_size", "rand"), ("mmap_size", "mmap"),
                     ("files", "files"), ("sqlite_txns", "sqlite_txns"),
                     ("tar_files", "tar_files"), ("git_files", "git_files")):
        if getattr(args, arg) is not None:
            changes[key] = getattr(args, arg)
    if args.tree is not None:
        changes["tree_dirs"], changes["tree_files"] = args.tree
    return replace(sizes, **changes)


def image_size(sizes: Sizes, scale_files: int, n_targets: int) -> int:
    need = (384 * MiB + 3 * sizes.seq + sizes.rand + sizes.mmap
            + n_targets * sizes.tree_dirs * sizes.tree_files * 8192
            + n_targets * (sizes.tar_files + sizes.git_files) * 3 * 8192  # archive, trees
            + int(scale_files * 1.02) * 8192)
    step = 256 * MiB
    return -(-need // step) * step


# -- the run ------------------------------------------------------------------------------------

def runs(target: Target, workload: Workload) -> bool:
    """Can the workload run on the target? Not one that reads its data back on a target
    that keeps none."""
    return target.stores_data or not workload.reads_back


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = choose_sizes(args)
        self.rounds = args.rounds or (1 if args.smoke else 5)
        self.workloads = [WORKLOADS[n] for n in args.workloads]
        wanted = {"native", *args.targets}
        if wanted & set(VARIANTS):
            wanted.add("quotafs")  # the daemon whose settings the variants switch
        self.wanted = [t for t in TARGETS if t in wanted]
        self.engine = self._engine()
        self.cold = not args.warm and os.geteuid() == 0
        self.scale_files = 0 if args.skip_scale else (
            args.scale_files or (2000 if args.smoke else 100_000))
        self.retries = args.retries if args.retries is not None else (0 if args.smoke else 1)
        self.quiet_left = (args.quiet_budget if args.quiet_budget is not None
                           else (0.0 if args.smoke else 300.0))
        self.quiet_timeout = 0.0 if self.quiet_left <= 0 else 5.0  # per scale step
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.not_run: dict[tuple[str, str], str] = {}  # (target, workload) pairs left out
        self.samples: dict[tuple[str, str], list[Sample | None]] = {}
        self.errors: list[str] = []
        self.scale_rows: list[dict[str, Any]] = []
        self.memory: dict[str, dict[str, Any]] = {}

    def _engine(self) -> str:
        if self.args.engine == "python":
            return "python"
        if shutil.which("fio"):
            return "fio"
        if self.args.engine == "fio":
            raise BenchError("--engine fio: fio is not installed")
        return "python"

    # -- targets --

    def make_targets(self, ext4: Ext4) -> list[Target]:
        out: list[Target] = []
        limit = ext4.image_size  # a real quota, never reached by the workloads
        for name in self.wanted:
            try:
                if name == "native":
                    out.append(NativeTarget(ext4))
                elif name.startswith("pyfuse3-passthrough"):
                    script = fetch_passthrough_example(Path(self.args.cache_dir))
                    check_passthrough_argv(script)
                    out.append(passthrough_target(
                        script, ext4.subdir(f"backing-{name}"), ext4.mountpoint_for(name),
                        os.path.join(ext4.root, f"{name}.log"),
                        xattr=name.endswith("-xattr")))
                elif name.startswith(("pyfuse3-null", "pyfuse3-mem")):
                    out.append(null_target(name, TARGETS[name], ext4.mountpoint_for(name),
                                           os.path.join(ext4.root, f"{name}.log"),
                                           xattr=name.endswith("-xattr"),
                                           keep_data=name.startswith("pyfuse3-mem")))
                elif name in VARIANTS:
                    if name == "quotafs-rule" and (reason := fault_support()) is not None:
                        raise TargetUnavailable(reason)
                    base = next((t for t in out if t.name == "quotafs"), None)
                    if not isinstance(base, QuotafsTarget):
                        raise TargetUnavailable("skipped: there is no quotafs target")
                    out.append(SettingsVariant(
                        name, TARGETS[name], base, None if name == "quotafs-nolimit" else limit,
                        rule=shlex.split(self.args.rule) if name == "quotafs-rule" else None))
                else:
                    if name == "quotafs-crashsim" and (reason := crash_sim_support()):
                        raise TargetUnavailable(reason)
                    out.append(QuotafsTarget(name, TARGETS[name], ext4.subdir(f"backing-{name}"),
                                             ext4.mountpoint_for(name), limit,
                                             extra=QUOTAFS_EXTRA.get(name),
                                             tree=self.args.baseline
                                             if name == "quotafs-baseline" else None))
            except TargetUnavailable as exc:
                self.skipped[name] = str(exc)
                log(f"{name}: {exc}")
        return out

    def start_targets(self, stack: ExitStack, ext4: Ext4) -> None:
        for target in self.make_targets(ext4):
            stack.callback(target.stop)  # before start(): stop() undoes a partial start too
            try:
                with signals_deferred():
                    target.start()
            except TargetUnavailable as exc:
                self.skipped[target.name] = str(exc)
                log(f"{target.name}: {exc}")
                continue
            self.targets.append(target)
            if target.pid is not None:
                FOREIGN.own.add(target.pid)
            where = f"pid {target.pid}, " if target.pid else ""
            log(f"target {target.name} ready ({where}{target.path})")
        if not any(t.name == "native" for t in self.targets):
            raise BenchError("the native target did not start")

    # -- workloads --

    def run_one(self, target: Target, name: str, sizes: Sizes) -> Sample:
        workload = WORKLOADS[name]
        directory = os.path.join(target.path, f"run-{name}")
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        try:
            ctx = Context(directory, sizes, self.engine, target.pid, self.cold,
                          3 * sizes.seq if workload.memory_heavy else 0)
            target.before_sample()
            try:
                return workload.run(ctx)
            finally:
                target.after_sample()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def measure(self, target: Target, name: str) -> Sample:
        """One sample, taken when other people's processes are quiet; taken again when
        they were not quiet during it. The least disturbed attempt is kept. Waiting is
        limited by a budget for the whole run, so a busy machine slows the run down by at
        most that much (and the report shows how busy it was)."""
        best: Sample | None = None
        for attempt in range(1 + self.retries):
            if self.quiet_left > 0:
                began = time.monotonic()
                load = FOREIGN.wait_quiet(QUIET_CORES, 0.5, min(10.0, self.quiet_left))
                self.quiet_left -= time.monotonic() - began
                if load >= QUIET_CORES:
                    log(f"other processes keep {load:.2f} cores busy; measuring anyway "
                        f"({max(0.0, self.quiet_left):.0f}s of waiting left)")
            sample = self.run_one(target, name, self.sizes)
            if best is None or sample.foreign_load < best.foreign_load:
                best = sample
            if sample.foreign_load < QUIET_CORES or self.quiet_left <= 0:
                break
            if attempt < self.retries:
                log(f"{name} on {target.name} disturbed: other processes used "
                    f"{sample.foreign_load:.2f} cores meanwhile; again")
        assert best is not None
        return best

    def run_rounds(self) -> None:
        names = [t.name for t in self.targets]
        for w in self.workloads:
            if w.prepare is not None:
                for path in dict.fromkeys(t.path for t in self.targets  # variants share
                                          if runs(t, w)):
                    w.prepare(path, self.sizes)
        if self.rounds > 1:
            log("warm-up pass (not counted)")
            for w in self.workloads:
                for t in self.targets:
                    if not runs(t, w):
                        continue
                    # The tree, the archive and the repository are prepared at full size.
                    self.run_one(t, w.name, replace(
                        WARMUP, tree_dirs=self.sizes.tree_dirs, tree_files=self.sizes.tree_files,
                        tar_files=self.sizes.tar_files, git_files=self.sizes.git_files))
        for r in range(self.rounds):
            # Rotate the order every round, so no target always runs first (or after native).
            order = self.targets[r % len(names):] + self.targets[:r % len(names)]
            for w in self.workloads:
                for t in order:
                    key = (t.name, w.name)
                    if not runs(t, w):
                        self.not_run[key] = NO_DATA
                        continue
                    self.samples.setdefault(key, [None] * self.rounds)
                    try:
                        sample = self.measure(t, w.name)
                    except (OSError, BenchError) as exc:
                        message = f"round {r + 1} {w.name} on {t.name}: {exc}"
                        self.errors.append(message)
                        log(f"ERROR {message}")
                        continue
                    self.samples[key][r] = sample
                    cpu = (f", daemon CPU {sample.daemon_cpu:.2f}s"
                           if sample.daemon_cpu is not None else "")
                    log(f"round {r + 1}/{self.rounds} {w.name:9s} {t.name:20s} "
                        f"{sample.value:12,.1f} {w.unit} ({sample.seconds:.3f}s{cpu})")
        for t in self.targets:
            if t.pid is not None:
                self.memory[t.name] = {**memory_kib(t.pid), "fds": open_fds(t.pid)}

    # -- scale --

    def run_scale(self, ext4: Ext4) -> None:
        big = self.scale_files
        small = max(200, big // 100)
        appends, batches = (300, 3) if self.args.smoke else (2000, 5)
        makers: dict[str, Any] = {
            "quotafs": lambda top: QuotafsTarget(
                "quotafs", TARGETS["quotafs"], top, ext4.mountpoint_for("scale-quotafs"),
                ext4.image_size),
        }
        if "pyfuse3-passthrough" not in self.skipped and \
                "pyfuse3-passthrough" in self.wanted:
            script = fetch_passthrough_example(Path(self.args.cache_dir))
            makers["pyfuse3-passthrough"] = lambda top: passthrough_target(
                script, top, ext4.mountpoint_for("scale-pyfuse3"),
                os.path.join(ext4.root, "scale-pyfuse3.log"))
        for count in (small, big):
            log(f"scale: building {count:,} files in the backing directory")
            top = scale.build_tree(ext4, count)
            for name, make in makers.items():
                try:
                    row = scale.measure(make, top, count, appends, batches,
                                        self.quiet_timeout)
                    self.scale_rows.append(row.as_dict())
                except (OSError, BenchError) as exc:
                    message = f"scale {name} {count}: {exc}"
                    self.errors.append(message)
                    log(f"ERROR {message}")

    def run(self) -> None:
        stack = ExitStack()
        try:
            n = len(self.wanted)
            size = image_size(self.sizes, self.scale_files, n)
            inodes = 65536 + int(self.scale_files * 1.2) + 2 * (
                n * self.sizes.tree_dirs * (self.sizes.tree_files + 2) + self.sizes.files
                + n * (self.sizes.tar_files + 3 * self.sizes.git_files))
            log(f"native: {size // MiB} MiB sparse ext4 image ({inodes:,} inodes) on a tmpfs")
            ext4 = stack.enter_context(open_ext4(size, inodes))
            mounts = stack.enter_context(ExitStack())
            self.start_targets(mounts, ext4)
            self.run_rounds()
            with signals_deferred():
                mounts.close()
            if self.scale_files:
                self.run_scale(ext4)
        finally:
            with signals_deferred(reraise=False):
                stack.close()

    # -- output --

    def document(self, results: list[report.Result],
                 comparisons: list[report.Comparison]) -> dict[str, Any]:
        machine = machine_info()
        targets = []
        for t in self.targets:
            targets.append({"name": t.name, "description": t.description, "status": "ok",
                            "note": "; ".join(t.notes), "mount_seconds": t.mount_seconds,
                            "daemon_memory_kib": self.memory.get(t.name)})
        for name, note in self.skipped.items():
            targets.append({"name": name, "description": TARGETS[name], "status": "skipped",
                            "note": note})
        return {
            "schema": 1,
            "command": self.command(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": asdict(machine),
            "engine": self.engine,
            "cold_caches": self.cold,
            "rounds": self.rounds,
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "cpus": sorted(os.sched_getaffinity(0)),
            "sizes": asdict(self.sizes),
            "workloads": [{"name": w.name, "title": w.title, "unit": w.unit, "op": w.op,
                           "goal": w.goal} for w in self.workloads],
            "targets": targets,
            "results": [asdict(r) for r in results],
            "comparisons": [asdict(c) for c in comparisons],
            "scale": {"rows": self.scale_rows, "checks": self.scale_checks()},
            "errors": self.errors,
        }

    def command(self) -> str:
        return " ".join(shlex.quote(a) for a in ["python", "bench/run.py", *sys.argv[1:]])

    def scale_checks(self) -> list[dict[str, Any]]:
        rows = [r for r in self.scale_rows if r["target"] == "quotafs"]
        if not rows:
            return []
        small = min(rows, key=lambda r: r["files"])
        big = max(rows, key=lambda r: r["files"])
        checks: list[dict[str, Any]] = []
        if big["mount_cold_s"] is not None:
            checks.append({"check": f"mount with {big['files']:,} files ready (cold caches)",
                           "value": big["mount_cold_s"], "unit": "s",
                           "goal": f"< {report.MOUNT_GOAL_S:g} s",
                           "meets": big["mount_cold_s"] < report.MOUNT_GOAL_S})
        if big["rss_after_lookups_mib"] is not None:
            rss_bytes = big["rss_after_lookups_mib"] * MiB
            complete = big["lookups_ok"] == big["files"]
            checks.append({"check": f"daemon RSS after {big['files']:,} lookups"
                                    + ("" if complete else
                                       f" (only {big['lookups_ok']:,} succeeded)"),
                           "value": rss_bytes / 1e6, "unit": "MB",
                           "goal": f"< {report.RSS_GOAL_BYTES / 1e6:g} MB",
                           "meets": complete and rss_bytes < report.RSS_GOAL_BYTES})
        for key, what in (("append_us", "files present"),
                          ("append_us_looked_up", "files looked up")):
            growth = big[key] / small[key] if small[key] and big[key] else None
            checks.append({"check": f"4K append time, {big['files']:,} vs "
                                    f"{small['files']:,} files ({what})",
                           "value": growth, "unit": "x",
                           "goal": f"≤ {report.APPEND_GROWTH_GOAL:g}x (must not grow)",
                           "meets": growth is not None
                           and growth <= report.APPEND_GROWTH_GOAL})
        return checks

    def tables(self, results: list[report.Result], comparisons: list[report.Comparison],
               fmt: str) -> str:
        table = report.markdown_table if fmt == "md" else report.text_table
        parts = [table(report.RESULT_HEADER, report.result_rows(results, self.workloads))]
        if self.memory:
            parts.append(table(["daemon after the rounds", "RSS MiB", "peak RSS MiB", "fds"], [
                [name, f"{m['VmRSS'] / 1024:.1f}", f"{m['VmHWM'] / 1024:.1f}", str(m["fds"])]
                for name, m in self.memory.items()]))
        if comparisons:
            parts.append(table(report.COMPARISON_HEADER,
                               report.comparison_rows(comparisons, self.workloads)))
        if self.scale_rows:
            parts.append(table(report.SCALE_HEADER, report.scale_rows(self.scale_rows)))
            notes = [f"{r['target']} {r['files']:,} files: {note}"
                     for r in self.scale_rows for note in r["notes"]]
            if notes:
                parts.append("\n".join(("- " if fmt == "md" else "  ") + n for n in notes))
            checks = self.scale_checks()
            if checks:
                parts.append(table(["scale check", "value", "goal", "verdict"], [
                    [c["check"], "not measured" if c["value"] is None
                     else f"{c['value']:.2f} {c['unit']}", c["goal"],
                     "meets" if c["meets"] else "MISSES"] for c in checks]))
        return "\n\n".join(parts)


def _cpus(cpus: list[int]) -> str:
    return "all CPUs" if len(cpus) == os.cpu_count() else "CPU " + ",".join(map(str, cpus))


def main(argv: list[str] | None = None) -> int:
    with sigterm_as_interrupt():  # `kill` or a timeout's TERM cleans up as Ctrl-C does
        return _main(parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    if args.nice is not None:
        # Inherited by everything we start: fio, `quotafs mount` and so its daemon, the
        # pyfuse3 example. Kernel threads (loop, writeback) keep their own priority.
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    if args.cpu is not None:  # inherited, as the nice value is
        try:
            pin_to_cpu(args.cpu)
        except ValueError as exc:
            log(f"error: --cpu {args.cpu}: {exc}")
            return 2
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: everything was unmounted and detached")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    names = [t.name for t in bench.targets]
    results = report.summarise(bench.samples, names, bench.skipped, bench.workloads,
                               bench.not_run)
    comparisons: list[report.Comparison] = []
    if "quotafs-nolimit" in names:
        for other in ("quotafs", "quotafs-rule"):
            if other in names:
                comparisons += report.compare(bench.samples, other, "quotafs-nolimit",
                                              bench.workloads)
    if {"quotafs", "quotafs-baseline"} <= set(names):  # this tree against the baseline's
        comparisons += report.compare(bench.samples, "quotafs", "quotafs-baseline",
                                      bench.workloads, goal=None)
    if {"quotafs-crashsim", "quotafs"} <= set(names):  # a cost to show, no goal to meet
        comparisons += report.compare(bench.samples, "quotafs-crashsim", "quotafs",
                                      bench.workloads, goal=None)
    for target, against, workloads, goal in WRITE_GOALS:
        if {target, against} <= set(names):
            comparisons += report.compare(bench.samples, target, against, [
                w for w in bench.workloads if w.name in workloads], goal=goal)
    document = bench.document(results, comparisons)
    machine = document["machine"]
    print(f"\nquotafs benchmark, {document['date']}: {bench.rounds} round(s), engine "
          f"{bench.engine}, caches {'dropped' if bench.cold else 'warm'} for read/walk, "
          f"nice {document['nice']}, {_cpus(document['cpus'])}")
    print(f"machine: {machine_info().line()}")
    print(f"command: {document['command']}\n")
    print(bench.tables(results, comparisons, "text"))
    for t in document["targets"]:
        if t["status"] != "ok":
            print(f"\n{t['name']}: {t['note']}")
    if bench.errors:
        print("\nerrors:\n  " + "\n  ".join(bench.errors))
    if args.json:
        report.write_json(args.json, document)
    if args.csv:
        report.write_csv(args.csv, results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `{document['command']}`  \n"
                    f"Date: {document['date']}  \n"
                    f"Machine: {machine['nproc']} CPU ({machine['cpu_model']}), Linux "
                    f"{machine['kernel']}, {machine['mem_total_mib']} MiB RAM, Python "
                    f"{machine['python']}, pyfuse3 {machine['pyfuse3']}, "
                    f"{machine['fio'] or 'no fio'}, {machine['fuse']}  \n"
                    f"Rounds: {bench.rounds}, engine {bench.engine}, caches "
                    f"{'dropped' if bench.cold else 'warm'} for read/walk, nice "
                    f"{document['nice']}, {_cpus(document['cpus'])}, load average at the end "
                    f"{machine['load_avg']}, "
                    f"sizes {document['sizes']}\n\n")
            f.write(bench.tables(results, comparisons, "md") + "\n")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
