"""The program under test: an order book in SQLite, WAL mode, fsynced commits.

    python orders.py setup    create orders.db (WAL mode, empty tables): the starting state
    python orders.py write    add BATCHES transactions of ROWS orders each; on a full disk
                              say how many were committed and exit 1
    python orders.py write NORMAL   the same with `synchronous=NORMAL`, which in WAL mode
                              fsyncs only at checkpoints: consistent after a power cut,
                              but not durable (SQLite's documentation says so) — what a
                              crash sweep catches
    python orders.py check    open the database as the next start of the program would (it
                              recovers from the WAL), then exit 0 if `pragma integrity_check`
                              says ok and the rows are those of whole committed
                              transactions, 1 otherwise

Every transaction inserts ROWS orders of batch b and sets progress.last_batch = b, so a
consistent database holds batches 0..k-1, each complete, and last_batch = k-1.

What the writer reported as committed is noted outside the database, where a power cut
cannot reach it: one line per COMMIT that returned, in $QUOTAFS_SWEEP_NOTES/committed
(a sweep gives each run such a directory, beside its mount, shared with the check), as
a client would keep the acknowledgements it received. The check then also fails when a
transaction the writer reported is missing: durability, not only consistency.
"""

from __future__ import annotations

import os
import sqlite3
import sys

DB = "orders.db"
BATCHES = 30
ROWS = 10  # per transaction
PAYLOAD = 1000  # bytes per order
NOTES = "committed"  # in $QUOTAFS_SWEEP_NOTES: the batches reported committed


def _notes() -> str | None:
    directory = os.environ.get("QUOTAFS_SWEEP_NOTES")
    return os.path.join(directory, NOTES) if directory else None


def note_committed(batch: int) -> None:
    """Report a COMMIT that returned: a line in the notes, if the sweep gave a place."""
    path = _notes()
    if path is not None:
        with open(path, "a") as f:
            f.write(f"{batch}\n")


def reported_committed() -> int:
    """How many transactions the writer reported committed (0 without notes)."""
    path = _notes()
    if path is None or not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.read().split())


SYNCHRONOUS = ("FULL", "NORMAL")  # FULL: a commit is on disk when COMMIT returns


def connect(synchronous: str = "FULL") -> sqlite3.Connection:
    db = sqlite3.connect(DB, isolation_level=None)  # transactions are ours: BEGIN/COMMIT
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def setup() -> int:
    db = connect()
    db.execute("CREATE TABLE orders (batch INTEGER NOT NULL, seq INTEGER NOT NULL, "
               "item BLOB NOT NULL, PRIMARY KEY (batch, seq))")
    db.execute("CREATE TABLE progress (last_batch INTEGER NOT NULL)")
    db.execute("INSERT INTO progress VALUES (-1)")
    db.close()
    return 0


def write(synchronous: str = "FULL") -> int:
    committed = 0
    try:
        db = connect(synchronous)  # opening creates the -wal and -shm files: that may fail too
    except sqlite3.Error as exc:
        print(f"orders: {exc} opening {DB}, after 0 transactions", file=sys.stderr)
        return 1
    try:
        for batch in range(BATCHES):
            db.execute("BEGIN")
            for seq in range(ROWS):
                item = bytes([batch % 251, seq]) * (PAYLOAD // 2)
                db.execute("INSERT INTO orders VALUES (?, ?, ?)", (batch, seq, item))
            db.execute("UPDATE progress SET last_batch = ?", (batch,))
            db.execute("COMMIT")
            committed += 1
            note_committed(batch)
    except sqlite3.Error as exc:
        print(f"orders: {exc} after {committed} transactions", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(f"orders: {committed} transactions committed")
    return 0


def check() -> int:
    db = connect()
    try:
        (integrity,) = db.execute("PRAGMA integrity_check").fetchone()
        (last,) = db.execute("SELECT last_batch FROM progress").fetchone()
        sizes = db.execute("SELECT batch, count(*) FROM orders GROUP BY batch "
                           "ORDER BY batch").fetchall()
    finally:
        db.close()
    expected = [(b, ROWS) for b in range(last + 1)]
    if integrity != "ok":
        print(f"check: integrity_check: {integrity}", file=sys.stderr)
        return 1
    if sizes != expected:
        print(f"check: last_batch {last} but the batches and their rows are {sizes}",
              file=sys.stderr)
        return 1
    reported = reported_committed()
    if last + 1 < reported:
        print(f"check: the writer reported {reported} transactions committed, the "
              f"database holds {last + 1}", file=sys.stderr)
        return 1
    print(f"check: ok, {last + 1} transactions, {reported} reported committed",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    commands = {"setup": setup, "write": write, "check": check}
    if not ((len(sys.argv) == 2 and sys.argv[1] in commands)
            or (len(sys.argv) == 3 and sys.argv[1] == "write" and sys.argv[2] in SYNCHRONOUS)):
        sys.exit("usage: orders.py setup|write [FULL|NORMAL]|check")
    if len(sys.argv) == 3:
        sys.exit(write(sys.argv[2]))
    sys.exit(commands[sys.argv[1]]())
