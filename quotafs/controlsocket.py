"""Where a mount's control socket lives, how the daemon makes it, and how a client reaches
it safely; standard library only (the daemon serves it from trio, quotafs.daemon.listener).

The socket's path follows from two things every client knows from /proc/self/mountinfo
alone: the mount point, and the uid the kernel says mounted it (FUSE's user_id=, which
no one can fake). Each uid has one directory: /run/quotafs-control for root, else
/tmp/quotafs-control-UID, mode 0711 — others may reach a socket in it by its name, but
cannot list, plant or swap one. A client refuses a directory or socket not owned by the
mount's uid, and a peer (SO_PEERCRED) of another uid, so a fake socket cannot be slipped
to it (root included). Who may do what is the daemon's check, on the peer's uid.

One request a connection: a JSON line in, a JSON line out (quotafs.protocol).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import stat
import struct
import time

from quotafs.errors import ExitCode, QuotafsError

DIR_MODE = 0o711
MAX_LINE = 1 << 20  # a request: a fault rule is a few KiB; a reply may be larger
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def control_dir(uid: int) -> str:
    """The directory of the control sockets of `uid`'s mounts."""
    if uid == 0 and os.path.isdir("/run"):
        return "/run/quotafs-control"
    return f"/tmp/quotafs-control-{uid}"


def socket_path(mountpoint: str, uid: int) -> str:
    # Hashed: a Unix socket's path is at most 107 bytes, a mount point's is not.
    digest = hashlib.sha256(mountpoint.encode(errors="surrogateescape")).hexdigest()[:32]
    return os.path.join(control_dir(uid), digest + ".sock")


def _problem(st: os.stat_result, uid: int, kind: str) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if kind == "directory" and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if kind == "socket" and not stat.S_ISSOCK(st.st_mode):
        return "is not a socket"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by the mount's (uid {uid})"
    if kind == "directory" and st.st_mode & 0o022:
        return f"has mode {st.st_mode & 0o777:o}: others may write to it"
    return None


def _refuse(path: str, problem: str) -> QuotafsError:
    return QuotafsError(f"refusing the control socket {path}: it {problem}",
                        ExitCode.PERMISSION)


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


# -- the daemon's side ----------------------------------------------------------------------

def _own_dir(uid: int) -> str:
    path = control_dir(uid)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
    st = os.lstat(path)
    problem = _problem(st, uid, "directory")
    if problem is not None:
        raise _refuse(path, problem)
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)  # e.g. made under a umask that left others out
    return path


def bind(mountpoint: str) -> tuple[socket.socket, os.stat_result]:
    """A listening socket at this mount's path (a stale one there is replaced, atomically:
    bound under a temporary name, then renamed), and what it is on disk (for release)."""
    uid = os.geteuid()
    for attempt in range(3):
        try:
            return _bind_in(_own_dir(uid), socket_path(mountpoint, uid))
        except FileNotFoundError:
            if attempt == 2:  # the directory went each time (another daemon's release)
                raise _cannot(uid, "it keeps vanishing") from None
        except OSError as exc:
            raise _cannot(uid, exc.strerror or str(exc)) from None
    raise AssertionError("unreachable")


def _cannot(uid: int, why: str) -> QuotafsError:
    return QuotafsError(f"cannot make the control socket in {control_dir(uid)}: {why}",
                        ExitCode.DAEMON)


def _bind_in(folder: str, path: str) -> tuple[socket.socket, os.stat_result]:
    tmp = os.path.join(folder, f".{os.getpid()}.{time.monotonic_ns()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o666)  # anyone may connect; the daemon checks the peer
        sock.listen(64)
        os.rename(tmp, path)
        return sock, os.lstat(path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove(path: str) -> None:
    """Remove a socket, and its directory if that is now empty (a daemon binding there at
    this moment retries: see bind)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):  # ENOTEMPTY: other mounts' sockets
        os.rmdir(os.path.dirname(path))


def release(mountpoint: str, bound: os.stat_result) -> None:
    """Remove the socket, if it is still the one `bind` made (not a newer daemon's)."""
    path = socket_path(mountpoint, os.geteuid())
    with contextlib.suppress(OSError):
        if os.path.samestat(os.lstat(path), bound):
            _remove(path)


# -- a client's side ------------------------------------------------------------------------

def connect(mountpoint: str, uid: int, timeout: float) -> socket.socket:
    """A connection to the daemon of the mount at `mountpoint` that `uid` made, checked
    (QuotafsError PERMISSION); OSError as connect(2) gives it (ENOENT: no socket,
    ECONNREFUSED: no daemon listens)."""
    path = socket_path(mountpoint, uid)
    for where, kind in ((os.path.dirname(path), "directory"), (path, "socket")):
        problem = _problem(os.lstat(where), uid, kind)
        if problem is not None:
            raise _refuse(where, problem)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        served_by = peer_uid(sock)
        if served_by != uid:
            raise _refuse(path, f"is served by uid {served_by}, not by the mount's "
                                f"(uid {uid})")
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(sock: socket.socket, line: bytes, timeout: float) -> bytes:
    """Send one request line, read the reply line, all within `timeout` seconds
    (TimeoutError otherwise: a stopped or stuck daemon)."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "no answer in time")
        return left

    sock.settimeout(remaining())
    sock.sendall(line)
    reply = bytearray()
    while not reply.endswith(b"\n"):
        sock.settimeout(remaining())
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        reply += chunk
    return bytes(reply)


def remove_stale(mountpoint: str, uid: int) -> None:
    """Remove a dead daemon's socket (nobody listens at it), never a live one."""
    path = socket_path(mountpoint, uid)
    try:
        connect(mountpoint, uid, 1.0).close()
    except ConnectionRefusedError:
        _remove(path)
    except (OSError, QuotafsError):
        pass  # missing, alive, or not ours to remove
