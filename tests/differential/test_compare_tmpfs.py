"""`quotafs compare --reference tmpfs`, end to end on real mounts: a user's program
(`-- CMD`) and the built-in writers against a tmpfs in a private namespace and quotafs, as
root and as nobody. For nobody, /dev/fuse is root's here (0600), so the test makes a
private mount namespace with a 0666 fuse device node of its own bound over /dev/fuse (as
tests/mounts/test_unprivileged.py does) and runs `python -m quotafs` there as nobody, from
/usr/bin/python3 with a venv of its own. The host's /dev/fuse and mount table are untouched.
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
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NOBODY, NobodyEnv, needs_fuse, needs_root, run_capture

LIMIT = 4 * 1024 * 1024

# The user's program: who and where it is, then the seed's mmap writer (a sparse file four
# times the room, filled through a shared mapping): SIGBUS on a kernel filesystem.
PROGRAM = """
import mmap, os, sys
print(os.getuid(), os.getcwd(), flush=True)
size = 4 * int(sys.argv[1])
fd = os.open("m.dat", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, size)
mm = mmap.mmap(fd, size)
for off in range(0, size, 1 << 20):
    mm[off:off + (1 << 20)] = b"y" * (1 << 20)
mm.flush()
print("done")
"""


def _compare(python: str, *args: str, cwd: str | Path | None = None) -> dict[str, Any]:
    r = run_capture([python, "-m", "quotafs", "compare", "--reference", "tmpfs",
                     "--limit", str(LIMIT), "--json", *args], timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stderr
    report: dict[str, Any] = json.loads(r.stdout)
    return report


def _check_program_report(report: dict[str, Any], uid: int) -> None:
    ref = report["reference"]
    assert ref["kind"] == "tmpfs" and ref["size"] == LIMIT
    assert ref["known_differences"] and ref["user_namespace"] is (uid != 0)
    runs = {r["target"]: r for r in report["runs"]}
    assert list(runs) == ["tmpfs", "quotafs", "quotafs-sigbus"]
    who, where = runs["tmpfs"]["stdout_tail"].splitlines()[0].split()
    assert (int(who), where) == (uid, f"{ref['mountpoint']}/run")  # inside, as the caller
    assert runs["tmpfs"]["signal"] == "SIGBUS" and runs["tmpfs"]["used_bytes"] == LIMIT
    assert runs["quotafs-sigbus"]["signal"] == "SIGBUS"  # the ext4-faithful target agrees
    assert runs["quotafs"]["signal"] is None  # plain FUSE: no signal, refused at msync
    assert report["same"] is True
    assert not os.path.exists(f"/proc/{ref['holder_pid']}")  # the namespace is over
    assert not os.path.exists(os.path.dirname(ref["mountpoint"]))


def _check_writers_report(report: dict[str, Any], size: int = LIMIT) -> None:
    assert report["reference"]["kind"] == "tmpfs" and report["quotafs_limit"] == size
    by = {(r["target"], r["writer"]): r for r in report["records"]}
    assert by[("tmpfs", "mmap")]["signal"] == "SIGBUS"
    assert by[("tmpfs", "mmap")]["bytes_acknowledged"] == size
    assert by[("tmpfs", "mmap")]["bytes_on_disk"] == size  # read back without a remount
    assert (by[("tmpfs", "write")]["errno"], by[("tmpfs", "write")]["bytes_on_disk"]) == (
        "ENOSPC", size)
    assert by[("quotafs-sigbus", "mmap")]["signal"] == "SIGBUS"
    assert report["matched"] is True, json.dumps([report["records"], report["verdicts"]], indent=1)
    assert not os.path.exists(f"/proc/{report['reference']['holder_pid']}")


# -- as root ---------------------------------------------------------------------------------

@needs_root
@needs_fuse
def test_root_compares_a_program_with_the_tmpfs_reference(tmp_path: Path) -> None:
    (tmp_path / "prog.py").write_text(PROGRAM)
    report = _compare(sys.executable, "--", sys.executable, str(tmp_path / "prog.py"),
                      str(LIMIT))
    _check_program_report(report, 0)


@needs_root
@needs_fuse
def test_root_compares_the_writers_with_the_tmpfs_reference() -> None:
    report = _compare(sys.executable, "--file-size", str(4 * LIMIT), "--writers",
                      "mmap,write")
    _check_writers_report(report)
    assert report["writers_user"] == "root"


# -- as nobody, with a private fuse device node ----------------------------------------------

# Run by root in the private mount namespace: the device node, then compare as nobody.
INSIDE = """
import os, subprocess, sys
top, python, src = sys.argv[1], sys.argv[2], sys.argv[3]
node = f"{top}/fuse"
os.mknod(node, 0o666 | 0o020000, os.makedev(10, 229))
os.chmod(node, 0o666)
subprocess.run(["mount", "--bind", node, "/dev/fuse"], check=True)
env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": f"{top}/home",
       "XDG_RUNTIME_DIR": f"{top}/run", "TMPDIR": f"{top}/tmp", "PYTHONPATH": src}
r = subprocess.run(["setpriv", "--reuid=NOBODY", "--regid=NOBODY", "--clear-groups",
                    python, "-m", "quotafs", "compare", *sys.argv[4:]],
                   capture_output=True, text=True, timeout=300, env=env, cwd=f"{top}/home")
sys.stderr.write(r.stderr)
print(r.stdout)
sys.exit(r.returncode)
""".replace("NOBODY", str(NOBODY))


def _nobody_compare(env: NobodyEnv, *args: str) -> dict[str, Any]:
    top = Path(tempfile.mkdtemp(prefix="case-", dir=env.top))
    try:
        for sub in ("home", "run", "tmp"):
            (top / sub).mkdir(mode=0o700)
            os.chown(top / sub, NOBODY, NOBODY)
        top.chmod(0o755)
        (top / "inside.py").write_text(INSIDE)
        (top / "prog.py").write_text(PROGRAM)
        (top / "prog.py").chmod(0o644)
        args = tuple(a.replace("{prog}", str(top / "prog.py")) for a in args)
        r = run_capture(["unshare", "--mount", "--propagation", "private", sys.executable,
                         str(top / "inside.py"), str(top), env.python, str(env.src),
                         "--reference", "tmpfs", "--limit", str(LIMIT), "--json", *args],
                        timeout=400)
        assert r.returncode == 0, r.stderr
        report: dict[str, Any] = json.loads(r.stdout)
        # nothing of nobody's left: its temp dir holds no reference directory
        assert not [p for p in (top / "tmp").iterdir() if p.name.startswith("quotafs-")]
        return report
    finally:
        shutil.rmtree(top, ignore_errors=True)


@needs_fuse
def test_nobody_compares_a_program_with_the_tmpfs_reference(nobody_env: NobodyEnv) -> None:
    report = _nobody_compare(nobody_env, "--", nobody_env.python, "{prog}", str(LIMIT))
    _check_program_report(report, NOBODY)


@needs_fuse
def test_nobody_compares_the_writers_with_the_tmpfs_reference(nobody_env: NobodyEnv) -> None:
    # A non-root daemon cannot turn read-ahead off (docs/semantics.md, "The cost of the
    # mode"): its SIGBUS may come up to a 128 KiB window early, which is within compare's
    # 1% at 32M with 64 KiB stores, and is a whole 1 MiB store at 4M (DIFFERS, measured).
    report = _nobody_compare(nobody_env, "--limit", str(8 * LIMIT), "--chunk", "64K",
                             "--file-size", str(32 * LIMIT), "--writers", "mmap,write")
    _check_writers_report(report, 8 * LIMIT)
    assert report["writers_user"] == "nobody"


@needs_root
def test_without_root_the_ext4_reference_is_refused_in_one_line(nobody_env: NobodyEnv) -> None:
    r = run_capture(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                     "env", f"PYTHONPATH={nobody_env.src}", nobody_env.python, "-m", "quotafs",
                     "compare", "--reference", "ext4", "--limit", "4M"], cwd="/")
    assert r.returncode == 6, r.stderr  # ExitCode.PERMISSION
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reference tmpfs needs no root" in lines[0], r.stderr


def _children(pid: int) -> dict[int, bytes]:
    """Our child's own children (pid -> argv[0] and argv[1]), from its /proc task list."""
    out: dict[int, bytes] = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as c:
                        out[int(child)] = b" ".join(c.read().split(b"\0")[:2])
    return out


@needs_root
@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_mid_run_leaves_no_namespace_behind(tmp_path: Path, sig: int) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the tmpfs reference's dir goes
    with subprocess.Popen([sys.executable, "-m", "quotafs", "compare", "--reference", "tmpfs",
                           "--limit", "4M", "--workdir", str(tmp_path), "--", "sleep", "60"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 60
            while True:  # until the program runs on the tmpfs, beside its holder
                kids = _children(proc.pid)
                if b"sleep 60" in kids.values() and b"sleep infinity" in kids.values():
                    break
                assert proc.poll() is None and time.monotonic() < deadline, kids
                time.sleep(0.05)
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == 130
        finally:
            proc.kill()
    assert all(not os.path.exists(f"/proc/{pid}") for pid in kids)  # holder and program
    assert list(tmp_path.iterdir()) == []  # no reference dir, no quotafs scratch dir
