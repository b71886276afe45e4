"""`quotafs doctor` on this machine, for real: as root (everything works here), and as
nobody — on the host, where /dev/fuse is root's, and in a private mount namespace with a
fuse device node of its own and, per case, another fusermount3 or fuse.conf. The
namespace dies with its last process: the host's /dev/fuse, /usr/bin and /etc are never
touched. Every run checks that the doctor's trials left nothing behind in its TMPDIR."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quotafs.client import doctor
from quotafs.reference.tools import find_tool
from tests.conftest import (
    NOBODY,
    NobodyEnv,
    interrupt_when,
    loop_ext4_unusable_reason,
    run_capture,
)

ALL = list(doctor.CAPABILITIES)


def _doctor(*args: str, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotafs", "doctor", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmpdir)})


def _verdicts(report: dict[str, Any]) -> dict[str, tuple[bool, str | None, str | None]]:
    return {name: (v["ok"], v["reason"], v["fix"]) for name, v in report["capabilities"].items()}


needs_root_and_everything = pytest.mark.skipif(
    os.geteuid() != 0 or loop_ext4_unusable_reason() is not None
    or shutil.which("unshare") is None,
    reason=loop_ext4_unusable_reason() or "needs root and unshare")


@needs_root_and_everything
def test_as_root_everything_works_here_and_nothing_is_left(tmp_path: Path) -> None:
    result = _doctor("--json", tmpdir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # the trial daemon's and fusermount3's words are kept
    report = json.loads(result.stdout)
    assert set(report) == {"capabilities", "facts"}
    assert _verdicts(report) == {name: (True, None, None) for name in ALL}
    facts = report["facts"]
    assert facts["uid"] == 0 and facts["real_root"] is True
    for trial in ("mount", "unmount", "allow_other", "ext4_loop", "tmpfs_namespace"):
        assert facts[trial] == {"ok": True, "error": None}, trial
    assert facts["dev_fuse"]["opens"]["ok"] is True
    # Mount point, backing directory, loop-ext4 work directory, tmpfs directory: all gone,
    # and no loop device is left on an image of ours.
    assert os.listdir(tmp_path) == []
    loops = subprocess.run([find_tool("losetup"), "--list", "--noheadings", "--output",
                            "BACK-FILE"], capture_output=True, text=True, timeout=60,
                           check=True)
    assert str(tmp_path) not in loops.stdout


@needs_root_and_everything
def test_the_human_output_says_ok_per_capability(tmp_path: Path) -> None:
    result = _doctor(tmpdir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("quotafs doctor: as root (uid 0)")
    assert lines[1:6] == [f"  ok  {name}" for name in ALL]
    assert lines[6:8] == ["", "facts:"]
    assert any(line.split() == ["trial", "mount", "works"] for line in lines)
    assert os.listdir(tmp_path) == []


@needs_root_and_everything
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_in_the_trial_mount_leaves_nothing(tmp_path: Path, sig: int) -> None:
    # The mount point of the trial mount (the last trial, after the references'): made
    # just before its daemon starts, so the signal lands while it mounts (about half a
    # second). Waiting until it is mounted lost the race to a fast trial now and then.
    result = interrupt_when(
        [sys.executable, "-m", "quotafs", "doctor"],
        lambda: any(p.name.startswith("quotafs-mnt-") for p in tmp_path.iterdir()), sig,
        wait=120, poll=0.005, env={**os.environ, "TMPDIR": str(tmp_path)})
    out, err = result.stdout, result.stderr
    assert result.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1:] == ["quotafs: interrupted"], err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []  # mount point, backing directory: gone, nothing mounted


@pytest.mark.parametrize(("args", "word"), [(["--bogus"], "--bogus"),
                                            (["--json", "extra"], "extra"),
                                            (["--json=yes"], "yes")])
def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                           word: str) -> None:
    result = _doctor(*args, tmpdir=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(("quotafs: error: ", "quotafs doctor: error: "))
    assert word in result.stderr and "Traceback" not in result.stderr


# -- as nobody ----------------------------------------------------------------------------

# Run by root inside the private mount namespace: the case's device node, fusermount3 and
# fuse.conf, then the doctor as nobody, then what is left below the case's directory.
INSIDE = """
import json, os, shutil, subprocess, sys
case = json.loads(sys.argv[1])
top = case["top"]
def run(cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
for old in ("fuse", "fuse.conf", "upper", "work"):  # from an earlier run in this case
    if os.path.isdir(f"{top}/{old}"):
        shutil.rmtree(f"{top}/{old}")
    elif os.path.lexists(f"{top}/{old}"):
        os.unlink(f"{top}/{old}")
if case["fuse_node"]:
    os.mknod(f"{top}/fuse", 0o666 | 0o020000, os.makedev(10, 229))
    os.chmod(f"{top}/fuse", 0o666)
    run(["mount", "--bind", f"{top}/fuse", "/dev/fuse"])
if case["fuse_conf"] is not None:
    with open(f"{top}/fuse.conf", "w") as f:
        f.write(case["fuse_conf"])
    os.chmod(f"{top}/fuse.conf", case["fuse_conf_mode"])
    run(["mount", "--bind", f"{top}/fuse.conf", "/etc/fuse.conf"])
if case["usr_bin"] is not None:  # /usr/bin as an overlay: fusermount3 gone, or not setuid
    upper, work = f"{top}/upper", f"{top}/work"
    os.mkdir(upper); os.mkdir(work)
    if case["usr_bin"] == "missing":
        os.mknod(f"{upper}/fusermount3", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    else:
        shutil.copy("/usr/bin/fusermount3", f"{upper}/fusermount3")
        os.chmod(f"{upper}/fusermount3", 0o755)
    try:
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir=/usr/bin,upperdir={upper},workdir={work}", "/usr/bin"])
    except subprocess.CalledProcessError as exc:
        print(json.dumps({"skip": f"no overlay over /usr/bin here: {exc.stderr.strip()}"}))
        sys.exit(0)
env = {"PATH": case["path"], "HOME": f"{top}/home", "XDG_RUNTIME_DIR": f"{top}/run",
       "TMPDIR": f"{top}/tmp", "PYTHONPATH": case["src"]}
r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    *case["prefix"], case["python"], "-m", "quotafs", *case["argv"]],
                   capture_output=True, text=True, timeout=300, env=env)
with open("/proc/self/mountinfo") as f:
    left = [line.split()[4] for line in f if line.split()[4].startswith(f"{top}/")]
print(json.dumps({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "left": left,
                  "tmp": os.listdir(f"{top}/tmp")}))
""".replace("{NOBODY}", str(NOBODY))


@pytest.fixture
def case_dir(nobody_env: NobodyEnv) -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="doctor-", dir=nobody_env.top))
    for sub in ("home", "run", "tmp"):
        (top / sub).mkdir(mode=0o700)
        os.chown(top / sub, NOBODY, NOBODY)
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _as_nobody(env: NobodyEnv, top: Path, *, namespace: bool = True, fuse_node: bool = True,
               fuse_conf: str | None = None, fuse_conf_mode: int = 0o644,
               usr_bin: str | None = None, path: str = "/usr/bin:/bin",
               prefix: tuple[str, ...] = (),
               argv: tuple[str, ...] = ("doctor", "--json")) -> dict[str, Any]:
    """The doctor's (or another command's) exit status and report as nobody, and what
    it left behind."""
    case = {"top": str(top), "python": env.python, "src": str(env.src), "path": path,
            "fuse_node": fuse_node, "fuse_conf": fuse_conf, "fuse_conf_mode": fuse_conf_mode,
            "usr_bin": usr_bin, "argv": list(argv), "prefix": list(prefix)}
    (top / "inside.py").write_text(INSIDE)
    host_fuse = os.stat("/dev/fuse")
    pre = ["unshare", "--mount", "--propagation", "private"] if namespace else []
    if not namespace:
        assert not (fuse_node or fuse_conf or usr_bin), "those need the namespace"
    result = run_capture([*pre, sys.executable, str(top / "inside.py"), json.dumps(case)],
                         timeout=400)
    now = os.stat("/dev/fuse")
    assert (now.st_ino, now.st_mode) == (host_fuse.st_ino, host_fuse.st_mode)
    assert result.returncode == 0, result.stderr
    got: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"])
    assert "Traceback" not in got["stderr"], got["stderr"]
    assert got["left"] == [] and got["tmp"] == [], got  # no mount, no temp dir left
    if argv == ("doctor", "--json"):
        got["report"] = json.loads(got["stdout"])
    return got


def test_as_nobody_with_a_root_only_dev_fuse(nobody_env: NobodyEnv, case_dir: Path) -> None:
    if os.stat("/dev/fuse").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/fuse is open to everyone here")
    got = _as_nobody(nobody_env, case_dir, namespace=False, fuse_node=False)
    assert got["rc"] == 1
    ok, reason, fix = _verdicts(got["report"])[doctor.MOUNT]
    assert not ok
    assert reason is not None and reason.startswith("/dev/fuse (crw-------")
    assert "EACCES" in reason
    assert fix == "sudo chmod 0666 /dev/fuse (the mode the fuse3 package's udev rule gives it)"
    assert got["report"]["facts"]["mount"] is None  # not tried: it cannot work
    # Every other capability mounts quotafs too: the same fix; ext4 wants root first.
    for name in (doctor.ALLOW_OTHER, doctor.TMPFS, doctor.SWEEP):
        assert _verdicts(got["report"])[name][2] == fix


def test_as_nobody_with_a_usable_fuse_node(nobody_env: NobodyEnv, case_dir: Path) -> None:
    got = _as_nobody(nobody_env, case_dir, fuse_conf="#user_allow_other\n")
    assert got["rc"] == 1  # ext4 needs root, --allow-other needs fuse.conf
    verdicts = _verdicts(got["report"])
    for name in (doctor.MOUNT, doctor.TMPFS, doctor.SWEEP):
        assert verdicts[name] == (True, None, None), name
    ok, reason, fix = verdicts[doctor.ALLOW_OTHER]
    assert not ok and fix == "echo user_allow_other | sudo tee -a /etc/fuse.conf"
    # What fusermount3 itself said, from the trial that was made:
    assert reason is not None and "option allow_other only allowed if 'user_allow_other'" in reason
    assert verdicts[doctor.EXT4] == (
        False, "the ext4 reference needs root: it attaches a loop device and mounts ext4",
        "run it as root (sudo), or use the tmpfs reference: --reference tmpfs")
    facts = got["report"]["facts"]
    assert facts["mount"] == facts["unmount"] == {"ok": True, "error": None}
    assert facts["uid"] == NOBODY


def test_as_root_of_a_user_namespace(nobody_env: NobodyEnv, case_dir: Path) -> None:
    # nobody's own user namespace (as rootless podman makes): root in there mounts FUSE
    # and tmpfs, but no loop device.
    got = _as_nobody(nobody_env, case_dir, prefix=("unshare", "--user", "--map-root-user",
                                                   "--mount"))
    verdicts = _verdicts(got["report"])
    assert [name for name, (ok, _, _) in verdicts.items() if not ok] == [doctor.EXT4]
    assert verdicts[doctor.EXT4][1:] == (
        "root of a user namespace cannot attach loop devices or mount ext4",
        "run as real root (docker: --privileged), or use --reference tmpfs")
    facts = got["report"]["facts"]
    assert (facts["uid"], facts["real_root"]) == (0, False)


def test_as_nobody_with_user_allow_other(nobody_env: NobodyEnv, case_dir: Path) -> None:
    got = _as_nobody(nobody_env, case_dir, fuse_conf="# ours\nuser_allow_other\n")
    verdicts = _verdicts(got["report"])
    assert verdicts[doctor.ALLOW_OTHER] == (True, None, None)
    assert [name for name, (ok, _, _) in verdicts.items() if not ok] == [doctor.EXT4]


def test_as_nobody_with_an_unreadable_fuse_conf(nobody_env: NobodyEnv,
                                                case_dir: Path) -> None:
    # Only root may read it: fusermount3, which reads it with the caller's rights, finds
    # no user_allow_other in it (measured: the trial is refused), and the doctor says why.
    got = _as_nobody(nobody_env, case_dir, fuse_conf="user_allow_other\n",
                     fuse_conf_mode=0o600)
    facts = got["report"]["facts"]
    assert facts["fuse_conf"]["readable"] is False
    assert facts["fuse_conf"]["error"] == "/etc/fuse.conf: Permission denied"
    ok, reason, fix = _verdicts(got["report"])[doctor.ALLOW_OTHER]
    assert not ok and fix == "sudo chmod 0644 /etc/fuse.conf"
    assert reason is not None and reason.startswith(
        "/etc/fuse.conf cannot be read (/etc/fuse.conf: Permission denied)")
    assert "option allow_other only allowed" in reason  # the trial was made, and refused
    human = _as_nobody(nobody_env, case_dir, fuse_conf="user_allow_other\n",
                       fuse_conf_mode=0o600, argv=("doctor",))
    assert human["rc"] == 1
    assert "unreadable: /etc/fuse.conf: Permission denied" in human["stdout"]
    assert "      fix: sudo chmod 0644 /etc/fuse.conf" in human["stdout"].splitlines()


def test_a_non_setuid_fusermount3_first_on_path(nobody_env: NobodyEnv,
                                                case_dir: Path) -> None:
    # The CI-runner story: a copy without the setuid bit ahead of the system's. libfuse
    # mounts with /usr/bin/fusermount3 all the same; `quotafs umount` runs the PATH's.
    fake = case_dir / "bin"
    fake.mkdir()
    shutil.copy("/usr/bin/fusermount3", fake / "fusermount3")
    (fake / "fusermount3").chmod(0o755)
    fake.chmod(0o755)
    got = _as_nobody(nobody_env, case_dir, path=f"{fake}:/usr/bin:/bin")
    assert got["rc"] == 1
    ok, reason, fix = _verdicts(got["report"])[doctor.MOUNT]
    assert not ok
    assert reason is not None and reason.startswith("quotafs mounts, but `quotafs umount` fails")
    assert "Operation not permitted" in reason
    assert fix == (f"put /usr/bin ahead of {fake} in PATH (the fusermount3 there is not "
                   f"setuid root), or remove {fake}/fusermount3")
    on_path = got["report"]["facts"]["fusermount_on_path"]
    assert on_path["path"] == f"{fake}/fusermount3" and on_path["setuid_root"] is False


def test_a_non_setuid_system_fusermount3(nobody_env: NobodyEnv, case_dir: Path) -> None:
    got = _as_nobody(nobody_env, case_dir, usr_bin="not-setuid")
    ok, reason, fix = _verdicts(got["report"])[doctor.MOUNT]
    assert not ok
    assert reason is not None and reason.startswith(
        "/usr/bin/fusermount3, the fusermount3 libfuse runs, is not setuid root")
    assert "fusermount3: mount failed: Operation not permitted" in reason  # the trial's
    assert fix == "sudo chown root:root /usr/bin/fusermount3 && sudo chmod 4755 " \
                  "/usr/bin/fusermount3"


def test_no_fusermount3_at_all(nobody_env: NobodyEnv, case_dir: Path) -> None:
    got = _as_nobody(nobody_env, case_dir, usr_bin="missing")
    assert got["rc"] == 1
    ok, reason, fix = _verdicts(got["report"])[doctor.MOUNT]
    assert not ok and fix == "sudo apt-get install fuse3 (Fedora: sudo dnf install fuse3)"
    assert reason is not None and reason.startswith(
        "a regular user mounts through fusermount3, and there is none")
    assert got["report"]["facts"]["fusermount_for_mount"]["path"] is None


@pytest.mark.parametrize(("usr_bin", "words"), [
    ("missing", "mounting as a regular user needs fusermount3"),
    ("not-setuid", "fuse_session_mount failed"),  # said by the daemon, after libfuse
])
def test_the_mount_error_points_to_the_doctor(nobody_env: NobodyEnv, case_dir: Path,
                                              usr_bin: str, words: str) -> None:
    got = _as_nobody(nobody_env, case_dir, usr_bin=usr_bin,
                     argv=("mount", "--limit", "1M", str(case_dir / "home")))
    assert got["rc"] == 5, got  # ExitCode.NO_FUSE
    lines = got["stderr"].strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert lines[0].endswith("(run `quotafs doctor`)")
