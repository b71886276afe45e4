"""The plugin's tmpfs_reference fixture (ext4_loop's rootless sibling), as a user's suite
uses it: the marker's limit is its size, `.path` takes open/write/ENOSPC from the test's own
process, `.launch_prefix()` runs a program inside the namespace (getcwd works there), a
failing test's report shows it, and the holder is gone after the session. Run as the
caller, and as nobody (pytest and the package copied where nobody can read them, started
with /usr/bin/python3: the project's venv may sit below /root)."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import quotafs
from quotafs.testing import tmpfs_unusable_reason
from quotafs.testing.plugin import FORCE_NO_TMPFS_ENV
from tests.conftest import NOBODY, SYSTEM_PYTHON, run_capture

pytest_plugins = "pytester"

TIMEOUT = 120

needs_tmpfs = pytest.mark.skipif(tmpfs_unusable_reason() is not None,
                                 reason=tmpfs_unusable_reason() or "")

INNER = """
import errno, json, os, subprocess, sys
import pytest
from quotafs.errors import QuotafsError

@pytest.mark.quotafs(limit="2M")
def test_reference(tmpfs_reference):
    ref = tmpfs_reference
    with open(os.path.join(os.environ["RECORD_DIR"], "ref.json"), "w") as f:
        json.dump([ref.holder_pid, ref.path], f)
    assert ref.quotafs_options() == {"limit": 2 << 20, "reserve": 0}
    written = 0
    with pytest.raises(OSError) as info:
        with open(os.path.join(ref.path, "f"), "wb", buffering=0) as f:
            while True:
                written += f.write(b"x" * 65536)
    assert (info.value.errno, written) == (errno.ENOSPC, 2 << 20)
    assert ref.usage()["free"] == 0 and ref.usage()["used"] == 2 << 20
    os.mkdir(os.path.join(ref.path, "w"))
    p = subprocess.run([*ref.launch_prefix(), sys.executable, "-c",
                        "import os; print(os.getcwd(), os.getuid())"],
                       cwd=os.path.join(ref.path, "w"), capture_output=True, text=True)
    assert p.stdout.split() == [ref.inside_path + "/w", str(os.getuid())], p.stderr
    with pytest.raises(QuotafsError, match="the tmpfs reference is a real filesystem"):
        ref.set_limit("4M")
    assert False, "show the report"
"""


def _run_inner(pytester: pytest.Pytester) -> pytest.RunResult:
    pytester.makepyfile(test_inner=textwrap.dedent(INNER))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", timeout=TIMEOUT)


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


@needs_tmpfs
def test_the_fixture_gives_its_size_a_program_inside_and_a_report(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECORD_DIR", str(pytester.path))
    result = _run_inner(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*- tmpfs /proc/*/root/*/mnt -*",
        "used 2.0 MiB of 2.0 MiB (tmpfs size=), inodes used 2 of *; inside the namespace "
        "/*/mnt, holder pid *",
    ])
    assert "AssertionError: show the report" in result.stdout.str()
    pid, _ = (pytester.path / "ref.json").read_text().strip("[]\n").split(", ")
    assert _gone(int(pid))  # the session reaped its holder: the namespace is over


def test_the_fixture_skips_with_the_reason(pytester: pytest.Pytester,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_NO_TMPFS_ENV, "1")
    pytester.makepyfile(test_inner="def test_t(tmpfs_reference):\n    raise AssertionError\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", timeout=TIMEOUT)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *quotafs: no tmpfs reference here: "
                                 f"{FORCE_NO_TMPFS_ENV} is set"])


# -- as nobody -------------------------------------------------------------------------------

_FOR_PYTEST = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py")


@pytest.fixture
def nobody_pytest() -> Iterator[Path]:
    """A directory nobody can read holding quotafs and pytest (with what pytest needs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to become nobody)")
    if not os.access(SYSTEM_PYTHON, os.X_OK) or shutil.which("setpriv") is None:
        pytest.skip(f"needs {SYSTEM_PYTHON} and setpriv")
    top = Path(tempfile.mkdtemp(prefix="quotafs-nobody-"))
    try:
        lib = top / "lib"
        for name in ("quotafs", *_FOR_PYTEST):
            where = Path(importlib.import_module(name).__file__ or "")
            if where.name == "__init__.py":
                shutil.copytree(where.parent, lib / name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                lib.mkdir(exist_ok=True)
                shutil.copy(where, lib / where.name)
        site = Path(pytest.__file__).parents[1]
        for dist in ("pytest", "pluggy", "iniconfig", "packaging", "pygments"):
            for info in site.glob(f"{dist}-*.dist-info"):  # their versions, for the header
                shutil.copytree(info, lib / info.name)
        (top / "t").mkdir()
        (top / "t" / "test_inner.py").write_text(textwrap.dedent(INNER))
        os.chown(top / "t", NOBODY, NOBODY)
        run_capture(["chmod", "-R", "a+rX", str(top)])
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_nobody_s_suite_gets_a_tmpfs_reference(nobody_pytest: Path) -> None:
    top = nobody_pytest
    env = ["env", "-i", f"PYTHONPATH={top / 'lib'}", "PATH=/usr/bin:/bin",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1", f"RECORD_DIR={top / 't'}", f"HOME={top / 't'}"]
    result = run_capture(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *env,
         SYSTEM_PYTHON, "-m", "pytest", "-p", "quotafs.testing.plugin", "-p",
         "no:cacheprovider", "-rs", "test_inner.py"], cwd=top / "t", timeout=TIMEOUT)
    out = result.stdout
    assert result.returncode == 1 and "1 failed" in out, out + result.stderr
    assert "AssertionError: show the report" in out, out  # every check before it held
    assert "- tmpfs /proc/" in out and "used 2.0 MiB of 2.0 MiB (tmpfs size=)" in out
    pid = int((top / "t" / "ref.json").read_text().strip("[]\n").split(", ")[0])
    assert _gone(pid)


def test_the_api_handle_is_public() -> None:
    assert {"TmpfsMount", "tmpfs_reference", "check_tmpfs_reference"} <= set(quotafs.__all__)


@needs_tmpfs
def test_the_api_gives_the_room_and_a_usage_and_ends_with_the_block() -> None:
    with quotafs.tmpfs_reference("1M") as ref:
        assert ref.quotafs_options() == {"limit": 1 << 20, "reserve": 0}
        with open(os.path.join(ref.path, "f"), "wb") as f:
            f.write(b"x" * 4096)
        u = ref.usage()
        assert (u["limit"], u["used"], u["free"], u["available"]) == (
            1 << 20, 4096, (1 << 20) - 4096, (1 << 20) - 4096)
        assert u["inodes_used"] == 1 and u["enospc_count"] is None
        assert ref.is_alive() and ref.events() == [] and ref.pid is None
        pid = ref.holder_pid
    assert not ref.is_alive() and _gone(pid)


def test_the_api_refuses_a_bad_size_in_one_line() -> None:
    from quotafs.errors import ExitCode, QuotafsError
    with pytest.raises(QuotafsError) as info, quotafs.tmpfs_reference("12X"):
        pass
    assert info.value.code == ExitCode.USAGE and "\n" not in str(info.value)
