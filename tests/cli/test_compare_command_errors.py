"""`quotafs compare -- CMD`'s bad input: one line, exit 2, nothing built (no root needed:
every check runs before a reference or a mount is made)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quotafs.errors import ExitCode


def compare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotafs", "compare", "--workdir",
                           str(cwd), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


@pytest.mark.parametrize(("args", "message"), [
    (["--"], "compare --: no command after --"),
    (["--", "./no-such-program"], "compare --: cannot run ./no-such-program: not found"),
    (["--", "no-such-program-anywhere"],
     "compare --: cannot run no-such-program-anywhere: not found"),
    (["--", "./plain-file"], "compare --: cannot run ./plain-file: not executable"),
    (["--targets", "reference,zfs", "--", "true"],
     "unknown target 'zfs': choose from reference, quotafs, quotafs-sigbus"),
    (["--targets", "quotafs,quotafs", "--", "true"], "target 'quotafs' given twice"),
    (["--targets", "", "--", "true"],
     "--targets is empty: choose from reference, quotafs, quotafs-sigbus"),
    (["--expect-same", "--targets", "reference,quotafs", "--", "true"],
     "--expect-same compares the reference with quotafs-sigbus: --targets must name both"),
    (["--writers", "mmap", "--", "true"],
     "--writers is for the built-in writers (compare without --); with -- CMD use "
     "--expect-same and --check CMD"),
    (["--check", "--", "true"],
     "--check without a command is for the built-in writers (compare without --); with "
     "-- CMD use --expect-same and --check CMD"),
    (["--like-ext4", "64M", "--", "true"],
     "compare -- CMD: like-ext4: the quotafs targets get the reference's room: use --limit"),
    (["--mmap-sigbus", "--", "true"],
     "compare -- CMD: mmap-sigbus: the target chooses the mmap mode: --targets "
     "quotafs,quotafs-sigbus"),
    (["--block-size", "3000", "--", "true"], None),
    (["--timeout", "0", "--", "true"], "--timeout must be positive, got 0.0"),
    (["--timeout", "nan", "--", "true"], "--timeout must be a finite number of seconds, got nan"),
    (["--timeout", "inf", "--", "true"], "--timeout must be a finite number of seconds, got inf"),
    (["--as-user", "no-such-user-here", "--", "true"], None),
    (["--block-size", "1024"],
     "--block-size is for compare -- CMD (your own program); the built-in writers take "
     "--writers, --file-size, --chunk"),
    (["--setup", "true"],
     "--setup is for compare -- CMD (your own program); the built-in writers take "
     "--writers, --file-size, --chunk"),
    (["--check", "true"],
     "--check CMD is for compare -- CMD (your own program); the built-in writers take "
     "--writers, --file-size, --chunk"),
    (["true"], "compare: unexpected 'true': your program goes after --, as in: quotafs "
               "compare --limit 16M -- ./my-program"),
])
def test_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str | None) -> None:
    (tmp_path / "plain-file").write_text("not a program")
    result = compare(*args, cwd=tmp_path)
    assert result.returncode == ExitCode.USAGE, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    if message is not None:
        assert lines[0] == f"quotafs: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-file"]


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import quotafs.cli.main"],
                           capture_output=True, timeout=60)
    if os.geteuid() != 0 or probe.returncode != 0:
        pytest.skip("needs root, and an interpreter an unprivileged user can reach")
    return subprocess.run([*NOBODY, sys.executable, "-m", "quotafs", "compare", *args],
                          capture_output=True, text=True, timeout=60, cwd="/")


def test_as_user_needs_root() -> None:
    # PERMISSION, as for the writers' --as-user and sweep's (docs/exit-codes.md)
    result = as_nobody("--as-user", "daemon", "--", "true")
    assert result.returncode == ExitCode.PERMISSION
    assert result.stderr.strip() == ("quotafs: --as-user needs root (it switches to that "
                                     "user); without it the program runs as you")


def test_the_ext4_reference_needs_root() -> None:
    result = as_nobody("--reference", "ext4", "--limit", "2M", "--", "true")
    assert result.returncode == ExitCode.PERMISSION
    assert result.stderr.strip() == ("quotafs: compare needs root: it attaches a loop "
                                     "device and mounts ext4")
