"""The real loop-ext4 reference, built as a person builds it by hand (root only):

    truncate -s SIZE IMAGE; losetup --find --show IMAGE; mkfs.ext4 -q -F DEV; mount DEV DIR

The image is sized so that the mounted ext4 has the requested free space as root sees it
(statvfs f_bfree: root may use the reserved blocks). ext4's overhead (inode tables, journal,
group descriptors) depends on the size in steps, so it is measured, not computed: format,
mount, measure, resize the image, reformat, a few rounds at most.

Teardown always runs and finds what to undo from the system, not from our own
bookkeeping: whatever is mounted on our mount point is unmounted, whatever loop device
`losetup -j IMAGE` lists is detached, so an interrupt between two steps leaks nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from quotafs import child_env, reap
from quotafs.errors import ExitCode, QuotafsError
from quotafs.interrupts import signals_deferred
from quotafs.mountinfo import find_mount
from quotafs.reference.shutdown import shutdown
from quotafs.reference.tools import find_tool, last_line, run_tool
from quotafs.units import format_size
from quotafs.unmounting import unmount_failure, unmount_retrying

MIN_FREE = 1024 * 1024  # below this mkfs.ext4 has no room for its journal; not a useful test
_MAX_ROUNDS = 12
_STEP = 4096  # image sizes in whole pages (and whole ext4 blocks, 1 KiB or 4 KiB)
_TOLERANCE = 16 * 1024  # accept free space up to this much above the request
_TOOLS = ("losetup", "mkfs.ext4", "mount", "umount")  # what the reference needs


@dataclass(frozen=True)
class Ext4Loop:
    """A mounted loop-ext4 filesystem and how much room it really has."""

    image: str
    device: str
    mountpoint: str
    workdir: str  # the temp dir holding image and mount point, removed at teardown
    image_size: int
    block_size: int
    free_bytes: int  # statvfs f_bfree * f_frsize: free space for root (reserved blocks too)
    avail_bytes: int  # statvfs f_bavail * f_frsize: what df shows, for non-root users
    # ext4 holds back min(2% of blocks, 4096 clusters) for metadata under delayed
    # allocation; no one's data gets them, root included, so write(2) stops about this
    # much short of free_bytes (minus a little more for extent tree blocks).
    reserved_clusters_bytes: int
    write_capacity_hint: int  # free_bytes - reserved_clusters_bytes: root's room
    rounds: int  # mkfs rounds it took to hit the requested free space
    # Root's reserved blocks (5% by default): users other than root stop this much short
    # of write_capacity_hint, and df's Avail leaves them out (free - avail - clusters).
    root_reserve_bytes: int = 0

    def quotafs_options(self) -> dict[str, int]:
        """limit and reserve of a quotafs with this ext4's room for root and for others."""
        return {"limit": self.write_capacity_hint, "reserve": self.root_reserve_bytes}

    def power_cut(self) -> None:
        """Cut the power: FS_IOC_SHUTDOWN without a log flush (what was not committed to
        the journal is gone), unmount, and mount the image again through a new loop
        device (the journal replayed), so the mount point shows the post-crash state.
        Descriptors opened before stay dead (EIO): close them first, or the unmount finds
        the mount busy and this fails.

        A new device, because the old one's superblock may outlive our unmount: a mount
        namespace made while it was mounted (unshare -m, the tmpfs reference's) holds a
        copy of the mount, and mounting the same device again would hand back that live,
        shut-down superblock with the pre-cut state in its caches."""
        tools = _find_tools()
        shutdown(self.mountpoint)
        with signals_deferred():  # teardown finds every device by `losetup -j IMAGE`
            busy = unmount_retrying(os.path.realpath(self.mountpoint),
                                    functools.partial(_umount_once, tools), lazy=False)
            if busy is not None:
                raise QuotafsError(f"cannot remount {self.mountpoint} after the power cut: "
                                   f"{busy} (a descriptor opened before it is still open)",
                                   ExitCode.LOOP)
            # Still held elsewhere, the old device is detached once released (autoclear).
            run_tool([tools.losetup, "-d", self.device])
            proc = run_tool([tools.losetup, "--find", "--show", self.image])
            if proc.returncode != 0:
                raise QuotafsError(f"no free loop device after the power cut: "
                                   f"{last_line(proc)}", ExitCode.LOOP)
            object.__setattr__(self, "device", proc.stdout.strip())  # the one field that moves
            proc = run_tool([tools.mount, self.device, self.mountpoint])
        if proc.returncode != 0:
            raise QuotafsError(f"mount {self.device} {self.mountpoint} after the power cut "
                               f"failed: {last_line(proc)}", ExitCode.LOOP)

    def cleanup_commands(self) -> list[str]:
        """Shell commands that remove what keep=True left behind."""
        return [
            f"umount {shlex.quote(self.mountpoint)}",
            f"losetup -d {shlex.quote(self.device)}",
            f"rm -rf {shlex.quote(self.workdir)}",
        ]


@dataclass(frozen=True)
class _Tools:
    losetup: str
    mkfs: str
    mount: str
    umount: str


@contextlib.contextmanager
def open_ext4_loop(free_bytes: int, workdir: str | None = None,
                   keep: bool = False, image_size: int | None = None,
                   mkfs_options: Sequence[str] = ()) -> Iterator[Ext4Loop]:
    """Build a mounted loop-ext4 with at least `free_bytes` free (as root), yield it, and
    tear it all down afterwards, whatever happens; keep=True leaves it for inspection.
    With `image_size`, the image is that size instead (the recipe's `truncate -s SIZE`),
    formatted once, whatever room that gives. `mkfs_options` go to mkfs.ext4 (the bench
    asks for its inode count and for inode tables initialised at once)."""
    if free_bytes < MIN_FREE:
        raise QuotafsError(
            f"the ext4 reference needs at least {format_size(MIN_FREE)} free, "
            f"got {free_bytes} bytes", ExitCode.USAGE)
    if os.geteuid() != 0:
        raise QuotafsError("compare needs root: it attaches a loop device and mounts ext4",
                           ExitCode.PERMISSION)
    tools = _find_tools()
    base = workdir if workdir is not None else _default_base()
    _check_room(base, image_size or free_bytes)
    mkfs = (*mkfs_options, "-q", "-F")
    tmp: str | None = None
    built = False
    reaper: Reaper | None = None
    try:
        try:
            with signals_deferred():  # so no interrupt lands between mkdtemp and `tmp =`
                tmp = tempfile.mkdtemp(prefix="quotafs-ext4-", dir=base)
                reaper = Reaper.start(tmp)  # tears down if we are killed (SIGKILL)
            image, mnt = os.path.join(tmp, "ext4.img"), os.path.join(tmp, "mnt")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the mount from non-root tools
            os.mkdir(mnt)
            loop = _build(tools, mkfs, image, mnt, free_bytes, tmp, image_size)
        except OSError as exc:  # the host's own trouble: no room, a read-only workdir...
            where = tmp if tmp is not None else base
            raise QuotafsError(f"building the ext4 reference in {where} failed: {exc}",
                               ExitCode.LOOP) from exc
        built = True
        if keep and reaper is not None:  # kept whatever happens to us from here on
            reaper.done()
            reaper = None
        yield loop
    except BaseException as exc:
        if built and keep:
            exc.add_note("ext4 reference kept; remove it with: "
                         + " && ".join(loop.cleanup_commands()))
        elif tmp is not None:  # None: interrupted before anything existed
            problems = _teardown(tools, tmp)
            if problems:
                exc.add_note("ext4 reference not fully removed: " + "; ".join(problems))
        raise
    else:
        if not keep:
            problems = _teardown(tools, tmp)
            if problems:
                raise QuotafsError(
                    "could not remove the ext4 reference: " + "; ".join(problems),
                    ExitCode.LOOP)
    finally:
        if reaper is not None:  # torn down, or kept on purpose: nothing left for it
            reaper.done()


# What the owner writes to its reaper (reaper.py) once nothing is left for it to do.
REAPER_DONE = b"done"


class Reaper:
    """The owner's end of quotafs/reference/reaper.py: the reaper process, and the pipe
    only the owner writes to it."""

    def __init__(self, proc: subprocess.Popen[bytes], fd: int) -> None:
        self._proc = proc
        self._fd = fd

    @classmethod
    def start(cls, tmp: str) -> Reaper | None:
        """A reaper for the reference in `tmp`; None if it could not be started (the
        teardown then only has the owner's own `finally`)."""
        read, write = os.pipe()  # both non-inheritable: no exec'd child holds the writer
        try:
            proc = subprocess.Popen(  # this very quotafs (child_env): its cwd is / below
                [sys.executable, "-m", "quotafs.reference.reaper", os.path.abspath(tmp)],
                stdin=read, env=child_env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                start_new_session=True)  # cwd /: it keeps no directory (or mount) busy
        except OSError:
            os.close(write)
            return None
        finally:
            os.close(read)
        return cls(proc, write)

    def done(self) -> None:
        """The owner tore down (or keeps the reference on purpose): the reaper exits."""
        with signals_deferred():  # a Ctrl-C here must not leave it to tear down
            with contextlib.suppress(OSError):  # a reaper that died early: nothing to tell
                os.write(self._fd, REAPER_DONE)
            os.close(self._fd)
        reap(self._proc, 10)


def _default_base() -> str:
    # /var/tmp is on disk on most systems; /tmp may be a small tmpfs.
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK):
        return "/var/tmp"
    return tempfile.gettempdir()


def _check_room(base: str, free_bytes: int) -> None:
    # The image is sparse, but the writers fill it: the host must hold it for real.
    if not os.path.isdir(base):
        raise QuotafsError(f"work directory {base} is not a directory", ExitCode.USAGE)
    try:
        st = os.statvfs(base)
    except OSError as exc:
        raise QuotafsError(f"cannot use {base} for the ext4 image: {exc.strerror}",
                           ExitCode.USAGE) from exc
    need = room_needed(free_bytes)
    if st.f_bavail * st.f_frsize < need:
        raise QuotafsError(
            f"not enough space in {base} for a {format_size(need)} ext4 image; "
            "choose another work directory", ExitCode.LOOP)


def room_needed(size: int) -> int:
    """The room the work directory must have for an ext4 reference of `size` (free space
    or image size): the image plus its overhead, which the writers fill for real."""
    return size + size // 5 + 16 * 1024 * 1024


def _find_tools() -> _Tools:
    found = {tool: find_tool(tool) for tool in _TOOLS}
    return _Tools(found["losetup"], found["mkfs.ext4"], found["mount"], found["umount"])


def check_tools() -> None:
    """Raise QuotafsError naming the package of the first tool the reference lacks."""
    _find_tools()


def _build(tools: _Tools, mkfs: Sequence[str], image: str, mnt: str, want: int, tmp: str,
           image_size: int | None = None) -> Ext4Loop:
    with open(image, "wb"):
        pass
    os.truncate(image, image_size or _round_up(want, _STEP))
    proc = run_tool([tools.losetup, "--find", "--show", image])
    if proc.returncode != 0:
        raise QuotafsError(f"no free loop device: losetup --find failed: {last_line(proc)}",
                           ExitCode.LOOP)
    dev = proc.stdout.strip()

    def measure(size: int) -> int:
        return _format_and_measure(tools, mkfs, dev, image, mnt, size)

    if image_size is not None:
        size, free, rounds = image_size, measure(image_size), 1
    else:
        size, free, rounds = _search(measure, want)
    st = os.statvfs(mnt)
    resv = _reserved_clusters(dev, size, st.f_bsize) * st.f_bsize
    return Ext4Loop(
        image=image, device=dev, mountpoint=mnt, workdir=tmp, image_size=size,
        block_size=st.f_bsize, free_bytes=free, avail_bytes=st.f_bavail * st.f_frsize,
        reserved_clusters_bytes=resv, write_capacity_hint=free - resv, rounds=rounds,
        root_reserve_bytes=max(0, free - st.f_bavail * st.f_frsize - resv))


def _search(measure: Callable[[int], int], want: int) -> tuple[int, int, int]:
    """Find an image size whose free space is in [want, want + _TOLERANCE]; failing that,
    the one with the least free space >= want. Returns (size, free, rounds); the filesystem
    of the returned size is the one left mounted.

    Free space is not monotonic in the image size: a new block group first costs more (its
    bitmaps, a superblock backup, reserved GDT blocks) than it brings. So: secant steps
    while they work, bisection between the best sizes below and above once they don't.
    """
    tried: dict[int, int] = {}
    size = _round_up(want + want // 8, _STEP)  # ext4's overhead is 5-12% at these sizes
    while True:
        free = tried[size] = measure(size)
        if want <= free <= want + _TOLERANCE:
            return size, free, len(tried)
        enough = [s for s, f in tried.items() if f >= want]
        hi = min(enough, default=None)
        lo = max((s for s, f in tried.items() if f < want and (hi is None or s < hi)),
                 default=None)
        nxt = _next_size(size, free, want)
        if hi is not None and lo is not None:
            if hi - lo <= _STEP:
                break
            if not lo < nxt < hi:
                nxt = max(lo + _STEP, (lo + hi) // 2 // _STEP * _STEP)
        if nxt in tried or len(tried) >= _MAX_ROUNDS:
            break
        size = nxt
    if not enough:
        raise QuotafsError(
            f"could not size an ext4 image for {format_size(want)} free: the last try, "
            f"{format_size(size)}, had {format_size(free)}", ExitCode.LOOP)
    best = min(enough, key=lambda s: (tried[s], s))
    if best != size:
        measure(best)  # leave the chosen one mounted
    return best, tried[best], len(tried) + (best != size)


def _next_size(size: int, free: int, want: int) -> int:
    if free < want:
        # Overhead grows with the image (inode tables): scale the shortfall by size/free.
        grow = (want - free) * size // max(free, 1)
        return _round_up(size + max(grow, _STEP), _STEP)
    # Too much room: shrink by the excess alone, which keeps the next try at or above `want`.
    return max(_STEP, size - (free - want) // _STEP * _STEP)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _format_and_measure(tools: _Tools, mkfs: Sequence[str], dev: str, image: str, mnt: str,
                        size: int) -> int:
    """Resize the image, mkfs and mount it; return f_bfree in bytes (left mounted)."""
    if not _umount(tools, mnt):  # the previous round's filesystem
        raise QuotafsError(f"could not unmount {mnt} to reformat it", ExitCode.LOOP)
    os.truncate(image, size)
    proc = run_tool([tools.losetup, "--set-capacity", dev])  # let the loop device see the new size
    if proc.returncode != 0:
        raise QuotafsError(f"losetup --set-capacity {dev} failed: {last_line(proc)}",
                           ExitCode.LOOP)
    proc = run_tool([tools.mkfs, *mkfs, dev])
    if proc.returncode != 0:
        raise QuotafsError(
            f"mkfs.ext4 failed on a {format_size(size)} image ({dev}): {last_line(proc)}",
            ExitCode.LOOP)
    proc = run_tool([tools.mount, dev, mnt])
    if proc.returncode != 0:
        raise QuotafsError(f"mount {dev} {mnt} failed: {last_line(proc)}", ExitCode.LOOP)
    st = os.statvfs(mnt)
    return st.f_bfree * st.f_frsize


def _reserved_clusters(dev: str, size: int, block: int) -> int:
    try:
        with open(f"/sys/fs/ext4/{os.path.basename(dev)}/reserved_clusters") as f:
            return int(f.read())
    except (OSError, ValueError):
        # The kernel's rule (ext4_calculate_resv_clusters), if sysfs can't tell us.
        return min(size // block // 50, 4096)


# --- teardown ------------------------------------------------------------------------------


def teardown_dir(tmp: str) -> list[str]:
    """_teardown of the reference in `tmp` (for the reaper, whose owner is gone)."""
    return _teardown(_find_tools(), tmp)


def _teardown(tools: _Tools, tmp: str) -> list[str]:
    """Undo everything that exists; return what could not be undone (empty: all clean)."""
    image, mnt = os.path.join(tmp, "ext4.img"), os.path.join(tmp, "mnt")
    problems: list[str] = []
    # A second Ctrl-C must not cut teardown short (each tool still has a timeout).
    with signals_deferred():
        try:
            if not _umount(tools, mnt):
                problems.append(f"{mnt} is still mounted")
            for dev in _devices_of(tools, image):
                proc = run_tool([tools.losetup, "-d", dev])
                if proc.returncode != 0:
                    problems.append(f"losetup -d {dev}: {last_line(proc)}")
            if _is_mounted(mnt):
                # Never rm -rf through a live mount: that would delete inside it.
                problems.append(f"left {tmp} in place")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                if os.path.exists(tmp):
                    problems.append(f"could not remove {tmp}")
        except (OSError, QuotafsError) as exc:
            problems.append(str(exc))
    return problems


def _umount(tools: _Tools, mnt: str) -> bool:
    """Unmount `mnt` if mounted: a few polite tries (busy right after a writer exits), then
    lazy. True when nothing is mounted there any more."""
    with contextlib.suppress(QuotafsError):
        unmount_retrying(os.path.realpath(mnt), functools.partial(_umount_once, tools))
    return not _is_mounted(mnt)


def _umount_once(tools: _Tools, mnt: str, lazy: bool) -> None:
    proc = run_tool([tools.umount, *(["-l"] if lazy else []), mnt])
    if proc.returncode != 0:
        raise unmount_failure(mnt, proc.stderr or proc.stdout)


def _devices_of(tools: _Tools, image: str) -> list[str]:
    if not os.path.exists(image):
        return []
    proc = run_tool([tools.losetup, "-j", image])
    # "/dev/loop3: [2049]:1234 (/var/tmp/quotafs-ext4-x/ext4.img)"
    return [line.split(":", 1)[0] for line in proc.stdout.splitlines() if line.strip()]


def _is_mounted(path: str) -> bool:
    return find_mount(os.path.realpath(path)) is not None
