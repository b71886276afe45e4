"""What this machine offers quotafs, found out for `quotafs doctor`: files read (each
from a path the caller may change, so a test can point a check at a file of its own) and
small real trials (open /dev/fuse, a tmpfs in a private namespace, a loop-ext4, a quotafs
mount), each bounded in time and cleaned up. The verdicts are quotafs.client.doctor's."""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import grp
import os
import pwd
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from quotafs.client import api, lifecycle
from quotafs.errors import DOCTOR_HINT, QuotafsError, printable
from quotafs.mountinfo import find_mount
from quotafs.reference import loopext4, tmpfs, tools
from quotafs.users import in_initial_user_namespace

TRIAL_TIMEOUT = 15.0  # seconds for one trial command (unshare, python -c)
CAP_SYS_ADMIN = 21
DEFAULT_FUSERMOUNT_DIR = "/usr/bin"  # libfuse's FUSERMOUNT_DIR on every distribution


@dataclass(frozen=True)
class Paths:
    """The files the checks read; a test points one at a file of its own."""

    dev_fuse: str = "/dev/fuse"
    fuse_conf: str = "/etc/fuse.conf"
    proc_status: str = "/proc/self/status"
    uid_map: str = "/proc/self/uid_map"
    cgroup: str = "/proc/1/cgroup"
    apparmor: tuple[str, ...] = ("/proc/self/attr/apparmor/current", "/proc/self/attr/current")
    dockerenv: str = "/.dockerenv"
    containerenv: str = "/run/.containerenv"
    loop_control: str = "/dev/loop-control"
    sysctl: str = "/proc/sys"
    libfuse: str | None = None  # libfuse3.so.3; None: where the dynamic linker finds it


@dataclass(frozen=True)
class Trial:
    """A thing tried for real: whether it worked, and if not what it said (one line)."""

    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Executable:
    """A program as a check sees it: where, and whether it runs as root for everyone."""

    path: str | None
    setuid_root: bool = False
    nosuid_filesystem: bool = False  # on a nosuid mount the setuid bit does nothing


@dataclass(frozen=True)
class DevFuse:
    exists: bool
    mode: str | None = None  # "crw-------"
    owner: str | None = None  # "root:root"
    opens: Trial = Trial(False, "not tried")


@dataclass(frozen=True)
class FuseConf:
    path: str
    readable: bool
    error: str | None = None
    user_allow_other: bool = False
    mount_max: int | None = None


@dataclass(frozen=True)
class UserNamespaces:
    max_user_namespaces: int | None
    unprivileged_userns_clone: int | None  # Debian's switch; None where the kernel lacks it
    apparmor_restrict_unprivileged_userns: int | None  # Ubuntu 23.10+


@dataclass
class Facts:
    """Everything `quotafs doctor` found; `None` for a trial that was not made (what it
    needs is missing already) and for a file that is absent."""

    uid: int
    user: str
    real_root: bool  # uid 0 of the initial user namespace, not root of a user namespace
    container: str | None
    cap_sys_admin: bool | None
    no_new_privs: bool | None
    seccomp_filtered: bool | None
    apparmor: str | None  # the process's profile; None without AppArmor
    dev_fuse: DevFuse
    fusermount_dir: str  # where libfuse runs fusermount3 from first (FUSERMOUNT_DIR)
    fusermount_for_mount: Executable  # what libfuse runs to mount as a regular user
    fusermount_on_path: Executable  # what `quotafs umount` runs as a regular user
    fuse_conf: FuseConf
    python_packages: Trial  # pyfuse3 and trio importable by this interpreter
    user_namespaces: UserNamespaces
    unshare: str | None
    tmpfs_namespace: Trial | None = None
    loop_control: bool = False
    losetup: str | None = None
    mkfs_ext4: str | None = None
    ext4_loop: Trial | None = None
    temp_dir: Trial = Trial(False, "not tried")
    mount: Trial | None = None
    unmount: Trial | None = None
    allow_other: Trial | None = None


# -- files --------------------------------------------------------------------------------

def read_text(path: str) -> tuple[str | None, str | None]:
    """(text, None), or (None, why not) — absent, unreadable, a directory, undecodable."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", errors="replace"), None
    except OSError as exc:
        return None, f"{printable(path)}: {exc.strerror or exc}"


def parse_fuse_conf(text: str) -> tuple[bool, int | None]:
    """(user_allow_other, mount_max) as fusermount3 reads them: `user_allow_other` on a
    line of its own (blanks around it allowed), `mount_max = N`; `#` starts a comment."""
    allow_other, mount_max = False, None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line == "user_allow_other":
            allow_other = True
        elif (m := re.fullmatch(r"mount_max\s*=\s*(\d+)", line)) is not None:
            mount_max = int(m[1])
    return allow_other, mount_max


def read_fuse_conf(path: str) -> FuseConf:
    text, error = read_text(path)
    if text is None:
        return FuseConf(path, False, error)
    allow_other, mount_max = parse_fuse_conf(text)
    return FuseConf(path, True, None, allow_other, mount_max)


def status_field(text: str, name: str) -> str | None:
    """The value of `Name:` in /proc/PID/status text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def has_capability(cap_eff: str | None, cap: int) -> bool | None:
    try:
        return bool(int(cap_eff or "", 16) >> cap & 1) if cap_eff is not None else None
    except ValueError:
        return None


def container_kind(paths: Paths, environ: dict[str, str]) -> str | None:
    if "KUBERNETES_SERVICE_HOST" in environ:
        return "kubernetes"
    if os.path.exists(paths.containerenv):
        return "podman"
    if os.path.exists(paths.dockerenv):
        return "docker"
    text, _ = read_text(paths.cgroup)
    for word in ("kubepods", "docker", "containerd", "libpod", "lxc"):
        if text is not None and word in text:
            return word
    return None


def apparmor_profile(paths: Paths) -> str | None:
    """The process's AppArmor profile ("docker-default (enforce)"), None without AppArmor
    (the file is missing, or the kernel answers EINVAL: no such LSM)."""
    for path in paths.apparmor:
        text, _ = read_text(path)
        if text is not None and text.strip():
            return text.strip().rstrip("\0")
    return None


def _read_int(path: str) -> int | None:
    text, _ = read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def user_namespaces(paths: Paths) -> UserNamespaces:
    return UserNamespaces(
        _read_int(f"{paths.sysctl}/user/max_user_namespaces"),
        _read_int(f"{paths.sysctl}/kernel/unprivileged_userns_clone"),
        _read_int(f"{paths.sysctl}/kernel/apparmor_restrict_unprivileged_userns"))


# -- /dev/fuse and fusermount3 ------------------------------------------------------------

def dev_fuse(path: str) -> DevFuse:
    try:
        st = os.stat(path)
    except OSError:
        return DevFuse(False)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        opens = Trial(True)
    except OSError as exc:
        opens = Trial(False, f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: "
                             f"{exc.strerror}")
    return DevFuse(True, stat.filemode(st.st_mode), f"{_user(st.st_uid)}:{_group(st.st_gid)}",
                   opens)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def fusermount_dir(libfuse: str | None) -> str:
    """libfuse's FUSERMOUNT_DIR: it runs FUSERMOUNT_DIR/fusermount3 first and only then
    the first fusermount3 on PATH (lib/mount.c, exec_fusermount). The directory is
    compiled in; it is read from the library's own bytes."""
    path = libfuse or find_libfuse()
    if path is None:
        return DEFAULT_FUSERMOUNT_DIR
    try:
        with open(path, "rb") as f:
            data = f.read(16 << 20)
    except OSError:
        return DEFAULT_FUSERMOUNT_DIR
    m = re.search(rb"\0(/[\x21-\x7e]{1,200})/fusermount3\0", data)
    return os.fsdecode(m[1]) if m is not None else DEFAULT_FUSERMOUNT_DIR


def find_libfuse() -> str | None:
    name = ctypes.util.find_library("fuse3")  # "libfuse3.so.3"
    if name is None:
        return None
    for base in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                 "/usr/lib", "/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu"):
        candidate = os.path.join(base, name)
        if os.path.exists(candidate):
            return candidate
    return None


def executable(path: str | None) -> Executable:
    if path is None:
        return Executable(None)
    try:
        st = os.stat(path)
        nosuid = bool(os.statvfs(path).f_flag & os.ST_NOSUID)
    except OSError:
        return Executable(None)
    return Executable(path, st.st_uid == 0 and bool(st.st_mode & stat.S_ISUID), nosuid)


def fusermount_for_mount(directory: str) -> Executable:
    first = os.path.join(directory, "fusermount3")
    if os.access(first, os.X_OK):
        return executable(first)
    return executable(shutil.which("fusermount3"))


# -- trials -------------------------------------------------------------------------------

def run_trial(cmd: list[str], timeout: float = TRIAL_TIMEOUT) -> Trial:
    """Run `cmd`; ok if it exits 0, else its last line of output."""
    try:
        proc = tools.run_tool(cmd, timeout=timeout)
    except QuotafsError as exc:  # it hung
        return Trial(False, str(exc))
    except OSError as exc:
        return Trial(False, f"{cmd[0]}: {exc.strerror}")
    if proc.returncode == 0:
        return Trial(True)
    return Trial(False, printable(tools.last_line(proc)))


def python_packages() -> Trial:
    """Whether the daemon's interpreter (this one) imports pyfuse3 and trio: tried in a
    child, since only quotafs.daemon may load pyfuse3."""
    return run_trial([sys.executable, "-c", "import pyfuse3, trio"])


def tmpfs_namespace() -> Trial:
    """Make the tmpfs reference `compare --reference tmpfs` makes (a 1 MiB tmpfs in a private
    mount namespace, and without root a private user namespace) and write to it from a
    program launched the way compare launches one (as this uid, from a nested user
    namespace). The holder, and so the namespace and its mount, ends with the trial."""
    try:
        with tmpfs.open_tmpfs(1024 * 1024, workdir=tempfile.gettempdir()) as ref:
            return run_trial([*ref.launch(None).prefix, "sh", "-c", 'echo x > "$1/probe"',
                              "sh", ref.inside_path])
    except QuotafsError as exc:
        return Trial(False, str(exc))


def ext4_loop() -> Trial:
    """Build the smallest loop-ext4 reference for real and take it down again."""
    try:
        with loopext4.open_ext4_loop(loopext4.MIN_FREE, workdir=tempfile.gettempdir(),
                                     image_size=4 * loopext4.MIN_FREE):
            return Trial(True)
    except QuotafsError as exc:
        return Trial(False, str(exc))


def temp_dir() -> Trial:
    """A fresh copy of a starting state (sweep) and a temp mount point need a writable
    temp directory."""
    try:
        path = tempfile.mkdtemp(prefix="quotafs-doctor-")
    except OSError as exc:
        return Trial(False, f"cannot make a directory in {tempfile.gettempdir()}: "
                            f"{exc.strerror}")
    os.rmdir(path)
    return Trial(True)


def real_root(uid_map: str) -> bool:
    return os.geteuid() == 0 and in_initial_user_namespace(uid_map)


# -- gathering ----------------------------------------------------------------------------

def gather(paths: Paths = Paths(), trials: bool = True,
           environ: dict[str, str] | None = None) -> Facts:
    """All the facts; with `trials`, also the things tried for real (a mount among them:
    call it from the main thread)."""
    env = dict(os.environ) if environ is None else environ
    status_text, _ = read_text(paths.proc_status)
    status_text = status_text or ""
    directory = fusermount_dir(paths.libfuse)
    is_root = real_root(paths.uid_map)
    unshare = shutil.which("unshare", path=_admin_path())
    facts = Facts(
        uid=os.geteuid(), user=_user(os.geteuid()), real_root=is_root,
        container=container_kind(paths, env),
        cap_sys_admin=has_capability(status_field(status_text, "CapEff"), CAP_SYS_ADMIN),
        no_new_privs=_flag(status_field(status_text, "NoNewPrivs")),
        seccomp_filtered=_seccomp(status_field(status_text, "Seccomp")),
        apparmor=apparmor_profile(paths),
        dev_fuse=dev_fuse(paths.dev_fuse),
        fusermount_dir=directory,
        fusermount_for_mount=fusermount_for_mount(directory),
        fusermount_on_path=executable(shutil.which("fusermount3")),
        fuse_conf=read_fuse_conf(paths.fuse_conf),
        python_packages=python_packages() if trials else Trial(False, "not tried"),
        user_namespaces=user_namespaces(paths),
        unshare=unshare,
        loop_control=os.path.exists(paths.loop_control),
        losetup=shutil.which("losetup", path=_admin_path()),
        mkfs_ext4=shutil.which("mkfs.ext4", path=_admin_path()),
        temp_dir=temp_dir(),
    )
    if trials:
        _try_things(facts)
    return facts


def _admin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), *tools.SBIN])


def _flag(value: str | None) -> bool | None:
    return None if value is None else value == "1"


def _seccomp(value: str | None) -> bool | None:
    return None if value is None else value == "2"  # 2: a filter (docker's default)


def _try_things(facts: Facts) -> None:
    if not facts.temp_dir.ok:
        return  # every trial works in a temp directory
    if facts.unshare is not None:
        facts.tmpfs_namespace = tmpfs_namespace()
    if facts.real_root and facts.losetup and facts.mkfs_ext4 and facts.loop_control:
        facts.ext4_loop = ext4_loop()
    if facts.dev_fuse.opens.ok and facts.python_packages.ok:
        facts.mount, facts.unmount = mount_and_unmount(allow_other=False)
        if facts.mount.ok and facts.unmount.ok:
            facts.allow_other, _ = mount_and_unmount(allow_other=True)


def mount_and_unmount(allow_other: bool) -> tuple[Trial, Trial]:
    """A 1 MiB quotafs on a temp mount point, then the unmount `quotafs umount` does (as a
    regular user: the first fusermount3 on PATH). Whatever fails, the daemon is stopped,
    which detaches its mount, and the mount point and backing directory go."""
    mount: api.QuotaMount | None = None
    unmounted = Trial(True)
    try:  # one try from the start on: an interrupt right after it still closes the mount
        with tempfile.TemporaryFile() as said, _stderr_to(said.fileno()):
            try:
                mount = api.QuotaMount.start("1M", allow_other=allow_other)
            except QuotafsError as exc:
                return _failed(exc, _fuse_said(said)), Trial(False, "not tried: the mount failed")
            except OSError as exc:  # the temp directory went away meanwhile, say
                return Trial(False, f"cannot mount: {exc}"), Trial(False, "not tried")
        try:
            lifecycle.unmount_patiently(mount.path)  # as `quotafs umount` does
        except QuotafsError as exc:
            unmounted = _failed(exc)
    finally:
        if mount is not None:
            if find_mount(mount.path) is not None:
                mount.terminate()  # the daemon unmounts through libfuse's own fusermount3
            with contextlib.suppress(QuotafsError):
                mount.close()
    if find_mount(mount.path) is not None:
        unmounted = Trial(False, f"{mount.path} is still mounted: umount -l {mount.path}")
    return Trial(True), unmounted


@contextlib.contextmanager
def _stderr_to(fd: int) -> Iterator[None]:
    """The daemon, and the fusermount3 libfuse runs, inherit this stderr: what they say
    goes into the trial's result, not onto the doctor's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _fuse_said(said: IO[bytes]) -> str | None:
    """The last line libfuse or fusermount3 wrote ("fusermount3: option allow_other only
    allowed if ..."), the reason behind the daemon's "fuse_session_mount failed"."""
    said.seek(0)
    lines = [line.strip() for line in said.read(1 << 16).decode(errors="replace").splitlines()
             if line.startswith(("fusermount3:", "fuse:"))]
    return lines[-1] if lines else None


def _failed(exc: QuotafsError, detail: str | None = None) -> Trial:
    message = str(exc).removesuffix(" " + DOCTOR_HINT)
    return Trial(False, printable(message if detail is None else f"{message}: {detail}"))
