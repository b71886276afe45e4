"""Unmounting, whoever mounted: the one retry loop for a busy mount (the API, the plugin,
the ext4 reference, the bench) and the one reading of umount's / fusermount3's failures.

Below both quotafs.client and quotafs.reference, which each bring their own single unmount."""

from __future__ import annotations

import time
from collections.abc import Callable

from quotafs.errors import ExitCode, QuotafsError, with_doctor_hint
from quotafs.mountinfo import find_mount


def unmount_failure(mountpoint: str, stderr: str) -> QuotafsError:
    """The error of a failed umount / fusermount3 -u, from its stderr: ExitCode.MOUNTPOINT
    when the mount is busy (the one failure worth a retry)."""
    message = (stderr.strip().splitlines() or ["unmount failed"])[-1]
    text = f"cannot unmount {mountpoint}: {message}"
    if message.startswith("fusermount3:") and "Operation not permitted" in message:
        text = with_doctor_hint(text)  # a fusermount3 without its setuid bit, typically
    return QuotafsError(text, _unmount_code(message))


def _unmount_code(message: str) -> ExitCode:
    if "busy" in message:
        return ExitCode.MOUNTPOINT
    # fusermount3 finds no mount of the caller's own in mtab; umount wants root.
    if any(m in message for m in ("not found in /etc/mtab", "superuser", "not permitted")):
        return ExitCode.PERMISSION
    return ExitCode.FAILURE


BUSY_TRIES = 5  # polite unmounts of a busy mount (busy right after a child exits), ~1 s


def unmount_retrying(mountpoint: str, umount: Callable[[str, bool], None],
                     tries: int = BUSY_TRIES, lazy: bool = True) -> str | None:
    """Unmount `mountpoint` if mounted, retrying while it is busy (0.1 s, 0.2 s, then 0.25 s
    apart); then, with `lazy`, detach it lazily. Returns None once nothing is mounted there,
    else why it still is (without `lazy`: "target is busy"). A failure other than busy is
    not retried: with `lazy` the lazy unmount follows, and its failure is raised; without,
    it is raised. `umount(path, lazy)` unmounts once (quotafs.client.lifecycle.unmount, or
    the ext4 reference's own umount); it raises QuotafsError, ExitCode.MOUNTPOINT when
    busy."""
    do = umount
    error: QuotafsError | None = None
    for attempt in range(tries):
        if find_mount(mountpoint) is None:
            return None
        try:
            do(mountpoint, False)
            return None
        except QuotafsError as exc:
            error = exc
            if find_mount(mountpoint) is None:
                return None
            if exc.code != ExitCode.MOUNTPOINT:
                break
        if attempt < tries - 1:
            time.sleep(min(0.1 * (attempt + 1), 0.25))
    if find_mount(mountpoint) is None:
        return None
    if lazy:
        do(mountpoint, True)
        return None
    if error is not None and error.code != ExitCode.MOUNTPOINT:
        raise error
    return "still mounted" if error is None else str(error).rsplit(": ", 1)[-1].rstrip(".")
