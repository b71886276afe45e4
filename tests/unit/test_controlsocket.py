"""quotafs.controlsocket without a mount: a client refuses a socket someone else could have
planted (a directory or socket of another uid, a directory others may write, a link, a
peer of another uid); the daemon replaces a stale socket and removes only its own."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotafs import controlsocket
from quotafs.errors import ExitCode, QuotafsError

MNT = "/some/mount"
OTHER = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


@pytest.fixture
def folder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """control_dir() of every uid, for this test alone: short, as a socket path must be
    (at most 107 bytes; pytest's tmp_path can be longer)."""
    top = Path(tempfile.mkdtemp(prefix="qcs-", dir="/tmp"))
    path = top / "control"
    monkeypatch.setattr(controlsocket, "control_dir", lambda uid: str(path))
    try:
        yield path
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _refused(words: str) -> None:
    with pytest.raises(QuotafsError) as info:
        controlsocket.connect(MNT, 0, 1.0).close()
    assert info.value.code == ExitCode.PERMISSION and words in str(info.value)


def test_a_socket_the_daemon_made_is_reached(folder: Path) -> None:
    sock, bound = controlsocket.bind(MNT)
    other, other_bound = controlsocket.bind("/another/mount")
    with sock, other:
        assert oct(folder.stat().st_mode & 0o777) == oct(controlsocket.DIR_MODE)
        with controlsocket.connect(MNT, 0, 1.0) as client:
            server, _ = sock.accept()
            with server:
                server.sendall(b"hi\n")
                assert controlsocket.exchange(client, b"x\n", 1.0) == b"hi\n"
    controlsocket.release(MNT, bound)
    assert folder.exists()  # another mount's socket is in it
    controlsocket.release("/another/mount", other_bound)
    assert not folder.exists()


def test_a_directory_others_may_write_or_of_another_uid_is_refused(folder: Path) -> None:
    sock, _ = controlsocket.bind(MNT)
    with sock:
        folder.chmod(0o777)
        _refused("others may write to it")
        folder.chmod(0o711)
        os.chown(folder, OTHER, OTHER)
        _refused(f"is owned by uid {OTHER}")
        with pytest.raises(QuotafsError, match="refusing the control socket"):
            controlsocket.bind(MNT)  # nor does a daemon use it


def test_a_planted_socket_or_link_is_refused(folder: Path, tmp_path: Path) -> None:
    sock, _ = controlsocket.bind(MNT)
    path = controlsocket.socket_path(MNT, 0)
    with sock:
        os.chown(path, OTHER, OTHER, follow_symlinks=False)
        _refused(f"is owned by uid {OTHER}")
        os.unlink(path)
        os.symlink(tmp_path / "elsewhere", path)
        _refused("is a symbolic link")


def test_a_peer_of_another_uid_is_refused(folder: Path) -> None:
    sock, _ = controlsocket.bind(MNT)
    sock.close()
    path = controlsocket.socket_path(MNT, 0)
    os.unlink(path)
    # Bound by root (the file is root's), listening as another uid: SO_PEERCRED says who.
    fake = socket.socket(socket.AF_UNIX)
    fake.bind(path)
    listening, done = os.pipe(), os.pipe()  # one each way
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setresuid(OTHER, OTHER, OTHER)
            fake.listen(1)
            os.write(listening[1], b"1")
            os.read(done[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(listening[0], 1) == b"1"
        _refused(f"is served by uid {OTHER}")
    finally:
        os.write(done[1], b"1")
        os.waitpid(pid, 0)
        fake.close()
        for fd in (*listening, *done):
            os.close(fd)


def test_a_stale_socket_is_replaced_and_only_ones_own_is_removed(folder: Path) -> None:
    first, bound_first = controlsocket.bind(MNT)
    first.close()  # as a SIGKILL leaves it: nobody listens
    with pytest.raises(ConnectionRefusedError):
        controlsocket.connect(MNT, 0, 1.0)
    second, bound_second = controlsocket.bind(MNT)
    with second:
        controlsocket.release(MNT, bound_first)  # the old daemon exits late
        controlsocket.connect(MNT, 0, 1.0).close()
        controlsocket.remove_stale(MNT, 0)  # alive: kept
        assert os.path.exists(controlsocket.socket_path(MNT, 0))
    controlsocket.remove_stale(MNT, 0)  # no listener any more: removed
    assert not os.path.exists(controlsocket.socket_path(MNT, 0))
    assert not folder.exists()  # the last socket gone, its directory goes too
    controlsocket.release(MNT, bound_second)  # nothing left: no error
