"""The daemon: scan the backing directory, mount, serve until unmounted or signalled.

Run in the foreground by `quotafs mount --fg`, and as a child process for everything else
(`python -m quotafs.daemon CONFIG_FD READY_FD`, the configuration read from an inherited
descriptor), reporting readiness through an inherited pipe so that the parent returns only
once the mount answers — or prints the daemon's one-line error and its exit code.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
from typing import Any

import pyfuse3
import trio

from quotafs import __version__, controlsocket
from quotafs.daemon import listener, syscalls
from quotafs.daemon.control import ControlChannel
from quotafs.daemon.crashsim import CrashSim
from quotafs.daemon.inodes import InodeTable, default_path_fd_budget
from quotafs.daemon.kernel import Kernel
from quotafs.daemon.operations import CACHE_TIMEOUT, HandlerSettings, QuotaFS
from quotafs.daemon.paths import Paths
from quotafs.errors import ExitCode, QuotafsError, with_doctor_hint
from quotafs.model.costs import Costs, Mode, scan_backing
from quotafs.model.faults import FaultEngine
from quotafs.model.ledger import Ledger
from quotafs.mountinfo import find_mount
from quotafs.options import MountOptions
from quotafs.statedir import drop_log_if_empty, forget_record

log = logging.getLogger("quotafs")

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _tell(ready_fd: int | None, line: str) -> None:
    if ready_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(ready_fd, (line + "\n").encode())


def _die_with_parent() -> None:
    """Unmount when the process that started us dies, even by SIGKILL (test runs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _mount_options(config: MountOptions) -> set[str]:
    options = {"default_permissions", f"fsname={config.fsname}", "subtype=quotafs"}
    if os.geteuid() == 0:
        # As a local filesystem would be: device nodes open, set-id bits honoured (libfuse
        # adds nodev,nosuid otherwise; fusermount3 forces them for other users anyway).
        options |= {"dev", "suid"}
    if config.allow_other:
        options.add("allow_other")
    if config.debug:
        options.add("debug")
    return options


def _path_fd_budget() -> int:
    """QUOTAFS_PATH_FD_BUDGET: for tests that exercise closing and reopening descriptors."""
    budget = os.environ.get("QUOTAFS_PATH_FD_BUDGET")
    return int(budget) if budget is not None else default_path_fd_budget()


def build_filesystem(config: MountOptions, kernel: Kernel | None = None) -> QuotaFS:
    """The filesystem for `config`, every part built and wired here, once. `kernel`: the
    FUSE session calls (kernel.py); an in-process test layer passes its own."""
    costs = Costs(Mode(config.accounting), config.block_bytes)
    ledger = Ledger(config.limit, config.inodes, config.reserve_bytes,
                    config.kept_back_bytes)
    backing = config.backing_dir
    if config.crash_sim:
        CrashSim.clear_stash(backing)
    try:
        existing_bytes, existing_inodes = scan_backing(backing, costs)
    except OSError as exc:  # e.g. a dead FUSE mount inside it (ENOTCONN), or EACCES
        raise QuotafsError(f"cannot read the backing directory {backing}: "
                           f"{exc.filename or '?'}: {exc.strerror}", ExitCode.BACKING) from None
    ledger.force_charge(existing_bytes)
    ledger.force_add_inodes(existing_inodes)
    owner = os.geteuid()  # with root, the only uid allowed to change settings
    info: dict[str, Any] = {
        "version": __version__,
        "mountpoint": config.mountpoint,
        "backing": backing,
        "private_backing": config.private_backing,
        "pid": os.getpid(),
        "accounting": config.accounting,
        "block_size": config.block_bytes,
        "mmap_sigbus": config.mmap_sigbus,
        "xattrs": config.xattrs,
        "mount_options": sorted(_mount_options(config)),
        "owner_uid": owner,
        "existing_bytes_at_mount": existing_bytes,
    }
    faults = FaultEngine(config.seed)
    faults.add_all(config.rules)
    session = kernel if kernel is not None else Kernel()
    identity = syscalls.Identity()
    inodes = InodeTable(backing, _path_fd_budget(), identity.daemon)
    control = ControlChannel(
        ledger, info, owner, faults, statistics=inodes.statistics,
        forget_cached=lambda: session.invalidate_entries(inodes.named_entries()))
    options = HandlerSettings(costs, mmap_sigbus=config.mmap_sigbus,
                      attr_timeout=0.0 if config.no_cache else CACHE_TIMEOUT,
                      # Other users' path walks must reach the daemon: a name it looks up
                      # as the caller is checked against the backing's fresh search
                      # permissions on every directory on the way, which the kernel's
                      # cached entries would skip (see docs/security.md).
                      entry_timeout=0.0 if config.no_cache or config.allow_other
                      else CACHE_TIMEOUT,
                      keep_cache=not (config.no_cache or config.mmap_sigbus),
                      xattrs=config.xattrs, crash_sim=config.crash_sim)
    fs = QuotaFS(inodes, ledger, options, control, faults, session, identity,
                 Paths(inodes, backing))
    control.getxattr_requests = lambda: fs.getxattr_requests
    control.crash = fs.crash
    return fs


READ_AHEAD_KB = 1024  # 1 MiB: the largest READ request FUSE sends (256 pages)


def _read_ahead_kb(config: MountOptions) -> int | None:
    """The bdi read-ahead this mount wants, None for the kernel's default.

    1 MiB instead of 128 KiB, so that a sequential read costs an eighth of the requests.
    None with --no-cache. 0 with --mmap-sigbus: its reservations follow the kernel's
    page-in reads, and ext4 reserves only the pages a program writes (at page_mkwrite);
    a read-ahead window reserves pages the program may never write, and how far ahead it
    reaches depends on timing (seen: the same 8M mmap writer killed after 7 or 8 chunks).
    Without read-ahead each fault reads, and reserves, just its own page."""
    if config.mmap_sigbus:
        return 0
    return None if config.no_cache else READ_AHEAD_KB


def _set_read_ahead(mountpoint: str, kb: int) -> None:
    """Only root may write the bdi setting; elsewhere the kernel's default stays."""
    info = find_mount(mountpoint)
    if info is None or not info.device:
        return
    try:
        with open(f"/sys/class/bdi/{info.device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("read_ahead_kb left at the default: %s", exc)


async def _tune_after_init(config: MountOptions, kb: int, initialized: trio.Event) -> None:
    # The kernel lowers the bdi's read-ahead to what INIT negotiated when it reads the INIT
    # reply, so raise it after that. pyfuse3 calls fs.init() (which sets `initialized`)
    # just before libfuse writes the reply, in one step of the session loop: this task runs
    # only once that step is over and the reply read. No request on the mount itself: a
    # stat of it kept a fresh mount busy for umount and used up mount-time fault rules.
    await initialized.wait()
    _set_read_ahead(config.mountpoint, kb)


async def _serve(config: MountOptions, fs: QuotaFS, control: socket.socket) -> None:
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
                # Held since before the mount (run): one that came meanwhile arrives now.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        nursery.start_soon(listener.serve, control, fs.control)
        kb = _read_ahead_kb(config)
        if os.geteuid() == 0 and kb is not None:
            initialized = trio.Event()
            fs.on_init = initialized.set
            nursery.start_soon(_tune_after_init, config, kb, initialized)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def run(config: MountOptions, ready_fd: int | None = None) -> int:
    """Mount, serve, unmount. Returns the exit code; user errors are reported on ready_fd."""
    # SIGINT/SIGTERM are held from before the mount until the loop listens for them: one
    # that came between (a starter interrupted while we mount; our parent's death) would
    # kill us by its default action and leave the mount dead (ENOTCONN, busy to rmdir).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if config.die_with_parent:
        _die_with_parent()
    syscalls.raise_nofile_limit()
    os.umask(0)  # the caller's umask is applied per request
    control: tuple[socket.socket, os.stat_result] | None = None
    try:
        fs = build_filesystem(config)
        # Before mounting: a client finds the socket as soon as the mount is there.
        control = controlsocket.bind(config.mountpoint)
        try:
            pyfuse3.init(fs, config.mountpoint, _mount_options(config))
        except RuntimeError as exc:
            raise QuotafsError(with_doctor_hint(f"cannot mount {config.mountpoint}: {exc}"),
                               ExitCode.NO_FUSE) from exc
    except QuotafsError as exc:
        if control is not None:
            _release(config, control)
        _tell(ready_fd, f"error {int(exc.code)} {exc}")
        if ready_fd is None:  # mount --fg: nobody else will say it
            print(f"quotafs: {exc}", file=sys.stderr)
        return int(exc.code)
    assert control is not None
    clean = False
    try:
        _tell(ready_fd, "ready")
        if ready_fd is not None:
            os.close(ready_fd)
        try:
            trio.run(_serve, config, fs, control[0])
        except BaseException:  # in the log too, where the test suite's check looks
            log.critical("the daemon's main loop ended by an exception", exc_info=True)
            raise
        clean = True
    finally:
        _release(config, control)
        pyfuse3.close(unmount=True)
        if fs.crash is not None:  # unmounted cleanly or not: what was written stays
            fs.crash.close()
        if clean:  # a detached mount's record, written by the command that started us
            forget_record(config.mountpoint, pid=os.getpid())
            drop_log_if_empty(config.mountpoint, sys.stderr.fileno())
        if clean and config.private_backing and not config.keep_backing:
            shutil.rmtree(config.backing_dir, ignore_errors=True)
    return 0


def _release(config: MountOptions, control: tuple[socket.socket, os.stat_result]) -> None:
    sock, bound = control
    controlsocket.release(config.mountpoint, bound)
    sock.close()


def read_config(source: str) -> MountOptions:
    """The options the starter left in an inherited descriptor ("-": stdin): resolved and
    placed (MountOptions.resolve, .placed), checked again as they are read."""
    if source == "-":
        return MountOptions.from_json(sys.stdin.buffer.read().decode())
    with os.fdopen(int(source), "rb") as f:
        return MountOptions.from_json(f.read().decode())


def main(argv: list[str] | None = None) -> int:
    """`python -m quotafs.daemon CONFIG_FD [READY_FD]`: CONFIG_FD holds the MountOptions JSON
    ("-": stdin), never argv, which any user may read and ARG_MAX bounds."""
    args = sys.argv[1:] if argv is None else argv
    config = read_config(args[0])
    ready_fd = int(args[1]) if len(args) > 1 else None
    logging.basicConfig(
        level=logging.DEBUG if config.debug else logging.WARNING,
        format="%(asctime)s quotafs[%(process)d] %(levelname)s %(message)s",
        filename=config.log_file,  # None: stderr
    )
    return run(config, ready_fd)


if __name__ == "__main__":
    sys.exit(main())
