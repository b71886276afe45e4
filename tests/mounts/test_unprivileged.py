"""A mount by an unprivileged user, through fusermount3, tested for real.

/dev/fuse is root's here (0600), so the test makes a private mount namespace, binds a
0666 fuse device node of its own over /dev/fuse there, and runs quotafs as `nobody` from
/usr/bin/python3 with a venv of its own (the project's venv may sit where nobody cannot
execute it) and a copy of the package. The namespace dies with its last process: the host's
/dev/fuse and mount table are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from quotafs.mountinfo import find_mount
from tests.conftest import NOBODY, NobodyEnv, run_capture

LIMIT = 64 * 1024

# Run by nobody: mount, fill past the limit, df, fusermount3 -u. Prints one JSON line.
SCENARIO = """
import errno, json, os, subprocess, sys, time
from quotafs.client import control, lifecycle
from quotafs.mountinfo import find_mount
mnt, pidfile, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
m = subprocess.run([sys.executable, "-m", "quotafs", "mount", "--limit", str(limit), mnt],
                   capture_output=True, text=True, timeout=120)
out["mount"] = [m.returncode, m.stderr.strip()]
if m.returncode == 0:
    pid = control.read_status(mnt).pid
    with open(pidfile, "w") as f:
        f.write(str(pid))
    out["daemon_uid"] = os.stat(f"/proc/{pid}").st_uid
    fd = os.open(os.path.join(mnt, "f"), os.O_WRONLY | os.O_CREAT, 0o600)
    n = 0
    try:
        while True:
            n += os.write(fd, b"x" * 4096)
    except OSError as e:
        out["write"] = [n, errno.errorcode[e.errno]]
    os.close(fd)
    out["file_uid"] = os.stat(os.path.join(mnt, "f")).st_uid
    df = subprocess.run(["df", "-B1", "--output=size,used,avail", mnt],
                        capture_output=True, text=True, timeout=60)
    out["df"] = df.stdout.split()[-3:]
    u = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True, timeout=60)
    out["fusermount3"] = [u.returncode, u.stderr.strip()]
    out["still_mounted"] = find_mount(mnt) is not None
    out["daemon_exited"] = lifecycle.wait_for_exit(pid, 30)
    # And the same user's `quotafs umount`, which runs fusermount3 -u for it.
    again = subprocess.run([sys.executable, "-m", "quotafs", "mount", "--limit", "1M", mnt],
                           capture_output=True, text=True, timeout=120)
    if again.returncode == 0:
        with open(pidfile, "w") as f:
            f.write(str(control.read_status(mnt).pid))
    u = subprocess.run([sys.executable, "-m", "quotafs", "umount", mnt],
                       capture_output=True, text=True, timeout=120)
    out["quotafs_umount"] = [again.returncode, u.returncode, u.stderr.strip(),
                             find_mount(mnt) is not None]
print(json.dumps(out))
"""

# Run by root inside the private mount namespace: the device node, then the scenario as
# nobody, then what is left in this namespace. Prints the scenario's line and its own.
INSIDE = """
import contextlib, glob, json, os, signal, subprocess, sys
top, python, src, limit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
node, mnt, pidfile = f"{top}/fuse", f"{top}/mnt", f"{top}/run/daemon.pid"
os.mknod(node, 0o666 | 0o020000, os.makedev(10, 229))
os.chmod(node, 0o666)
subprocess.run(["mount", "--bind", node, "/dev/fuse"], check=True)
env = {"PATH": "/usr/bin:/bin", "HOME": top, "XDG_RUNTIME_DIR": f"{top}/run",
       "TMPDIR": f"{top}/tmp", "PYTHONPATH": src}
try:
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                        "--clear-groups", python, f"{top}/scenario.py", mnt, pidfile, limit],
                       capture_output=True, text=True, timeout=300, env=env)
    print(r.stdout.strip() or json.dumps({"scenario_failed": r.returncode,
                                          "stderr": r.stderr}))
finally:
    left = {}
    with open("/proc/self/mountinfo") as f:
        left["mounts"] = [line.split()[4] for line in f if mnt in line]
    # A daemon that outlived its unmount would keep the namespace: the scenario's pid, and
    # the mount record's if the scenario died before it wrote one.
    pids = {int(open(pidfile).read())} if os.path.exists(pidfile) else set()
    for record in glob.glob(f"{top}/run/quotafs/*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids.add(int(json.load(open(record))["pid"]))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            left.setdefault("daemons_killed", []).append(pid)
    print(json.dumps(left))
""".replace("{NOBODY}", str(NOBODY))


def test_nobody_mounts_fills_and_unmounts_with_fusermount3(nobody_env: NobodyEnv) -> None:
    fusermount = shutil.which("fusermount3")
    assert fusermount is not None
    st = os.stat(fusermount)
    assert st.st_uid == 0 and st.st_mode & stat.S_ISUID, (
        f"{fusermount} must be setuid root for users to mount")
    top = Path(tempfile.mkdtemp(prefix="case-", dir=nobody_env.top))
    for sub in ("mnt", "run", "tmp"):
        (top / sub).mkdir(mode=0o700)
        os.chown(top / sub, NOBODY, NOBODY)
    top.chmod(0o755)
    (top / "scenario.py").write_text(SCENARIO)
    (top / "inside.py").write_text(INSIDE)
    host_fuse = os.stat("/dev/fuse")
    try:
        result = run_capture(["unshare", "--mount", "--propagation", "private", sys.executable,
                       str(top / "inside.py"), str(top), nobody_env.python,
                       str(nobody_env.src), str(LIMIT)], timeout=400)
        assert result.returncode == 0, result.stderr
        scenario_line, left_line = result.stdout.strip().splitlines()[-2:]
        got, left = json.loads(scenario_line), json.loads(left_line)
        assert got.get("mount", [None])[0] == 0, got
        assert got["mount"][1].startswith(f"quotafs mounted on {top / 'mnt'} (64.0 KiB")
        assert got["daemon_uid"] == NOBODY
        assert got["write"] == [LIMIT, "ENOSPC"]  # the quota holds for the user's mount
        assert got["file_uid"] == NOBODY
        assert got["df"] == [str(LIMIT), str(LIMIT), "0"]  # df shows the limit, all used
        assert got["fusermount3"] == [0, ""]
        assert got["still_mounted"] is False and got["daemon_exited"] is True
        assert got["quotafs_umount"][:2] == [0, 0], got["quotafs_umount"]
        assert got["quotafs_umount"][3] is False
        assert left == {"mounts": []}  # nothing left in the namespace, no daemon to kill
    finally:
        assert find_mount(str(top / "mnt")) is None  # never on the host
        now = os.stat("/dev/fuse")
        assert (now.st_ino, now.st_mode) == (host_fuse.st_ino, host_fuse.st_mode)
        shutil.rmtree(top, ignore_errors=True)
