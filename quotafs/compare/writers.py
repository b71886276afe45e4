"""The mmap / write / fallocate writers used by `quotafs compare`, run as child processes.

Each writer runs in its own process (`python -m quotafs.compare.writers KIND PATH ...`) because the
mmap writer is expected to die by SIGBUS. Progress goes to a pipe, one line per event and one
write(2) per line, so the parent knows how far the child got even when a signal kills it:

    ack <total_bytes>                 bytes acknowledged so far (after each chunk / write(2))
    alloc <st_blocks*512> <st_size>   fallocate writer only, after posix_fallocate
    fail <call> <ERRNO_NAME>          the call that failed, e.g. "fail write ENOSPC"
    done                              every step succeeded

Every chunk carries a deterministic pattern (chunk_pattern) that is never all-zero, so
bytes_on_disk() can read a file back and tell written data from holes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import mmap
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from quotafs import child_env
from quotafs.errors import ExitCode, QuotafsError, errno_name
from quotafs.units import format_size, parse_size
from quotafs.users import passwd_entry

KINDS = ("mmap", "write", "fallocate")
Outcome = Literal["completed", "errno", "signal"]

_BLOCK = 4096  # pattern period and the granularity of bytes_on_disk's partial count
_FAIL_EXIT = 1  # a reported errno failure; 2 is usage (as argparse), signals are 128+N


def chunk_pattern(i: int, chunk: int) -> bytes:
    """The content of chunk `i`: a 4 KiB block unique to `i` (never all-zero), repeated."""
    # Each 8-byte word holds the chunk number and the word's position, so no two chunks,
    # and no two blocks within a file at different chunk numbers, look alike; the high
    # marker bit keeps every word non-zero.
    words = [(1 << 63) | (i << 16) | j for j in range(_BLOCK // 8)]
    block = struct.pack(f"<{len(words)}Q", *words)
    reps = -(-chunk // _BLOCK)
    return (block * reps)[:chunk]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise QuotafsError(
            f"unknown writer {kind!r}: choose one of {', '.join(KINDS)}", ExitCode.USAGE
        )


# --- child side ----------------------------------------------------------------------------


class _Reporter:
    """Writes protocol lines to the report fd, or human lines to stdout without one."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _emit(self, machine: str, human: str) -> None:
        # One os.write per line: unbuffered, so a SIGBUS right after loses nothing.
        if self._fd is not None:
            os.write(self._fd, (machine + "\n").encode())
        else:
            os.write(1, (human + "\n").encode())

    def ack(self, total: int) -> None:
        self._emit(f"ack {total}", f"acknowledged {total} bytes ({format_size(total)})")

    def alloc(self, allocated: int, size: int) -> None:
        self._emit(
            f"alloc {allocated} {size}",
            f"allocated {allocated} bytes ({format_size(allocated)}), file size {size}",
        )

    def fail(self, call: str, exc: OSError) -> None:
        name = errno_name(exc.errno)
        self._emit(f"fail {call} {name}", f"{call} failed: {name} ({exc.strerror})")

    def done(self) -> None:
        self._emit("done", "done")


def _write_all(fd: int, size: int, chunk: int, rep: _Reporter) -> bool:
    """write(2) the pattern, chunk by chunk, up to `size`; False after a failure."""
    total = 0
    i = 0
    while total < size:
        data = memoryview(chunk_pattern(i, chunk))[: min(chunk, size - i * chunk)]
        pos = total - i * chunk
        while pos < len(data):
            try:
                n = os.write(fd, data[pos:])
            except OSError as exc:
                rep.fail("write", exc)
                return False
            if n == 0:  # never seen on a regular file; don't spin if it happens
                rep.fail("write", OSError(errno.EIO, "write(2) returned 0"))
                return False
            # A short write is ext4 writing what fits: acknowledge it, retry the rest.
            pos += n
            total += n
            rep.ack(total)
        i += 1
    return True


def _sync_and_close(fd: int, rep: _Reporter) -> bool:
    try:
        os.fsync(fd)
    except OSError as exc:
        rep.fail("fsync", exc)
        _close_quietly(fd)
        return False
    try:
        os.close(fd)
    except OSError as exc:
        rep.fail("close", exc)
        return False
    return True


def _close_quietly(fd: int) -> None:
    # Already reporting an earlier failure; that one is the result.
    with contextlib.suppress(OSError):
        os.close(fd)


def _open(path: str, flags: int, rep: _Reporter) -> int | None:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        rep.fail("open", exc)
        return None


def _run_write(path: str, size: int, chunk: int, rep: _Reporter) -> bool:
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, rep)
    if fd is None:
        return False
    if not _write_all(fd, size, chunk, rep):
        _close_quietly(fd)
        return False
    return _sync_and_close(fd, rep)


def _run_mmap(path: str, size: int, chunk: int, rep: _Reporter) -> bool:
    # The seed's experiment: a sparse file larger than the free space, mapped shared and
    # filled by slice assignment. On ext4 a failed block reservation at page fault is SIGBUS,
    # which kills this process with nothing caught.
    fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, rep)
    if fd is None:
        return False
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        rep.fail("ftruncate", exc)
        _close_quietly(fd)
        return False
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        rep.fail("mmap", exc)
        _close_quietly(fd)
        return False
    for i in range(-(-size // chunk)):
        off = i * chunk
        n = min(chunk, size - off)
        mm[off : off + n] = chunk_pattern(i, chunk)[:n]
        rep.ack(off + n)
    try:
        mm.flush()  # msync(MS_SYNC): where FUSE reports refused dirty pages
    except OSError as exc:
        rep.fail("msync", exc)
        mm.close()
        _close_quietly(fd)
        return False
    try:
        mm.close()  # munmap, and close of mmap's own dup of fd
        os.close(fd)
    except OSError as exc:
        rep.fail("close", exc)
        return False
    return True


def _run_fallocate(path: str, size: int, chunk: int, rep: _Reporter) -> bool:
    # posix_fallocate, then the data written into the preallocated range: the seed's advice
    # ("preallocate to avoid ENOSPC") as an experiment; after a successful fallocate no write
    # may fail for lack of space.
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, rep)
    if fd is None:
        return False
    failed = False
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        rep.fail("fallocate", exc)
        failed = True
    # Either way, what it left: ext4 keeps a partial allocation and the size it reached.
    st = os.fstat(fd)
    rep.alloc(st.st_blocks * 512, st.st_size)
    if failed:
        _close_quietly(fd)
        return False
    if not _write_all(fd, size, chunk, rep):
        _close_quietly(fd)
        return False
    return _sync_and_close(fd, rep)


_RUNNERS: dict[str, Callable[[str, int, int, _Reporter], bool]] = {
    "mmap": _run_mmap,
    "write": _run_write,
    "fallocate": _run_fallocate,
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="python -m quotafs.compare.writers",
        description="Fill PATH with a deterministic pattern the way one kind of program does.",
    )
    parser.add_argument("kind", metavar="{mmap,write,fallocate}")
    parser.add_argument("path")
    parser.add_argument("--size", default="1G", help="file size to write (default 1G)")
    parser.add_argument("--chunk", default="1M", help="bytes per chunk (default 1M)")
    parser.add_argument("--report-fd", type=int, default=None, help="protocol lines go here")
    parser.add_argument("--as-user", metavar="USER", default=None,
                        help="become USER (its uid, gid and groups) before opening PATH")
    return parser.parse_args(argv)


def become(user: str) -> None:
    """Drop to `user` for good. Done in the writer itself, after Python started as root:
    the interpreter may live where that user cannot execute it (e.g. below /root)."""
    entry = passwd_entry(user)
    try:
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    except OSError as exc:
        raise QuotafsError(f"cannot become {user}: {exc.strerror}", ExitCode.PERMISSION) \
            from None


def _positive_size(text: str, what: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise QuotafsError(f"{what} must be positive, got {text!r}", ExitCode.USAGE)
    return value


def _quiet_on_fatal_signals() -> None:
    # SIGBUS must kill us with the default action, so the parent sees it in the exit status:
    # no faulthandler (it may be on via PYTHONFAULTHANDLER or -X), no Python handler, and
    # no core file (core_pattern may be plain "core" in the cwd).
    faulthandler.disable()
    for sig in (signal.SIGBUS, signal.SIGSEGV):
        signal.signal(sig, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        _check_kind(args.kind)
        size = _positive_size(args.size, "--size")
        chunk = _positive_size(args.chunk, "--chunk")
        if args.as_user is not None:
            become(args.as_user)
    except QuotafsError as exc:
        print(f"python -m quotafs.compare.writers: error: {exc}", file=sys.stderr)
        return int(exc.code)
    _quiet_on_fatal_signals()
    rep = _Reporter(args.report_fd)
    if not _RUNNERS[args.kind](args.path, size, chunk, rep):
        return _FAIL_EXIT
    rep.done()
    return 0


# --- parent side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WriterResult:
    """How far one writer got, and how it ended."""

    writer: str
    outcome: Outcome
    errno_name: str | None  # e.g. "ENOSPC", when outcome is "errno" (or an errno preceded a signal)
    signal_name: str | None  # e.g. "SIGBUS", when outcome is "signal"
    failed_call: str | None  # "write", "msync", "fsync", "close", "fallocate", "open", ...
    bytes_acknowledged: int  # last "ack": bytes the program was told were written
    allocated_bytes: int | None  # fallocate only: st_blocks*512 right after posix_fallocate
    file_size: int | None  # fallocate only: st_size right after posix_fallocate
    wall_time: float  # seconds, spawn to exit
    exit_status: int  # shell style: 128+N for a signal
    note: str | None = None  # e.g. "timed out after 600s"


@dataclass
class _Progress:
    acked: int = 0
    failed_call: str | None = None
    errno_name: str | None = None
    allocated: int | None = None
    file_size: int | None = None
    done: bool = False


def _apply(line: str, state: _Progress, progress: Callable[[int], None] | None) -> None:
    parts = line.split()
    if not parts:
        return
    if parts[0] == "ack" and len(parts) == 2:
        state.acked = int(parts[1])
        if progress is not None:
            progress(state.acked)
    elif parts[0] == "fail" and len(parts) == 3:
        state.failed_call, state.errno_name = parts[1], parts[2]
    elif parts[0] == "alloc" and len(parts) == 3:
        state.allocated, state.file_size = int(parts[1]), int(parts[2])
    elif parts[0] == "done":
        state.done = True


def _child_env() -> dict[str, str]:
    # The child runs `-m quotafs.compare.writers` from this very package (PACKAGE_PARENT).
    env = child_env()
    env.pop("PYTHONFAULTHANDLER", None)
    return env


def run_writer(
    kind: str,
    path: str,
    size: int,
    chunk: int,
    timeout: float = 600,
    progress: Callable[[int], None] | None = None,
    user: str | None = None,
    prefix: Sequence[str] = (),
    cwd: str | None = None,
) -> WriterResult:
    """Run one writer in a child process and report how far it got and how it ended;
    with `user`, the child writes as that user (root only). `prefix` goes in front of
    the child's argv (a reference's launch prefix: nsenter into its namespace), `cwd` is
    where it starts (the prefix's nsenter takes it in)."""
    _check_kind(kind)
    if size <= 0 or chunk <= 0:
        raise QuotafsError(f"size and chunk must be positive ({size}, {chunk})", ExitCode.USAGE)
    rfd, wfd = os.pipe()
    cmd = [*prefix, sys.executable, "-m", "quotafs.compare.writers", kind, path,
           "--size", str(size), "--chunk", str(chunk), "--report-fd", str(wfd),
           *(["--as-user", user] if user is not None else [])]
    state = _Progress()
    note: str | None = None
    # stderr to a file, not a pipe: a chatty child must never block on a pipe we don't read.
    with tempfile.TemporaryFile() as errfile:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, pass_fds=(wfd,), env=_child_env(), cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=errfile)
        finally:
            os.close(wfd)  # only the child holds the write end: EOF means it is gone
        try:
            if not _read_reports(rfd, state, progress, start + timeout):
                proc.kill()  # by pid, only our own child
                note = f"timed out after {timeout:g}s"
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            os.close(rfd)
        wall = time.monotonic() - start
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace").strip()
    return _result(kind, state, rc, wall, note, stderr)


def _read_reports(rfd: int, state: _Progress, progress: Callable[[int], None] | None,
                  deadline: float) -> bool:
    """Apply report lines until EOF (True) or the deadline passes (False)."""
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([rfd], [], [], remaining)
        if not ready:
            return False
        data = os.read(rfd, 65536)
        if not data:
            return True
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            _apply(line.decode(), state, progress)


def _result(kind: str, state: _Progress, rc: int, wall: float, note: str | None,
            stderr: str) -> WriterResult:
    signal_name: str | None = None
    if rc < 0:
        outcome: Outcome = "signal"
        signal_name = signal.Signals(-rc).name
        exit_status = 128 - rc
    elif state.failed_call is not None:
        outcome, exit_status = "errno", rc
    elif rc == 0 and state.done:
        outcome, exit_status = "completed", rc
    else:
        # Neither a reported failure nor a signal: the writer itself broke (a bug, a bad
        # interpreter); that is not a measurement, so don't dress it up as one.
        last = stderr.splitlines()[-1] if stderr else "no message"
        raise QuotafsError(f"{kind} writer exited with status {rc}: {last}", ExitCode.FAILURE)
    return WriterResult(
        writer=kind,
        outcome=outcome,
        errno_name=state.errno_name,
        signal_name=signal_name,
        failed_call=state.failed_call,
        bytes_acknowledged=state.acked,
        allocated_bytes=state.allocated,
        file_size=state.file_size,
        wall_time=wall,
        exit_status=exit_status,
        note=note,
    )


def bytes_on_disk(path: str, chunk: int, limit: int) -> int:
    """How many bytes from the start of `path` (up to `limit`) hold the writers' pattern.

    Stops at the first chunk that differs; of that chunk, counts the matching prefix in
    whole 4 KiB blocks (to the byte where the file ends). Holes read as zeros, never match.
    """
    total = 0
    with open(path, "rb", buffering=0) as f:
        i = 0
        while total < limit:
            want = min(chunk, limit - i * chunk)
            expected = chunk_pattern(i, chunk)[:want]
            got = f.read(want)
            if got == expected:
                total += want
                i += 1
                continue
            # Whole matching blocks; a read cut short by the end of the file compares only
            # what is there, so a file that simply ends counts to its last byte.
            for off in range(0, len(got), _BLOCK):
                piece = got[off : off + _BLOCK]
                if piece != expected[off : off + len(piece)]:
                    break
                total += len(piece)
            break
    return total


if __name__ == "__main__":
    raise SystemExit(main())
