"""The application under test: an event log kept in SQLite, one transaction per event."""

from __future__ import annotations

import sqlite3


class EventLog:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS events "
                        "(id INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload BLOB NOT NULL)")
        self.db.commit()

    def record(self, kind: str, payload: bytes) -> None:
        """Store one event, durably; on failure nothing of it is stored."""
        with self.db:  # commit, or roll back on error
            self.db.execute("INSERT INTO events (kind, payload) VALUES (?, ?)", (kind, payload))

    def count(self) -> int:
        (n,) = self.db.execute("SELECT count(*) FROM events").fetchone()
        return int(n)

    def integrity(self) -> str:
        (result,) = self.db.execute("PRAGMA integrity_check").fetchone()
        return str(result)

    def close(self) -> None:
        self.db.close()
