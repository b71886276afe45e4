"""`quotafs doctor`'s pure parts: reading the files its checks read (each pointed at a file
of the test's own), and the verdicts given from facts. The checks against this machine
for real are in tests/cli/test_doctor.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from quotafs.client import doctor, machine
from quotafs.client.machine import (
    DevFuse,
    Executable,
    Facts,
    FuseConf,
    Paths,
    Trial,
    UserNamespaces,
)
from quotafs.errors import DOCTOR_HINT, ExitCode, with_doctor_hint
from quotafs.unmounting import unmount_failure

# -- files --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "allow_other", "mount_max"), [
    ("", False, None),
    ("#user_allow_other\n", False, None),  # Debian's shipped file: commented out
    ("user_allow_other\n", True, None),
    ("   user_allow_other  \t\n", True, None),
    ("user_allow_other # so that --allow-other works\n", True, None),
    ("user_allow_other_not\n", False, None),
    ("allow user_allow_other\n", False, None),
    ("mount_max = 1000\nuser_allow_other", True, 1000),
    ("mount_max=7\n", False, 7),
    ("mount_max = lots\n", False, None),
    ("\x00\xff garbage \x01\n\nuser_allow_other\r\n", True, None),
])
def test_fuse_conf_is_read_as_fusermount3_reads_it(text: str, allow_other: bool,
                                                   mount_max: int | None) -> None:
    assert machine.parse_fuse_conf(text) == (allow_other, mount_max)


def test_a_fuse_conf_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    missing = machine.read_fuse_conf(str(tmp_path / "fuse.conf"))
    assert missing == FuseConf(str(tmp_path / "fuse.conf"), False,
                               f"{tmp_path / 'fuse.conf'}: No such file or directory")
    directory = machine.read_fuse_conf(str(tmp_path))
    assert not directory.readable and directory.error == f"{tmp_path}: Is a directory"
    binary = tmp_path / "binary.conf"
    binary.write_bytes(b"\xff\xfe\x00user_allow_other\n\x80user_allow_other\n")
    assert machine.read_fuse_conf(str(binary)).user_allow_other is False  # not on its own line
    binary.write_bytes(b"\xff\xfe\x00\nuser_allow_other\n")
    assert machine.read_fuse_conf(str(binary)).user_allow_other is True


def test_the_status_file_gives_capabilities_and_no_new_privs(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nNoNewPrivs:\t1\nSeccomp:\t2\n"
                      "CapEff:\t00000000a80425fb\n")  # docker's default set: no SYS_ADMIN
    text = status.read_text()
    assert machine.has_capability(machine.status_field(text, "CapEff"), 21) is False
    assert machine.has_capability("000001ffffffffff", 21) is True
    assert machine.has_capability(None, 21) is None
    assert machine.has_capability("zz", 21) is None
    facts = machine.gather(dataclasses.replace(_no_paths(tmp_path), proc_status=str(status)),
                           trials=False)
    assert (facts.cap_sys_admin, facts.no_new_privs, facts.seccomp_filtered) == (
        False, True, True)


def test_containers_are_recognised_from_their_marks(tmp_path: Path) -> None:
    paths = _no_paths(tmp_path)
    assert machine.container_kind(paths, {}) is None
    (tmp_path / "cgroup").write_text("0::/kubepods/besteffort/pod1/abc\n")
    assert machine.container_kind(dataclasses.replace(paths, cgroup=str(tmp_path / "cgroup")),
                                  {}) == "kubepods"
    (tmp_path / "dockerenv").touch()
    assert machine.container_kind(
        dataclasses.replace(paths, dockerenv=str(tmp_path / "dockerenv")), {}) == "docker"
    assert machine.container_kind(paths, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "kubernetes"


def test_apparmor_and_user_namespace_switches(tmp_path: Path) -> None:
    (tmp_path / "current").write_text("docker-default (enforce)\n")
    paths = dataclasses.replace(_no_paths(tmp_path), sysctl=str(tmp_path / "sys"),
                                apparmor=(str(tmp_path / "nothing"), str(tmp_path / "current")))
    assert machine.apparmor_profile(paths) == "docker-default (enforce)"
    assert machine.apparmor_profile(_no_paths(tmp_path)) is None
    (tmp_path / "sys" / "user").mkdir(parents=True)
    (tmp_path / "sys" / "kernel").mkdir()
    (tmp_path / "sys" / "user" / "max_user_namespaces").write_text("0\n")
    (tmp_path / "sys" / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("1\n")
    (tmp_path / "sys" / "kernel" / "unprivileged_userns_clone").write_text("garbage\n")
    assert machine.user_namespaces(paths) == UserNamespaces(0, None, 1)


def test_libfuse_says_where_it_runs_fusermount3_from(tmp_path: Path) -> None:
    lib = tmp_path / "libfuse3.so.3"
    lib.write_bytes(b"\x7fELF\0junk\0/opt/fuse/bin/fusermount3\0fuse: failed to exec\0")
    assert machine.fusermount_dir(str(lib)) == "/opt/fuse/bin"
    lib.write_bytes(b"\x7fELF\0nothing here\0")
    assert machine.fusermount_dir(str(lib)) == "/usr/bin"
    assert machine.fusermount_dir(str(tmp_path / "missing.so")) == "/usr/bin"


def test_this_machines_libfuse_runs_the_system_fusermount3() -> None:
    # libfuse 3.14 from Debian: FUSERMOUNT_DIR is /usr/bin (read from the library itself).
    if machine.find_libfuse() is None:
        pytest.skip("no libfuse3 here")
    assert machine.fusermount_dir(None) == "/usr/bin"


def test_an_executable_is_setuid_root_only_with_both(tmp_path: Path) -> None:
    plain = tmp_path / "fusermount3"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o755)
    assert machine.executable(str(plain)).setuid_root is False
    plain.chmod(0o4755)
    assert machine.executable(str(plain)).setuid_root is (os.geteuid() == 0)  # owner: us
    assert machine.executable(str(tmp_path / "none")) == Executable(None)


def _no_paths(tmp_path: Path) -> Paths:
    """Every file of the checks pointed at a path that does not exist."""
    gone = str(tmp_path / "absent")
    return Paths(dev_fuse=gone, fuse_conf=gone, proc_status=gone, uid_map=gone, cgroup=gone,
                 apparmor=(gone,), dockerenv=gone, containerenv=gone, loop_control=gone,
                 sysctl=gone, libfuse=gone)


# -- verdicts -----------------------------------------------------------------------------

SETUID = Executable("/usr/bin/fusermount3", setuid_root=True)
WORKS = Trial(True)


def _user_facts(**changes: object) -> Facts:
    """A regular user on a laptop where everything works."""
    facts = Facts(
        uid=1000, user="ann", real_root=False, container=None, cap_sys_admin=False,
        no_new_privs=False, seccomp_filtered=False, apparmor=None,
        dev_fuse=DevFuse(True, "crw-rw-rw-", "root:root", WORKS), fusermount_dir="/usr/bin",
        fusermount_for_mount=SETUID, fusermount_on_path=SETUID,
        fuse_conf=FuseConf("/etc/fuse.conf", True, None, True),
        python_packages=WORKS, user_namespaces=UserNamespaces(15000, None, None),
        unshare="/usr/bin/unshare", tmpfs_namespace=WORKS, loop_control=True,
        losetup="/usr/sbin/losetup", mkfs_ext4="/usr/sbin/mkfs.ext4", ext4_loop=None,
        temp_dir=WORKS, mount=WORKS, unmount=WORKS, allow_other=WORKS)
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def _root_facts(**changes: object) -> Facts:
    root: dict[str, object] = {"uid": 0, "user": "root", "real_root": True,
                               "cap_sys_admin": True, "ext4_loop": WORKS}
    return _user_facts(**{**root, **changes})


def test_everything_works_for_root_with_everything() -> None:
    assert all(v == doctor.OK for v in doctor.verdicts(_root_facts()).values())
    assert list(doctor.verdicts(_root_facts())) == list(doctor.CAPABILITIES)


def test_a_regular_user_is_told_to_become_root_for_ext4_only() -> None:
    verdicts = doctor.verdicts(_user_facts())
    assert [n for n, v in verdicts.items() if not v.ok] == [doctor.EXT4]
    assert verdicts[doctor.EXT4].fix == (
        "run it as root (sudo), or use the tmpfs reference: --reference tmpfs")


def test_a_failed_mount_fails_everything_with_its_fix() -> None:
    facts = _user_facts(dev_fuse=DevFuse(True, "crw-rw----", "root:fuse",
                                         Trial(False, "EACCES: Permission denied")),
                        mount=None, unmount=None, allow_other=None)
    verdicts = doctor.verdicts(facts)
    fix = "sudo usermod -aG fuse ann (then log in again), or sudo chmod 0666 /dev/fuse"
    assert verdicts[doctor.MOUNT].fix == fix
    for name in (doctor.ALLOW_OTHER, doctor.TMPFS, doctor.SWEEP):
        assert verdicts[name] == doctor.Verdict(
            False, "quotafs cannot mount here (mount as this user: NO)", fix)


@pytest.mark.parametrize(("changes", "fix"), [
    ({"dev_fuse": DevFuse(False), "container": "docker", "mount": None},
     "start the container with --device /dev/fuse"),
    ({"dev_fuse": DevFuse(False), "mount": None}, "sudo modprobe fuse"),
    ({"dev_fuse": DevFuse(True, "crw-rw-rw-", "root:root", Trial(False, "EPERM: Operation "
                                                                  "not permitted")),
      "container": "docker", "mount": None}, "start the container with --device /dev/fuse"),
    ({"no_new_privs": True, "mount": Trial(False, "fusermount3: mount failed: Operation not "
                                                  "permitted")},
     "run without no-new-privileges (docker: drop --security-opt no-new-privileges; "
     "systemd: NoNewPrivileges=no)"),
    ({"fusermount_for_mount": Executable("/usr/bin/fusermount3", nosuid_filesystem=True,
                                         setuid_root=True), "mount": Trial(False, "x")},
     "install fuse3 on a filesystem mounted without nosuid (or remount /usr/bin without "
     "nosuid)"),
    ({"python_packages": Trial(False, "ModuleNotFoundError: No module named 'pyfuse3'"),
      "mount": None},
     "pip install pyfuse3 trio (pyfuse3 builds against libfuse3: sudo apt-get install "
     "libfuse3-dev pkg-config, or dnf install fuse3-devel)"),
    ({"apparmor": "docker-default (enforce)", "container": "docker",
      "mount": Trial(False, "fuse_session_mount failed")},
     "start the container with --security-opt apparmor:unconfined (or a profile that allows "
     "mount fstype=fuse)"),
])
def test_the_mount_fix_follows_the_cause(changes: dict[str, object], fix: str) -> None:
    verdict = doctor.verdicts(_user_facts(**changes))[doctor.MOUNT]
    assert not verdict.ok and verdict.fix == fix


def test_root_of_a_user_namespace() -> None:
    facts = _user_facts(uid=0, user="root", real_root=False, cap_sys_admin=True,
                        dev_fuse=DevFuse(True, "crw-------", "nobody:nogroup",
                                         Trial(False, "EACCES: Permission denied")),
                        mount=None, unmount=None, allow_other=None)
    verdicts = doctor.verdicts(facts)
    assert verdicts[doctor.MOUNT].fix == (
        "sudo chmod 0666 /dev/fuse outside this user namespace (root in here is your own uid "
        "out there)")
    assert verdicts[doctor.EXT4].fix == (
        "run as real root (docker: --privileged), or use --reference tmpfs")


def test_root_without_cap_sys_admin_in_docker() -> None:
    facts = _root_facts(cap_sys_admin=False, container="docker",
                        mount=Trial(False, "fuse_session_mount failed"),
                        tmpfs_namespace=Trial(False, "unshare: Operation not permitted"))
    verdicts = doctor.verdicts(facts)
    assert verdicts[doctor.MOUNT].fix == "start the container with --cap-add SYS_ADMIN"
    assert "(tried: fuse_session_mount failed)" in (verdicts[doctor.MOUNT].reason or "")


@pytest.mark.parametrize(("namespaces", "fix"), [
    (UserNamespaces(0, None, None), "sudo sysctl -w user.max_user_namespaces=15000"),
    (UserNamespaces(15000, 0, None), "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
    (UserNamespaces(15000, None, 1),
     "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
])
def test_the_tmpfs_reference_fix_names_the_switch(namespaces: UserNamespaces, fix: str) -> None:
    facts = _user_facts(user_namespaces=namespaces,
                        tmpfs_namespace=Trial(False, "unshare: write failed /proc/self/uid_map"))
    verdict = doctor.verdicts(facts)[doctor.TMPFS]
    assert not verdict.ok and verdict.fix == fix


def test_an_old_unshare_is_named() -> None:
    facts = _user_facts(tmpfs_namespace=Trial(False, "unshare: unrecognized option "
                                                     "'--map-user=1000'"))
    assert doctor.verdicts(facts)[doctor.TMPFS].fix == "install util-linux 2.38 or later"


def test_a_trial_decides_over_a_switch_that_looks_off() -> None:
    # A sysctl read as "restricted" while the namespace was made all the same: it works.
    facts = _user_facts(user_namespaces=UserNamespaces(15000, None, 1))
    assert doctor.verdicts(facts)[doctor.TMPFS].ok


def test_allow_other_needs_user_allow_other_for_a_regular_user_only() -> None:
    refused = Trial(False, "fusermount3: option allow_other only allowed if "
                           "'user_allow_other' is set in /etc/fuse.conf")
    conf = FuseConf("/etc/fuse.conf", True, None, False)
    verdict = doctor.verdicts(_user_facts(fuse_conf=conf, allow_other=refused))[
        doctor.ALLOW_OTHER]
    assert verdict.fix == "echo user_allow_other | sudo tee -a /etc/fuse.conf"
    assert verdict.reason is not None and refused.error in verdict.reason
    unreadable = FuseConf("/etc/fuse.conf", False, "/etc/fuse.conf: Permission denied")
    verdict = doctor.verdicts(_user_facts(fuse_conf=unreadable, allow_other=refused))[
        doctor.ALLOW_OTHER]
    if os.path.exists("/etc/fuse.conf"):
        assert verdict.fix == "sudo chmod 0644 /etc/fuse.conf"
    missing = FuseConf("/nonexistent/fuse.conf", False, "No such file or directory")
    verdict = doctor.verdicts(_user_facts(fuse_conf=missing, allow_other=refused))[
        doctor.ALLOW_OTHER]
    assert verdict.fix == "echo user_allow_other | sudo tee -a /nonexistent/fuse.conf"
    assert doctor.verdicts(_root_facts(fuse_conf=conf))[doctor.ALLOW_OTHER].ok


def test_ext4_for_root_of_a_user_namespace_and_without_loop_devices() -> None:
    verdict = doctor.verdicts(_root_facts(real_root=False, ext4_loop=None))[doctor.EXT4]
    assert verdict.fix == "run as real root (docker: --privileged), or use --reference tmpfs"
    verdict = doctor.verdicts(_root_facts(loop_control=False, container="docker",
                                          ext4_loop=None))[doctor.EXT4]
    assert verdict.fix == "start the container with --privileged"
    verdict = doctor.verdicts(_root_facts(mkfs_ext4=None, ext4_loop=None))[doctor.EXT4]
    assert verdict.fix == "sudo apt-get install e2fsprogs"


def test_the_json_report_has_the_documented_shape() -> None:
    report = doctor.report(_user_facts())
    assert set(report) == {"capabilities", "facts"}
    assert list(report["capabilities"]) == list(doctor.CAPABILITIES)
    for verdict in report["capabilities"].values():
        assert set(verdict) == {"ok", "reason", "fix"}
    assert report["facts"]["dev_fuse"]["opens"] == {"ok": True, "error": None}


# -- the errors that point to the doctor --------------------------------------------------

def test_a_refused_fusermount3_unmount_points_to_the_doctor() -> None:
    refused = unmount_failure("/m", "fusermount3: failed to unmount /m: Operation not "
                                    "permitted\n")
    assert str(refused) == ("cannot unmount /m: fusermount3: failed to unmount /m: Operation "
                            "not permitted (run `quotafs doctor`)")
    assert refused.code == ExitCode.PERMISSION
    # Another user's mount is no matter of the machine: no pointer.
    other = unmount_failure("/m", "fusermount3: entry for /m not found in /etc/mtab\n")
    assert not str(other).endswith(DOCTOR_HINT)


def test_the_hint_is_added_once() -> None:
    once = with_doctor_hint("cannot open /dev/fuse: Permission denied")
    assert once == "cannot open /dev/fuse: Permission denied (run `quotafs doctor`)"
    assert with_doctor_hint(once) == once
