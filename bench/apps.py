"""Application workloads: what real programs do to a filesystem, beside the fio-like ones.

    sqlite-wal       python's sqlite3, journal_mode=WAL, synchronous=FULL (the default):
                     Sizes.sqlite_txns transactions of 10 inserts each into an indexed table
    sqlite-rollback  the same with the rollback journal (journal_mode=DELETE, the default)
    tar              GNU tar extracting an archive of Sizes.tar_files small files (50 to a
                     directory, 100 B to 8 KiB each, deterministic)
    git-clone        `git clone --no-hardlinks` of a local repository of Sizes.git_files
                     files in five commits (copies its objects, then checks the tree out)

The archive and the source repository are made once per target, in the target, before the
rounds (not timed), so the programs read them through the filesystem under test as a user's
would. Each timed part ends when the program returns: tar and git do not fsync, sqlite does
at every commit.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import Callable

from bench.system import BenchError
from bench.workloads import Context, Sample, Sizes, Workload

APPS = "apps"  # per target: the archive and the source repository
ARCHIVE = "tree.tar"
SOURCE = "source.git"
ROWS_PER_TXN = 10
FILES_PER_DIR = 50
COMMITS = 5


def _program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (the {name} workload needs it)")
    return path


def _run(cmd: list[str], stdin: bytes | None = None) -> None:
    result = subprocess.run(cmd, input=stdin, capture_output=True, timeout=600, check=False,
                            env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"})
    if result.returncode != 0:
        last = (result.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
        raise BenchError(f"{os.path.basename(cmd[0])}: {last}")


def _small_files(count: int, seed: int) -> list[tuple[str, bytes]]:
    """`count` (relative path, content) pairs: 50 to a directory, 100 B to 8 KiB."""
    rng = random.Random(seed)
    return [(f"d{i // FILES_PER_DIR:03d}/f{i:05d}.txt",
             rng.randbytes(rng.randint(100, 8192))) for i in range(count)]


def _apps_dir(target_path: str) -> str:
    path = os.path.join(target_path, APPS)
    os.makedirs(path, exist_ok=True)
    return path


# -- SQLite -------------------------------------------------------------------------------------

def _sqlite(journal: str) -> Callable[[Context], Sample]:
    def run(ctx: Context) -> Sample:
        count = ctx.sizes.sqlite_txns
        rng = random.Random(3)
        batches = [[(rng.randrange(1 << 30), rng.randbytes(100)) for _ in range(ROWS_PER_TXN)]
                   for _ in range(count)]
        os.sync()
        with ctx.meter() as m:
            db = sqlite3.connect(os.path.join(ctx.directory, "bench.db"), isolation_level=None)
            try:
                db.execute(f"PRAGMA journal_mode={journal}")
                db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, v BLOB)")
                db.execute("CREATE INDEX t_k ON t (k)")
                for rows in batches:
                    db.execute("BEGIN")
                    db.executemany("INSERT INTO t (k, v) VALUES (?, ?)", rows)
                    db.execute("COMMIT")
            finally:
                db.close()
        return m.sample(count / m.seconds, m.seconds, count)
    return run


# -- tar ----------------------------------------------------------------------------------------

def _prepare_archive(target_path: str, sizes: Sizes) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in _small_files(sizes.tar_files, seed=4):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(_apps_dir(target_path), ARCHIVE), "wb") as f:
        f.write(buf.getvalue())
        os.fsync(f.fileno())


def _tar(ctx: Context) -> Sample:
    archive = os.path.join(os.path.dirname(ctx.directory), APPS, ARCHIVE)
    tar = _program("tar")
    os.sync()
    with ctx.meter() as m:
        _run([tar, "-x", "-f", archive, "-C", ctx.directory])
    count = ctx.sizes.tar_files
    if not os.path.exists(os.path.join(ctx.directory, _small_files(1, 4)[0][0])):
        raise BenchError("tar extracted nothing")
    return m.sample(count / m.seconds, m.seconds, count)


# -- git clone ----------------------------------------------------------------------------------

def _fast_import_stream(count: int) -> bytes:
    """A `git fast-import` stream: `count` files added over five commits on main."""
    files = _small_files(count, seed=5)
    out = io.BytesIO()
    per_commit = -(-count // COMMITS)
    for c in range(COMMITS):
        message = f"commit {c + 1}\n".encode()
        out.write(b"commit refs/heads/main\n")
        out.write(f"committer Bench <bench@example.invalid> {1_700_000_000 + c} +0000\n"
                  .encode())
        out.write(b"data %d\n%s" % (len(message), message))
        for name, data in files[c * per_commit:(c + 1) * per_commit]:
            out.write(b"M 100644 inline %s\ndata %d\n%s\n" % (name.encode(), len(data), data))
    return out.getvalue()


def _prepare_repository(target_path: str, sizes: Sizes) -> None:
    git = _program("git")
    source = os.path.join(_apps_dir(target_path), SOURCE)
    shutil.rmtree(source, ignore_errors=True)
    _run([git, "init", "-q", "--bare", "-b", "main", source])
    _run([git, "-C", source, "fast-import", "--quiet"], _fast_import_stream(sizes.git_files))
    os.sync()


def _git_clone(ctx: Context) -> Sample:
    source = os.path.join(os.path.dirname(ctx.directory), APPS, SOURCE)
    git = _program("git")
    os.sync()
    with ctx.meter() as m:
        _run([git, "clone", "-q", "--no-hardlinks", source,
              os.path.join(ctx.directory, "clone")])
    count = ctx.sizes.git_files
    if not os.path.exists(os.path.join(ctx.directory, "clone", _small_files(1, 5)[0][0])):
        raise BenchError("git clone checked nothing out")
    return m.sample(count / m.seconds, m.seconds, count)


APP_WORKLOADS: list[Workload] = [
    Workload("sqlite-wal", "SQLite inserts, WAL", "txn/s", "transaction", None,
             _sqlite("WAL"), reads_back=True),
    Workload("sqlite-rollback", "SQLite inserts, rollback journal", "txn/s", "transaction",
             None, _sqlite("DELETE"), reads_back=True),
    Workload("tar", "tar -x of small files", "files/s", "file", None, _tar,
             prepare=_prepare_archive, reads_back=True),
    Workload("git-clone", "git clone --no-hardlinks (local)", "files/s", "file", None,
             _git_clone, prepare=_prepare_repository, reads_back=True),
]
