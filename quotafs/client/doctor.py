"""`quotafs doctor`'s verdicts: from the facts quotafs.client.machine found, per
capability whether it works here and, if not, why and the one thing to change.

Pure: the facts in, the verdicts out. A trial made for real decides "ok"; the other facts
choose the reason and the fix when it failed (or when it could not even be tried)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from quotafs.client.machine import Facts, Trial

MOUNT = "mount as this user"
ALLOW_OTHER = "--allow-other"
EXT4 = "compare with the ext4 reference"
TMPFS = "compare with the tmpfs reference"
SWEEP = "sweep"
CAPABILITIES = (MOUNT, ALLOW_OTHER, EXT4, TMPFS, SWEEP)
DOCS = "docs/environments.md"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None = None
    fix: str | None = None


OK = Verdict(True)
Problem = tuple[str, str]  # (reason, fix)


def verdicts(facts: Facts) -> dict[str, Verdict]:
    mount = _mount(facts)
    return {
        MOUNT: mount,
        ALLOW_OTHER: _needs(mount) or _allow_other(facts),
        # Not root: becoming root comes first, whatever else the mount lacks.
        EXT4: _ext4(facts) if not facts.real_root else _needs(mount) or _ext4(facts),
        TMPFS: _needs(mount) or _tmpfs(facts),
        SWEEP: _needs(mount) or _sweep(facts),
    }


def report(facts: Facts) -> dict[str, Any]:
    """The --json document: {"capabilities": {name: {ok, reason, fix}}, "facts": {...}}."""
    return {"capabilities": {name: dataclasses.asdict(v) for name, v in verdicts(facts).items()},
            "facts": dataclasses.asdict(facts)}


def _needs(mount: Verdict) -> Verdict | None:
    """Every capability mounts quotafs: when that fails, they fail with its fix."""
    if mount.ok:
        return None
    return Verdict(False, f"quotafs cannot mount here ({MOUNT}: NO)", mount.fix)


def _verdict(problem: Problem | None, trial: Trial | None, fallback_fix: str) -> Verdict:
    """The trial decides; a known problem explains it (or stands in for a trial that was
    not made)."""
    if trial is not None and trial.ok:
        return OK
    if problem is not None:
        reason, fix = problem
        if trial is not None and trial.error and trial.error not in reason:
            reason = f"{reason} (tried: {trial.error})"
        return Verdict(False, reason, fix)
    error = trial.error if trial is not None else "not tried"
    return Verdict(False, f"the trial failed: {error}", fallback_fix)


# -- mount as this user -------------------------------------------------------------------

def _mount(f: Facts) -> Verdict:
    trial = f.mount
    if trial is not None and trial.ok and f.unmount is not None and not f.unmount.ok:
        return Verdict(False, f"quotafs mounts, but `quotafs umount` fails: {f.unmount.error}",
                       _unmount_fix(f))
    return _verdict(_mount_problem(f), trial, _fallback(f))


def _mount_problem(f: Facts) -> Problem | None:
    for check in (_python_problem, _temp_problem, _dev_fuse_problem, _privilege_problem,
                  _fusermount_problem, _security_problem):
        found = check(f)
        if found is not None:
            return found
    return None


def _python_problem(f: Facts) -> Problem | None:
    if f.python_packages.ok:
        return None
    return (f"the daemon's Python cannot import pyfuse3 and trio: {f.python_packages.error}",
            "pip install pyfuse3 trio (pyfuse3 builds against libfuse3: "
            "sudo apt-get install libfuse3-dev pkg-config, or dnf install fuse3-devel)")


def _temp_problem(f: Facts) -> Problem | None:
    if f.temp_dir.ok:
        return None
    return (f"no temp directory for the mount point: {f.temp_dir.error}",
            "set TMPDIR to a directory you may write to")


def _dev_fuse_problem(f: Facts) -> Problem | None:
    dev = f.dev_fuse
    if not dev.exists:
        if f.container == "kubernetes":
            return ("/dev/fuse does not exist in this pod",
                    "give the pod /dev/fuse: securityContext privileged: true, or a FUSE "
                    "device plugin's resource (see " + DOCS + ")")
        if f.container is not None:
            return ("/dev/fuse does not exist in this container",
                    "start the container with --device /dev/fuse")
        return "/dev/fuse does not exist", "sudo modprobe fuse"
    if dev.opens.ok:
        return None
    error = dev.opens.error or ""
    reason = f"/dev/fuse ({dev.mode} {dev.owner}) does not open for reading and writing: {error}"
    if error.startswith("EPERM") and f.container is not None:  # the device cgroup says no
        return reason, "start the container with --device /dev/fuse"
    group = (dev.owner or ":").split(":", 1)[1]
    if f.uid == 0 and not f.real_root:
        return reason, ("sudo chmod 0666 /dev/fuse outside this user namespace (root in here "
                        "is your own uid out there)")
    # "nogroup" is also how a user namespace shows ids it does not map: no group to join.
    if group not in ("root", "0", "", "nogroup", "65534"):
        return reason, (f"sudo usermod -aG {group} {f.user} (then log in again), or "
                        "sudo chmod 0666 /dev/fuse")
    return reason, "sudo chmod 0666 /dev/fuse (the mode the fuse3 package's udev rule gives it)"


def _privilege_problem(f: Facts) -> Problem | None:
    if f.uid == 0 and f.cap_sys_admin is False:
        fix = ("start the container with --cap-add SYS_ADMIN" if f.container is not None
               else "run with CAP_SYS_ADMIN (root's mount(2) of FUSE needs it)")
        return "root lacks CAP_SYS_ADMIN, which mounting needs", fix
    return None


def _fusermount_problem(f: Facts) -> Problem | None:
    if f.uid == 0:
        return None  # root mounts with mount(2) itself
    tool = f.fusermount_for_mount
    if tool.path is None:
        return ("a regular user mounts through fusermount3, and there is none (not in "
                f"{f.fusermount_dir}, not on PATH)",
                "sudo apt-get install fuse3 (Fedora: sudo dnf install fuse3)")
    if not tool.setuid_root:
        return (f"{tool.path}, the fusermount3 libfuse runs, is not setuid root: the mount "
                "fails with \"Operation not permitted\"",
                f"sudo chown root:root {tool.path} && sudo chmod 4755 {tool.path}"
                + _path_hint(f, tool.path))
    if tool.nosuid_filesystem:
        return (f"{tool.path} is on a nosuid filesystem: its setuid bit does nothing",
                f"install fuse3 on a filesystem mounted without nosuid (or remount "
                f"{os.path.dirname(tool.path)} without nosuid)")
    if f.no_new_privs:
        return ("this process runs with no_new_privs: fusermount3's setuid bit does nothing",
                "run without no-new-privileges (docker: drop --security-opt "
                "no-new-privileges; systemd: NoNewPrivileges=no)")
    return None


def _path_hint(f: Facts, path: str) -> str:
    if os.path.dirname(path) != f.fusermount_dir:
        return f" (or install fuse3, whose {f.fusermount_dir}/fusermount3 libfuse runs first)"
    return ""


def _unmount_fix(f: Facts) -> str:
    tool = f.fusermount_on_path
    good = f.fusermount_for_mount
    if tool.path is None:
        return "put the directory of fusermount3 on PATH (sudo apt-get install fuse3)"
    if tool.path != good.path and good.setuid_root:
        return (f"put {os.path.dirname(good.path or '')} ahead of "
                f"{os.path.dirname(tool.path)} in PATH (the fusermount3 there is not setuid "
                f"root), or remove {tool.path}")
    return f"sudo chown root:root {tool.path} && sudo chmod 4755 {tool.path}"


def _security_problem(f: Facts) -> Problem | None:
    if f.apparmor is not None and "enforce" in f.apparmor and f.mount is not None \
            and not f.mount.ok:
        return (f"AppArmor confines this process ({f.apparmor}), and its profile may deny "
                "mount", "start the container with --security-opt apparmor:unconfined (or a "
                "profile that allows mount fstype=fuse)")
    return None


def _fallback(f: Facts) -> str:
    if f.container is not None:
        return (f"in {f.container}: --device /dev/fuse --cap-add SYS_ADMIN --security-opt "
                f"apparmor:unconfined (see {DOCS})")
    return f"see {DOCS}"


# -- the others ---------------------------------------------------------------------------

def _allow_other(f: Facts) -> Verdict:
    conf = f.fuse_conf
    problem: Problem | None = None
    if f.uid != 0 and conf.readable and not conf.user_allow_other:
        problem = (f"a regular user may pass allow_other only if {conf.path} has the line "
                   "user_allow_other, and it has not",
                   f"echo user_allow_other | sudo tee -a {conf.path}")
    elif f.uid != 0 and not conf.readable and os.path.exists(conf.path):
        # fusermount3 reads it with the caller's rights (measured with fuse3 3.14): a
        # file only root may read allows nothing.
        problem = (f"{conf.path} cannot be read ({conf.error}), and fusermount3 reads it "
                   "as the calling user", f"sudo chmod 0644 {conf.path}")
    elif f.uid != 0 and not conf.readable:
        problem = (f"there is no {conf.path} with the line user_allow_other",
                   f"echo user_allow_other | sudo tee -a {conf.path}")
    return _verdict(problem, f.allow_other, _fallback(f))


def _ext4(f: Facts) -> Verdict:
    return _verdict(_ext4_problem(f), f.ext4_loop, _ext4_fallback(f))


def _ext4_problem(f: Facts) -> Problem | None:
    if f.uid != 0:
        return ("the ext4 reference needs root: it attaches a loop device and mounts ext4",
                "run it as root (sudo), or use the tmpfs reference: --reference tmpfs")
    if not f.real_root:
        return ("root of a user namespace cannot attach loop devices or mount ext4",
                "run as real root (docker: --privileged), or use --reference tmpfs")
    if not f.loop_control:
        return ("no loop devices here (/dev/loop-control is missing)",
                "start the container with --privileged" if f.container is not None
                else "sudo modprobe loop")
    if f.losetup is None:
        return "losetup is not installed", "sudo apt-get install util-linux"
    if f.mkfs_ext4 is None:
        return "mkfs.ext4 is not installed", "sudo apt-get install e2fsprogs"
    return None


def _ext4_fallback(f: Facts) -> str:
    if f.container is not None:
        return "start the container with --privileged (loop devices and ext4 mounts)"
    return f"see {DOCS}"


def _tmpfs(f: Facts) -> Verdict:
    return _verdict(_tmpfs_problem(f), f.tmpfs_namespace, _tmpfs_fallback(f))


def _tmpfs_problem(f: Facts) -> Problem | None:
    if f.unshare is None:
        return "unshare is not installed", "sudo apt-get install util-linux"
    if f.tmpfs_namespace is not None and f.tmpfs_namespace.ok:
        return None
    if f.uid == 0:
        if f.cap_sys_admin is False:
            return ("root lacks CAP_SYS_ADMIN: no private mount namespace",
                    "start the container with --cap-add SYS_ADMIN")
        return None
    if f.tmpfs_namespace is not None and "--map-user" in (f.tmpfs_namespace.error or ""):
        return ("this unshare has no --map-user (util-linux before 2.38), which runs the "
                "program as your uid inside", "install util-linux 2.38 or later")
    ns = f.user_namespaces
    if ns.max_user_namespaces == 0:
        return ("user namespaces are switched off (user.max_user_namespaces = 0)",
                "sudo sysctl -w user.max_user_namespaces=15000")
    if ns.unprivileged_userns_clone == 0:
        return ("unprivileged user namespaces are switched off "
                "(kernel.unprivileged_userns_clone = 0)",
                "sudo sysctl -w kernel.unprivileged_userns_clone=1")
    if ns.apparmor_restrict_unprivileged_userns == 1:
        return ("AppArmor keeps unprivileged users out of user namespaces "
                "(kernel.apparmor_restrict_unprivileged_userns = 1, Ubuntu 23.10 and later)",
                "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    return None


def _tmpfs_fallback(f: Facts) -> str:
    if f.container is not None and f.seccomp_filtered:
        return ("the container's seccomp profile may refuse unshare: start it with "
                "--security-opt seccomp=unconfined")
    return f"see {DOCS}"


def _sweep(f: Facts) -> Verdict:
    # A sweep is mounts (fine already) and a fresh copy of the starting state per point.
    return _verdict(None, f.temp_dir, "set TMPDIR to a writable directory with room")
