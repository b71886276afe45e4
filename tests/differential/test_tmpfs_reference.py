"""The tmpfs reference (reference/tmpfs.py), for real: as root and as an unprivileged user
(uid 65534), the program runs inside the private namespace as the right uid, write(2) gets
ENOSPC at the size, the mmap writer dies by SIGBUS there, and nothing is left behind after
success, an exception, or a SIGKILL of the process that made it (its holder is gone).

The runs as nobody use /usr/bin/python3 and a copy of the package that nobody can read
(the project's venv may sit below /root), started with setpriv; the reference itself needs
no pyfuse3, so no venv is built for these.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import quotafs
from quotafs.compare.writers import bytes_on_disk, run_writer
from quotafs.errors import ExitCode, QuotafsError
from quotafs.reference.tmpfs import KNOWN_DIFFERENCES, open_tmpfs, tmpfs_size
from tests.conftest import NOBODY, SYSTEM_PYTHON, run_capture

SIZE = 1024 * 1024
CHUNK = 64 * 1024

# Run inside the namespace through the launch prefix: who it is, where it is (getcwd must
# work: the reason programs run inside), and how much write(2) stores before ENOSPC.
PROBE = """
import errno, json, os
n, err = 0, None
fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644)
try:
    while True:
        n += os.write(fd, b"x" * 65536)
except OSError as e:
    err = errno.errorcode[e.errno]
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
                  "bytes": n, "errno": err}))
"""

# The same checks, made by a process of nobody's that builds the reference itself.
AS_NOBODY = """
import json, os, subprocess, sys
from quotafs.compare.writers import bytes_on_disk, run_writer
from quotafs.errors import QuotafsError
from quotafs.reference.tmpfs import open_tmpfs
size, probe = int(sys.argv[1]), sys.argv[2]
out = {}
with open_tmpfs(size) as ref:
    out["pid"], out["workdir"] = ref.holder.pid, ref.workdir
    out["inside"], out["user_namespace"] = ref.inside_path, ref.user_namespace
    run = ref.outside("run")
    os.mkdir(run)
    p = subprocess.run([*ref.launch(None).prefix, sys.executable, "-c", probe], cwd=run,
                       capture_output=True, text=True, timeout=60)
    out["probe"] = json.loads(p.stdout) if p.returncode == 0 else p.stderr
    out["owner"] = os.stat(os.path.join(run, "f")).st_uid
    os.unlink(os.path.join(run, "f"))
    r = run_writer("mmap", ref.inside_path + "/m.dat", 4 * size, 65536,
                   prefix=ref.launch(None).prefix, cwd=ref.outside_path)
    out["mmap"] = [r.signal_name, r.bytes_acknowledged,
                   bytes_on_disk(ref.outside("m.dat"), 65536, r.bytes_acknowledged)]
    try:
        ref.launch("root")
        out["as_root"] = None
    except QuotafsError as e:
        out["as_root"] = int(e.code)
out["holder_left"] = os.path.exists(f"/proc/{out['pid']}")
out["workdir_left"] = os.path.exists(out["workdir"])
print(json.dumps(out))
"""

# Makes a reference, starts a program in it (in a session of its own, as compare does),
# says where, and waits to be killed.
HOLD = """
import json, subprocess, sys, time
from quotafs.reference.tmpfs import open_tmpfs
user = sys.argv[1] if len(sys.argv) > 1 else None
with open_tmpfs(1 << 20) as ref:
    prog = subprocess.Popen([*ref.launch(user).prefix, "sleep", "120"], cwd=ref.outside_path,
                            start_new_session=True)
    print(json.dumps([ref.holder.pid, ref.workdir, ref.outside_path, prog.pid]), flush=True)
    time.sleep(120)
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to become nobody)")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_exec(pid: int, name: bytes, timeout: float = 10.0) -> None:
    """Until the launch prefix (nsenter, unshare, setpriv) has exec'd the program: the
    program dies with its starter from then on (setpriv --pdeathsig); a SIGKILL of the
    starter within the few milliseconds before is not covered (docs/semantics.md)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[0] == name:
                return
        assert time.monotonic() < deadline, f"{pid} never became {name!r}"
        time.sleep(0.01)


def _probe(ref: object, user: str | None, python: str = sys.executable) -> dict[str, object]:
    from quotafs.reference.tmpfs import TmpfsReference
    assert isinstance(ref, TmpfsReference)
    run = ref.outside(f"run-{user}")
    os.mkdir(run)
    if user is not None:
        os.chown(run, NOBODY, NOBODY)
    p = subprocess.run([*ref.launch(user).prefix, python, "-c", PROBE], cwd=run,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got: dict[str, object] = json.loads(p.stdout)
    got["owner"] = os.stat(os.path.join(run, "f")).st_uid
    shutil.rmtree(run)
    return got


@pytest.fixture(scope="module")
def nobody_copy() -> Iterator[Path]:
    """A copy of the package that nobody can read, in a directory nobody can enter."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to become nobody)")
    for tool in ("setpriv", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    top = Path(tempfile.mkdtemp(prefix="quotafs-nobody-"))
    try:
        shutil.copytree(Path(quotafs.__file__).parent, top / "quotafs",
                        ignore=shutil.ignore_patterns("__pycache__"))
        run_capture(["chmod", "-R", "a+rX", str(top)])
        check = _as_nobody(top, ["-c", "import subprocess, sys; sys.exit(subprocess.run("
                                       "['unshare', '-Urm', 'true']).returncode)"])
        if check.returncode != 0:
            pytest.skip(f"nobody cannot make user namespaces here: {check.stderr.strip()}")
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _as_nobody(top: Path, args: list[str], timeout: float = 120,
               popen: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           "env", "-i", f"PYTHONPATH={top}", "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
           SYSTEM_PYTHON, *args]
    return run_capture(cmd, timeout=timeout, cwd=top)


# -- as root --------------------------------------------------------------------------------

@needs_root
def test_root_runs_the_program_inside_as_root_or_as_the_user_and_hits_enospc_at_size() -> None:
    with open_tmpfs(SIZE) as ref:
        assert not ref.user_namespace and ref.quotafs_limit == SIZE == ref.size
        assert ref.quotafs_reserve == 0
        root = _probe(ref, None)
        assert root == {"uid": 0, "gid": 0, "cwd": f"{ref.inside_path}/run-None",
                        "bytes": SIZE, "errno": "ENOSPC", "owner": 0}
        nobody = _probe(ref, "nobody", SYSTEM_PYTHON)
        assert nobody == {"uid": NOBODY, "gid": NOBODY, "cwd": f"{ref.inside_path}/run-nobody",
                          "bytes": SIZE, "errno": "ENOSPC", "owner": NOBODY}
        # The tmpfs is the namespace's own: not on the host's mount point.
        assert os.listdir(ref.mountpoint) == []
        pid, workdir = ref.holder.pid, ref.workdir
    assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(workdir)


@needs_root
def test_the_mmap_writer_dies_by_sigbus_at_the_size_and_its_pages_read_back() -> None:
    with open_tmpfs(SIZE) as ref:
        result = run_writer("mmap", os.path.join(ref.inside_path, "m.dat"), 4 * SIZE, CHUNK,
                            prefix=ref.launch(None).prefix, cwd=ref.outside_path)
        assert (result.outcome, result.signal_name) == ("signal", "SIGBUS")
        assert result.bytes_acknowledged == SIZE  # every page that fitted, none more
        assert bytes_on_disk(ref.outside("m.dat"), CHUNK, SIZE) == SIZE
        assert ref.used_bytes() == SIZE


@needs_root
def test_nothing_is_left_after_an_exception() -> None:
    with pytest.raises(RuntimeError, match="the test's own"), open_tmpfs(SIZE) as ref:
        pid, workdir = ref.holder.pid, ref.workdir
        assert os.path.ismount(ref.outside_path)
        raise RuntimeError("the test's own")
    assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(workdir)


@needs_root
def test_keep_leaves_it_and_says_how_to_remove_it() -> None:
    with pytest.raises(RuntimeError) as info, open_tmpfs(SIZE, keep=True) as ref:
        raise RuntimeError("inspect me")
    try:
        assert ref.holder.alive() and os.path.ismount(ref.outside_path)
        assert f"kill {ref.holder.pid}" in " ".join(info.value.__notes__)
    finally:
        ref.holder.stop()
        shutil.rmtree(ref.workdir)


def test_bad_sizes_and_users_are_one_line_errors() -> None:
    with pytest.raises(QuotafsError, match=r"at least 4\.0 KiB") as info, open_tmpfs(100):
        pass
    assert info.value.code == ExitCode.USAGE
    assert tmpfs_size(1) == 4096 and tmpfs_size(16 << 20) == 16 << 20
    with open_tmpfs(SIZE) as ref, pytest.raises(QuotafsError, match="no such user") as info:
        ref.launch("no-such-user-h2")
    assert info.value.code == ExitCode.USAGE


def test_describe_states_the_known_differences() -> None:
    with open_tmpfs(3 * SIZE) as ref:
        d = ref.describe()
    assert d["kind"] == "tmpfs" and d["size"] == d["quotafs_limit"] == 3 * SIZE
    assert d["known_differences"] == list(KNOWN_DIFFERENCES)
    assert any("no metadata blocks" in k for k in KNOWN_DIFFERENCES)
    assert isinstance(d["nr_inodes"], int) and d["nr_inodes"] > 0


def _kill_maker_and_check_holder(cmd: list[str], env: dict[str, str] | None = None) -> None:
    made: list[int] = []  # the holder and the program: killed by pid if a check fails
    workdir = ""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd="/") as maker:
        try:
            assert maker.stdout is not None and maker.stderr is not None
            line = maker.stdout.readline()
            assert line, maker.stderr.read()
            pid, workdir, outside, prog = json.loads(line)
            made += [pid, prog]
            for child in (pid, prog):  # the holder and the program are the maker's own
                with open(f"/proc/{child}/status") as f:
                    assert f"PPid:\t{maker.pid}\n" in f.read()
            assert os.path.ismount(outside)
            _wait_exec(prog, b"sleep")
            maker.kill()
            maker.wait()
            assert _gone(pid), f"holder {pid} outlived the SIGKILL of its maker"
            # The program would keep the namespace (and its tmpfs) alive: it goes too.
            assert _gone(prog), f"program {prog} outlived the SIGKILL of its maker"
            # The empty host-side directory is all a SIGKILL leaves (no one is left to
            # remove it).
            assert os.listdir(os.path.join(workdir, "mnt")) == []
        finally:
            maker.kill()
            for leftover in made:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)


@needs_root
@pytest.mark.parametrize("user", [None, "nobody"])
def test_the_holder_dies_with_its_maker_on_sigkill(user: str | None) -> None:
    env = {**os.environ, "PYTHONPATH": quotafs.PACKAGE_PARENT}
    _kill_maker_and_check_holder([sys.executable, "-c", HOLD, *([user] if user else [])], env)


# -- as nobody ------------------------------------------------------------------------------

def test_nobody_makes_one_runs_inside_as_itself_and_leaves_nothing(nobody_copy: Path) -> None:
    r = _as_nobody(nobody_copy, ["-c", AS_NOBODY, str(SIZE), PROBE])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["user_namespace"] is True
    assert got["probe"] == {"uid": NOBODY, "gid": NOBODY, "cwd": f"{got['inside']}/run",
                            "bytes": SIZE, "errno": "ENOSPC"}
    assert got["owner"] == NOBODY  # the file is nobody's on the host too
    assert got["mmap"] == ["SIGBUS", SIZE, SIZE]
    assert got["as_root"] == ExitCode.PERMISSION  # a user cannot switch users in it
    assert got["holder_left"] is False and got["workdir_left"] is False


def test_nobody_s_holder_dies_with_its_maker_on_sigkill(nobody_copy: Path) -> None:
    # PR_SET_PDEATHSIG must survive unshare -Urm's credential change and exec.
    _kill_maker_and_check_holder(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env", "-i",
         f"PYTHONPATH={nobody_copy}", "PATH=/usr/bin:/bin", SYSTEM_PYTHON, "-c", HOLD])


def test_sigterm_of_the_maker_tears_down_in_order(nobody_copy: Path) -> None:
    script = ("from quotafs.interrupts import sigterm_as_interrupt\n"
              "with sigterm_as_interrupt():\n"
              + "\n".join("    " + line for line in HOLD.strip().splitlines()))
    with subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env",
             "-i", f"PYTHONPATH={nobody_copy}", "PATH=/usr/bin:/bin", SYSTEM_PYTHON, "-c",
             script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/") as maker:
        try:
            assert maker.stdout is not None and maker.stderr is not None
            line = maker.stdout.readline()
            assert line, maker.stderr.read()
            pid, workdir, _, prog = json.loads(line)
            _wait_exec(prog, b"sleep")
            maker.send_signal(signal.SIGTERM)
            assert maker.wait(timeout=30) != 0  # interrupted, after its clean-up
            assert not os.path.exists(f"/proc/{pid}")  # reaped by the teardown, not init
            assert not os.path.exists(workdir)  # an orderly teardown removed it
            assert _gone(prog)  # the program in it died with its maker
        finally:
            maker.kill()


def test_a_mount_that_fails_in_the_namespace_is_one_line(tmp_path: Path) -> None:
    from quotafs.reference.namespace import start_holder
    with pytest.raises(QuotafsError, match=r"^cannot make a tmpfs in a private namespace: "
                                           r"mount: .*bad option") as info:
        start_holder(str(tmp_path), "size=not-a-size")
    assert info.value.code == ExitCode.LOOP and "\n" not in str(info.value)
    assert not os.path.ismount(tmp_path)


def test_a_work_directory_that_is_not_one_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(QuotafsError, match="is not a directory") as info, \
            open_tmpfs(SIZE, workdir=str(tmp_path / "file")):
        pass
    assert info.value.code == ExitCode.USAGE and "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # nothing made
