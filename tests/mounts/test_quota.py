"""The quota on real mounts: where ENOSPC lands, what df says, what costs and what is free."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from tests.conftest import MountFactory
from tests.differential.machinery import wait_until

MiB = 1024 * 1024
BLOCK = 4096


def fill(path: str, chunk: int = BLOCK) -> tuple[int, int]:
    """Write `chunk`-sized writes until an error; return (bytes accepted, errno)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    try:
        while True:
            try:
                total += os.write(fd, b"x" * chunk)
            except OSError as exc:
                return total, exc.errno or 0
    finally:
        os.close(fd)


def test_enospc_lands_at_the_limit_to_the_block(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    written, err = fill(os.path.join(m.path, "f"))
    assert err == errno.ENOSPC
    assert written == MiB
    assert m.usage()["used"] == MiB
    assert os.path.getsize(os.path.join(m.backing, "f")) == MiB


def test_block_accounting_charges_whole_blocks(mount_factory: MountFactory) -> None:
    m = mount_factory("64K")
    for i in range(16):  # 16 one-byte files cost a block each: 64K
        with open(os.path.join(m.path, f"f{i}"), "wb") as f:
            f.write(b"x")
    with pytest.raises(OSError) as exc, open(os.path.join(m.path, "g"), "wb") as f:
        f.write(b"x")
    assert exc.value.errno == errno.ENOSPC


def test_apparent_accounting_charges_bytes(mount_factory: MountFactory) -> None:
    m = mount_factory("10000", accounting="apparent")
    for i in range(10):
        with open(os.path.join(m.path, f"f{i}"), "wb") as f:
            f.write(b"x" * 1000)
    assert m.usage()["used"] == 10000
    written, err = fill(os.path.join(m.path, "g"), 100)
    assert (written, err) == (0, errno.ENOSPC)


def test_df_reports_the_quota(mount_factory: MountFactory) -> None:
    m = mount_factory("8M")
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(b"y" * (3 * MiB + 1))
    st = os.statvfs(m.path)
    assert st.f_frsize == BLOCK
    assert st.f_blocks * st.f_frsize == 8 * MiB
    used = 3 * MiB + BLOCK
    assert st.f_bfree * st.f_frsize == 8 * MiB - used
    assert st.f_bavail == st.f_bfree


def test_write_at_the_boundary_stores_whole_requests_then_enospc(
        mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    fd = os.open(os.path.join(m.path, "f"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        first = MiB - 6000  # 255 blocks, the last one partly filled; one block stays free
        assert os.write(fd, b"a" * first) == first
        # The kernel sends the rest of the partly written page 254 as a request of its
        # own (1904 bytes, no new block), then pages 255-256, which need two new blocks
        # where one is free: refused whole. write(2) returns what was stored.
        assert os.write(fd, b"b" * 8192) == 1904
        with pytest.raises(OSError) as exc:
            os.write(fd, b"c" * 8192)
        assert exc.value.errno == errno.ENOSPC
        assert os.write(fd, b"d" * BLOCK) == BLOCK
        with pytest.raises(OSError) as exc:
            os.write(fd, b"e")
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with open(os.path.join(m.backing, "f"), "rb") as f:
        assert f.read() == b"a" * first + b"b" * 1904 + b"d" * BLOCK


def test_overwrite_in_place_when_full(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    path = os.path.join(m.path, "f")
    fill(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"z" * 65536, 4096) == 65536  # allocated blocks: no new quota
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"z", MiB)  # a new block past EOF: refused
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with open(os.path.join(m.backing, "f"), "rb") as f:
        f.seek(4096)
        assert f.read(65536) == b"z" * 65536


def test_sparse_files_cost_only_their_data(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    path = os.path.join(m.path, "sparse")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 1 << 30)
        assert m.usage()["used"] == 0
        os.pwrite(fd, b"d" * 10, 512 * MiB + 100)
        assert m.usage()["used"] == BLOCK
        # a write into an existing partly written block costs nothing more
        os.pwrite(fd, b"e" * 10, 512 * MiB + 2000)
        assert m.usage()["used"] == BLOCK
        # holes still fill up to the limit, block by block
        total = 0
        offset = 0
        with pytest.raises(OSError) as exc:
            while True:
                total += os.pwrite(fd, b"f" * BLOCK, offset)
                offset += 2 * BLOCK  # every other block: sparse, each write a new block
        assert exc.value.errno == errno.ENOSPC
        assert total == MiB - BLOCK
    finally:
        os.close(fd)
    assert m.usage()["used"] == MiB


def test_hard_links_count_once(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    a, b = os.path.join(m.path, "a"), os.path.join(m.path, "b")
    with open(a, "wb") as f:
        f.write(b"x" * 100_000)
    used = m.usage()["used"]
    assert used == 25 * BLOCK
    os.link(a, b)
    assert m.usage()["used"] == used
    assert m.usage()["inodes_used"] == 1
    assert os.stat(a).st_ino == os.stat(b).st_ino
    os.unlink(a)
    assert m.usage()["used"] == used
    os.unlink(b)
    assert m.usage()["used"] == 0
    assert m.usage()["inodes_used"] == 0


def test_unlinked_open_file_keeps_its_space_until_last_close(
        mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"q" * 200_000)
        os.unlink(path)
        assert m.usage()["used"] == 49 * BLOCK
        os.write(fd, b"r" * 10_000)  # still writable, still charged
        assert m.usage()["used"] == 52 * BLOCK
        assert os.pread(fd, 3, 199_999) == b"qrr"
    finally:
        os.close(fd)
    # RELEASE is asynchronous: close(2) returns before the daemon has seen it.
    assert wait_until(lambda: m.usage()["used"] == 0, timeout=10), m.usage()


def test_truncate_and_unlink_give_space_back_at_once(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    path = os.path.join(m.path, "f")
    fill(path)
    os.truncate(path, 100_000)
    assert m.usage()["used"] == 25 * BLOCK
    written, err = fill(os.path.join(m.path, "g"))
    assert (written, err) == (MiB - 25 * BLOCK, errno.ENOSPC)
    os.unlink(os.path.join(m.path, "g"))
    assert m.usage()["used"] == 25 * BLOCK
    with open(path, "r+b") as f:  # O_TRUNC through open frees it all
        f.truncate(0)
    assert m.usage()["used"] == 0


def test_directories_and_long_symlinks_cost_a_block(mount_factory: MountFactory) -> None:
    m = mount_factory("16K")
    os.mkdir(os.path.join(m.path, "d1"))
    os.symlink("x" * 59, os.path.join(m.path, "short"))  # fits in the inode: free
    os.symlink("y" * 60, os.path.join(m.path, "long"))
    assert m.usage()["used"] == 2 * BLOCK
    os.mkdir(os.path.join(m.path, "d2"))
    os.mkdir(os.path.join(m.path, "d3"))
    with pytest.raises(OSError) as exc:
        os.mkdir(os.path.join(m.path, "d4"))
    assert exc.value.errno == errno.ENOSPC
    os.rmdir(os.path.join(m.path, "d1"))
    os.mkdir(os.path.join(m.path, "d4"))
    assert sorted(os.listdir(m.path)) == ["d2", "d3", "d4", "long", "short"]


def test_existing_content_counts_at_mount(mount_factory: MountFactory, tmp_path: str) -> None:
    backing = os.path.join(tmp_path, "backing")
    os.makedirs(os.path.join(backing, "sub"))
    with open(os.path.join(backing, "sub", "data"), "wb") as f:
        f.write(b"x" * 300_000)
    os.link(os.path.join(backing, "sub", "data"), os.path.join(backing, "again"))
    with open(os.path.join(backing, "holey"), "wb") as f:
        f.truncate(50 * MiB)
        f.seek(10 * MiB)
        f.write(b"h")
    m = mount_factory("1M", backing=backing)
    usage = m.usage()
    assert usage["used"] == BLOCK + 74 * BLOCK + BLOCK  # sub/, data (once), one hole block
    assert usage["inodes_used"] == 3
    written, _ = fill(os.path.join(m.path, "more"))
    assert written == MiB - usage["used"]


def test_inode_limit(mount_factory: MountFactory) -> None:
    m = mount_factory("1M", inodes=3)
    open(os.path.join(m.path, "a"), "w").close()
    os.mkdir(os.path.join(m.path, "b"))
    os.symlink("a", os.path.join(m.path, "c"))
    for make in (lambda p: open(p, "w").close(), os.mkdir, lambda p: os.symlink("a", p),
                 lambda p: os.mknod(p, 0o600)):
        with pytest.raises(OSError) as exc:
            make(os.path.join(m.path, "d"))
        assert exc.value.errno == errno.ENOSPC
    os.link(os.path.join(m.path, "a"), os.path.join(m.path, "hard"))  # no new inode
    st = os.statvfs(m.path)
    assert (st.f_files, st.f_ffree) == (3, 0)
    os.unlink(os.path.join(m.path, "c"))
    open(os.path.join(m.path, "d"), "w").close()


def test_concurrent_writers_never_exceed_the_limit(mount_factory: MountFactory) -> None:
    m = mount_factory("2M")
    accepted = [0] * 8

    def writer(i: int) -> None:
        accepted[i], _ = fill(os.path.join(m.path, f"w{i}"), 4096 * (i + 1) - 1)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage = m.usage()
    assert usage["used"] <= 2 * MiB
    on_disk = sum(os.path.getsize(os.path.join(m.backing, f"w{i}")) for i in range(8))
    assert on_disk == sum(accepted)
    blocks = sum(-(-a // BLOCK) for a in accepted)
    assert blocks * BLOCK == usage["used"]
    assert usage["used"] > 2 * MiB - 8 * BLOCK  # and they did fill it


def test_lowered_limit_refuses_new_blocks_but_keeps_data(mount_factory: MountFactory) -> None:
    m = mount_factory("1M")
    path = os.path.join(m.path, "f")
    with open(path, "wb") as f:
        f.write(b"k" * 500_000)
    m.set_limit("100K")
    assert os.path.getsize(path) == 500_000
    with pytest.raises(OSError) as exc, open(path, "ab") as f:
        f.write(b"more" * 2000)
    assert exc.value.errno == errno.ENOSPC
    st = os.statvfs(m.path)
    assert st.f_bavail == 0
    m.set_limit("2M")
    with open(path, "ab") as f:
        f.write(b"more" * 2000)


def test_a_refused_new_entry_is_named_in_its_event(mount_factory: MountFactory) -> None:
    # what compare -- CMD and `quotafs events` show: the entry that did not fit, not its
    # directory
    m = mount_factory("8K", inodes=3)
    os.mkdir(os.path.join(m.path, "sub"))
    os.mkdir(os.path.join(m.path, "sub", "a"))  # 8 KiB used: the next directory won't fit
    with pytest.raises(OSError) as no_room:
        os.mkdir(os.path.join(m.path, "sub", "b"))
    open(os.path.join(m.path, "sub", "f"), "w").close()  # the third inode
    with pytest.raises(OSError) as no_inode:
        open(os.path.join(m.path, "sub", "g"), "w").close()
    assert no_room.value.errno == no_inode.value.errno == errno.ENOSPC
    assert [(e.kind, e.op, e.path) for e in m.events()] == [
        ("quota", "mkdir", "/sub/b"), ("quota", "create", "/sub/g")]
