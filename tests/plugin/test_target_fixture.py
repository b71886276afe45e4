"""The quotafs_target fixture: a user's test runs once per target (the ext4 reference,
quotafs, quotafs --mmap-sigbus), each time in a fresh directory on that target."""

from __future__ import annotations

import os
import textwrap

import pytest

from quotafs.testing.plugin import FORCE_NO_LOOP_ENV, tmpfs_unusable_reason
from tests.conftest import needs_fuse
from tests.plugin.test_plugin import STRICT_INI, no_mount_left, run

pytest_plugins = "pytester"

INNER = """
    import errno, mmap, os, signal, subprocess, sys
    import pytest

    STORE = ("import mmap, sys\\n"
             "f = open(sys.argv[1], 'w+b'); f.truncate(16 << 20)\\n"
             "m = mmap.mmap(f.fileno(), 0)\\n"
             "for i in range(16): m[i << 20:(i + 1) << 20] = b'x' * (1 << 20)\\n")

    @pytest.mark.quotafs(limit="4M")
    def test_disk_full(quotafs_target):
        with open(os.path.join(os.path.dirname(__file__), "seen.txt"), "a") as log:
            log.write(f"{quotafs_target.name} {quotafs_target.path}\\n")
        assert os.listdir(quotafs_target.path) == []
        with open(os.path.join(quotafs_target.path, "f"), "wb") as f:
            with pytest.raises(OSError) as caught:
                while True:
                    f.write(b"x" * 65536)
        assert caught.value.errno == errno.ENOSPC
        os.unlink(os.path.join(quotafs_target.path, "f"))
        store = subprocess.run([sys.executable, "-c", STORE,
                                os.path.join(quotafs_target.path, "m")])
        died = store.returncode == -signal.SIGBUS
        assert died == (quotafs_target.name != "quotafs"), quotafs_target.name
"""


def _run_inner(pytester: pytest.Pytester) -> tuple[pytest.RunResult, list[list[str]]]:
    pytester.makeini(STRICT_INI)
    pytester.makepyfile(test_inner=textwrap.dedent(INNER))
    result = run(pytester, "-p", "no:cacheprovider", "-rs", "-v")
    seen = [line.split() for line in (pytester.path / "seen.txt").read_text().splitlines()]
    result.stdout.fnmatch_lines(["*test_disk_full?reference?*", "*test_disk_full?quotafs?*",
                                 "*test_disk_full?quotafs-sigbus?*"])
    paths = [path for _, path in seen]
    assert len(set(paths)) == len(paths) and no_mount_left([os.path.dirname(p) for p in paths])
    return result, seen


@needs_fuse
def test_one_run_per_target(pytester: pytest.Pytester) -> None:
    result, seen = _run_inner(pytester)
    # The reference is the one compare picks: ext4 as root, the rootless tmpfs elsewhere.
    reference = "ext4" if os.geteuid() == 0 else "tmpfs"
    if reference == "tmpfs" and tmpfs_unusable_reason() is not None:
        result.assert_outcomes(passed=2, skipped=1)
        assert [name for name, _ in seen] == ["quotafs", "quotafs-sigbus"]
    else:
        result.assert_outcomes(passed=3)
        assert [name for name, _ in seen] == [reference, "quotafs", "quotafs-sigbus"]


@needs_fuse
def test_the_reference_is_the_tmpfs_where_ext4_cannot_be_built(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    if tmpfs_unusable_reason() is not None:
        pytest.skip(f"no tmpfs reference here: {tmpfs_unusable_reason()}")
    monkeypatch.setenv(FORCE_NO_LOOP_ENV, "1")  # as on a machine without loop devices
    result, seen = _run_inner(pytester)
    result.assert_outcomes(passed=3)
    assert [name for name, _ in seen] == ["tmpfs", "quotafs", "quotafs-sigbus"]
