"""A power cut on a real filesystem: the shutdown ioctl xfstests uses in place of pulling the
plug (`xfs_io -x -c "shutdown" MNT`; FS_IOC_SHUTDOWN, in ext4 since Linux 4.10).

With FS_GOING_FLAGS_NOLOGFLUSH the journal's running transaction is thrown away, not
committed: what was not yet in a committed transaction (or written back) is lost, as at a
power cut. From then on every request on the filesystem answers EIO; unmounting it and
mounting the device again replays the journal and shows the post-crash state.
"""

from __future__ import annotations

import fcntl
import os
import struct

from quotafs.errors import ExitCode, QuotafsError

# From include/uapi/linux/fs.h (the number ext4 and xfs answer; checked on this kernel by
# tests/differential/test_crash_models.py): _IOR('X', 125, __u32).
_IOC_READ = 2
FS_IOC_SHUTDOWN = (_IOC_READ << 30) | (4 << 16) | (ord("X") << 8) | 125
FS_GOING_FLAGS_DEFAULT = 0  # freeze and flush everything first: a clean stop
FS_GOING_FLAGS_LOGFLUSH = 1  # commit the journal, drop unwritten data
FS_GOING_FLAGS_NOLOGFLUSH = 2  # neither: a power cut


def shutdown(mountpoint: str, flags: int = FS_GOING_FLAGS_NOLOGFLUSH) -> None:
    """Shut the filesystem mounted at `mountpoint` down (needs CAP_SYS_ADMIN). The mount
    stays in the mount table, every later request on it answering EIO."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise QuotafsError(f"cannot open {mountpoint} to shut it down: {exc.strerror}",
                           ExitCode.LOOP) from exc
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", flags))
    except OSError as exc:
        # ENOTTY: a filesystem without the ioctl; EPERM: not root.
        raise QuotafsError(f"FS_IOC_SHUTDOWN on {mountpoint} failed: {exc.strerror}",
                           ExitCode.LOOP) from exc
    finally:
        os.close(fd)
