"""The one unmount-retry loop and the one pair of signal helpers, without a mount: a fake
umount and the test process's own signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from quotafs import interrupts, reap, unmounting
from quotafs.cli.main import main as cli_main
from quotafs.client import lifecycle
from quotafs.errors import ExitCode, QuotafsError

BUSY = QuotafsError("cannot unmount /m: target is busy.", ExitCode.MOUNTPOINT)


class FakeMount:
    """/m stays mounted until `busy_for` polite unmounts have failed as busy; `other`
    makes every polite one fail another way; a lazy one always detaches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, busy_for: int = 0,
                 other: QuotafsError | None = None) -> None:
        self.mounted = True
        self.calls: list[bool] = []
        self.busy_for = busy_for
        self.other = other
        monkeypatch.setattr(unmounting, "find_mount",
                            lambda path: object() if self.mounted else None)
        monkeypatch.setattr(unmounting.time, "sleep", lambda seconds: None)

    def umount(self, path: str, lazy: bool) -> None:
        self.calls.append(lazy)
        if not lazy and self.other is not None:
            raise self.other
        if not lazy and len(self.calls) <= self.busy_for:
            raise BUSY
        self.mounted = False


def test_a_mount_busy_for_a_while_is_unmounted_politely(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMount(monkeypatch, busy_for=3)
    assert unmounting.unmount_retrying("/m", umount=fake.umount) is None
    assert fake.calls == [False, False, False, False]


def test_a_mount_busy_throughout_is_detached_lazily_or_left_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMount(monkeypatch, busy_for=99)
    assert unmounting.unmount_retrying("/m", tries=5, umount=fake.umount) is None
    assert fake.calls == [False] * 5 + [True]
    fake = FakeMount(monkeypatch, busy_for=99)
    assert unmounting.unmount_retrying("/m", lazy=False, umount=fake.umount) == "target is busy"
    assert fake.mounted and fake.calls == [False] * unmounting.BUSY_TRIES


def test_another_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    denied = QuotafsError("cannot unmount /m: not permitted", ExitCode.PERMISSION)
    fake = FakeMount(monkeypatch, other=denied)
    with pytest.raises(QuotafsError) as info:
        unmounting.unmount_retrying("/m", lazy=False, umount=fake.umount)
    assert info.value is denied and fake.calls == [False]
    fake = FakeMount(monkeypatch, other=denied)
    assert unmounting.unmount_retrying("/m", umount=fake.umount) is None
    assert fake.calls == [False, True]


def test_no_tries_is_a_lazy_unmount_and_nothing_mounted_is_nothing_to_do(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMount(monkeypatch)
    assert unmounting.unmount_retrying("/m", tries=0, umount=fake.umount) is None
    assert fake.calls == [True]
    assert unmounting.unmount_retrying("/m", umount=fake.umount) is None
    assert fake.calls == [True]


def test_unmount_failure_marks_busy_for_a_retry() -> None:
    assert unmounting.unmount_failure("/m", "umount: /m: target is busy.\n").code == (
        ExitCode.MOUNTPOINT)
    error = unmounting.unmount_failure("/m", "")
    assert (str(error), error.code) == ("cannot unmount /m: unmount failed", ExitCode.FAILURE)


def test_reap_kills_a_process_that_does_not_exit() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert reap(sleeper, 0.1) == -signal.SIGKILL


# -- signals ------------------------------------------------------------------------------

@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as in a terminal, even when the suite was started
    with SIGINT ignored (a background job of a non-interactive shell inherits SIG_IGN)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c")
def test_a_deferred_signal_is_delivered_after_the_block() -> None:
    seen: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts.signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        seen.append("the block ran to its end")
    assert seen == ["the block ran to its end"]


@pytest.mark.usefixtures("ctrl_c")
def test_a_deferred_signal_is_dropped_without_reraise() -> None:
    with interrupts.signals_deferred(reraise=False):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("ctrl_c")
def test_nested_deferrals_deliver_once_at_the_outer_end() -> None:
    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts.signals_deferred():
        with interrupts.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        steps.append("inner done")
    assert steps == ["inner done"]


def test_sigterm_interrupts_like_ctrl_c_within_the_block() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal 15"), interrupts.sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("argv", [["status", "--help"], ["status", "/nonexistent/quotafs"]])
def test_the_command_line_called_in_process_restores_the_probe_mode(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """main() isolates its probes in a child for itself only: a test (or any program) that
    calls it keeps its in-thread probes, so later status reads stay cheap."""
    assert lifecycle.ISOLATE_PROBES is False
    with contextlib.suppress(SystemExit):
        cli_main(argv)
    capsys.readouterr()
    assert lifecycle.ISOLATE_PROBES is False


@pytest.mark.parametrize("argv", [["events", "--json", "\x00"], ["status", "/tmp/a\x00b"],
                                  ["umount", "\x00"], ["set", "\x00", "--limit", "1M"]])
def test_a_path_with_a_nul_byte_is_one_usage_line(argv: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the CLI fuzzer: os raises ValueError (not OSError) for a NUL in a path,
    which escaped as a traceback. The API's callers (mounted(mountpoint=...)) meet it too."""
    assert cli_main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contains a NUL byte" in err, err
    with pytest.raises(QuotafsError) as info:
        lifecycle.resolve("a\x00")
    assert info.value.code == ExitCode.USAGE
