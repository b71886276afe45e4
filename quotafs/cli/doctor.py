"""`quotafs doctor`: what works on this machine (mount, --allow-other, compare with either
reference, sweep), and for what does not, the one thing to change. Exit 0 when all works,
1 when something does not."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from quotafs.errors import ExitCode
from quotafs.interrupts import sigterm_as_interrupt

if TYPE_CHECKING:
    from quotafs.client import doctor
    from quotafs.client.machine import Executable, Facts, Trial


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor", help="what works here (mount, --allow-other, compare, sweep) and what to "
                       "change",
        description="Check this machine for quotafs: per capability, whether it works here "
                    "(tried for real: a mount, a tmpfs in a namespace, a loop-ext4, each "
                    "cleaned up) and if not, the one thing to change. Exit status 0 when "
                    "everything works, 1 when something does not.")
    p.add_argument("--json", action="store_true",
                   help='machine-readable: {"capabilities": {name: {"ok", "reason", "fix"}}, '
                        '"facts": {...}}')
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from quotafs.client import doctor, machine  # here: the API and references, ~50 ms

    with sigterm_as_interrupt():  # a SIGTERM still runs the trials' cleanup
        facts = machine.gather()
    verdicts = doctor.verdicts(facts)
    if args.json:
        print(json.dumps(doctor.report(facts), indent=2))
    else:
        print("\n".join(lines(facts, verdicts)))
    return int(ExitCode.OK if all(v.ok for v in verdicts.values()) else ExitCode.FAILURE)


def lines(facts: Facts, verdicts: dict[str, doctor.Verdict]) -> list[str]:
    who = facts.user + (" of a user namespace" if facts.uid == 0 and not facts.real_root
                        else "")
    out = [f"quotafs doctor: as {who} (uid {facts.uid})"
           + ("" if facts.container is None else f", in a container ({facts.container})")]
    for name, verdict in verdicts.items():
        if verdict.ok:
            out.append(f"  ok  {name}")
        else:
            out += [f"  NO  {name}: {verdict.reason}", f"      fix: {verdict.fix}"]
    return [*out, "", "facts:", *(f"  {k:<24}{v}" for k, v in fact_lines(facts))]


def fact_lines(f: Facts) -> list[tuple[str, str]]:
    dev = f.dev_fuse
    ns = f.user_namespaces
    conf = f.fuse_conf
    return [
        ("root", "yes" if f.real_root else ("root of a user namespace" if f.uid == 0 else "no")),
        ("container", f.container or "none found"),
        ("CAP_SYS_ADMIN", _yes(f.cap_sys_admin)),
        ("no_new_privs", _yes(f.no_new_privs)),
        ("seccomp filter", _yes(f.seccomp_filtered)),
        ("AppArmor", f.apparmor or "none"),
        ("/dev/fuse", f"{dev.mode} {dev.owner}, {_trial(dev.opens, 'opens')}" if dev.exists
         else "missing"),
        ("fusermount3 (mount)", f"{_exe(f.fusermount_for_mount)} (libfuse runs "
                                f"{f.fusermount_dir}/fusermount3, else the first on PATH)"),
        ("fusermount3 (umount)", f"{_exe(f.fusermount_on_path)} (the first on PATH)"),
        (conf.path, ("user_allow_other " + ("set" if conf.user_allow_other else "not set"))
         if conf.readable else f"unreadable: {conf.error}"),
        ("pyfuse3 and trio", _trial(f.python_packages, "importable")),
        ("user namespaces", f"max {_num(ns.max_user_namespaces)}, "
                            f"unprivileged_userns_clone {_num(ns.unprivileged_userns_clone)}, "
                            "apparmor_restrict_unprivileged_userns "
                            f"{_num(ns.apparmor_restrict_unprivileged_userns)}"),
        ("tmpfs in a namespace", _trial(f.tmpfs_namespace, "works")),
        ("loop devices", ("/dev/loop-control" if f.loop_control else "no /dev/loop-control")
         + f", losetup {f.losetup or 'missing'}, mkfs.ext4 {f.mkfs_ext4 or 'missing'}"),
        ("loop-ext4 trial", _trial(f.ext4_loop, "works")),
        ("temp directory", _trial(f.temp_dir, "writable")),
        ("trial mount", _trial(f.mount, "works")),
        ("trial unmount", _trial(f.unmount, "works")),
        ("trial --allow-other", _trial(f.allow_other, "works")),
    ]


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _trial(trial: Trial | None, good: str) -> str:
    if trial is None:
        return "not tried"
    return good if trial.ok else f"NO: {trial.error}"


def _exe(tool: Executable) -> str:
    if tool.path is None:
        return "none"
    return tool.path + (", setuid root" if tool.setuid_root else ", NOT setuid root") + (
        ", on a nosuid filesystem" if tool.nosuid_filesystem else "")
