"""Teacher answers kept on disk across runs, so that no run pays twice for the same call.

**SQLite in WAL mode**, from Python's standard library: readers never block the one writer, a
write is one transaction (a killed run leaves the store as it was before or after, never
between), several processes share one file safely (``BEGIN IMMEDIATE`` queues writers, a busy
timeout waits for the lock), and no map size has to be guessed up front as LMDB's does.

An entry is one row's class logits (float32) and the tokens the teacher counted for it, under
``sha256(teacher fingerprint, row content)``: the teacher's published metadata (name, sizes,
tokenizer hash, FLOPs model) and, for a prompted teacher, its template and label words; the row's
token ids or text. Each entry carries a SHA-256 of its key and value: one that does not match is
**refused** (logged, deleted, asked again), never used. The store is **bounded**: past
``max_bytes`` of entries, the least recently used are evicted down to 90 % of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 1024**3
LOW_WATER = 0.9  # eviction frees down to this fraction of max_bytes
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another process's transaction
SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key BLOB PRIMARY KEY, value BLOB NOT NULL, checksum BLOB NOT NULL, used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answers_used ON answers (used);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0);
"""


def default_store_path() -> Path:
    """``$DKD_CACHE/teacher_answers.sqlite``, else under ``~/.cache/dkd``: one per machine."""
    root = os.environ.get("DKD_CACHE") or Path.home() / ".cache" / "dkd"
    return Path(root) / "teacher_answers.sqlite"


@dataclass(frozen=True)
class StoredAnswer:
    logits: tuple[float, ...]
    tokens: int

    def encode(self) -> bytes:
        return struct.pack(f"<q{len(self.logits)}f", self.tokens, *self.logits)

    @classmethod
    def decode(cls, value: bytes) -> StoredAnswer:
        tokens, *logits = struct.unpack(f"<q{(len(value) - 8) // 4}f", value)
        return cls(tuple(logits), tokens)


def entry_key(fingerprint: str, content: object) -> bytes:
    """The key of one row's answer: the teacher's fingerprint and the row's content."""
    return hashlib.sha256(repr((fingerprint, content)).encode()).digest()


def _checksum(key: bytes, value: bytes) -> bytes:
    return hashlib.sha256(key + value).digest()


def _entry_bytes(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + 32 + 8  # the checksum and the clock beside them


class AnswerStore:
    """One process's handle on the shared store (see the module docstring)."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.path, self.max_bytes = Path(path), max_bytes
        self.refused = 0  # entries whose checksum did not match
        self._lock = threading.Lock()  # one connection, used from the event loop's worker threads
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.DatabaseError) as err:
            raise UserError(
                f"teacher answer store {self.path}: {err} (delete the file, or run with --teacher_store none)"
            ) from None

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, StoredAnswer]:
        """The stored answers among ``keys``; a damaged entry is refused and deleted."""
        with self._lock:
            return self._get_many(list(dict.fromkeys(keys)))

    def _get_many(self, keys: list[bytes]) -> dict[bytes, StoredAnswer]:
        if not keys:
            return {}
        found, damaged = {}, []
        marks = ",".join("?" * len(keys))
        rows = self._db.execute(f"SELECT key, value, checksum FROM answers WHERE key IN ({marks})", keys)
        for key, value, checksum in rows.fetchall():
            if _checksum(key, value) != checksum or (len(value) - 8) % 4:
                damaged.append(key)
            else:
                found[key] = StoredAnswer.decode(value)
        if damaged:
            self.refused += len(damaged)
            log.warning(
                "teacher answer store %s: %d damaged entries refused (asked again)", self.path, len(damaged)
            )
        with self._write():
            self._db.executemany(
                "UPDATE answers SET used = ? WHERE key = ?", ((time.time_ns(), k) for k in found)
            )
            self._delete(damaged)
        return found

    def put_many(self, answers: Mapping[bytes, StoredAnswer]) -> None:
        """Keep ``answers`` (an entry another run wrote meanwhile stays as it is), then evict."""
        with self._lock, self._write():
            now = time.time_ns()
            added = 0
            for key, answer in answers.items():
                value = answer.encode()
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)",
                    (key, value, _checksum(key, value), now),
                )
                added += cursor.rowcount * _entry_bytes(key, value)
            self._db.execute("UPDATE totals SET bytes = bytes + ?", (added,))
            if self.stored_bytes() > self.max_bytes:
                self._evict()

    def stored_bytes(self) -> int:
        """What the entries hold (the file is larger by SQLite's pages and index)."""
        return int(self._db.execute("SELECT bytes FROM totals").fetchone()[0])

    def file_bytes(self) -> int:
        """The store's size on disk: the database and its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _evict(self) -> None:
        """Drop the least recently used entries down to :data:`LOW_WATER` of ``max_bytes``."""
        excess = self.stored_bytes() - int(self.max_bytes * LOW_WATER)
        doomed = []
        for key, size in self._db.execute(
            "SELECT key, length(key) + length(value) + 40 FROM answers ORDER BY used"
        ):
            if excess <= 0:
                break
            doomed.append(key)
            excess -= size
        self._delete(doomed)
        log.info("teacher answer store %s: evicted %d least recently used entries", self.path, len(doomed))

    def _delete(self, keys: list[bytes]) -> None:
        for key in keys:
            size = self._db.execute(
                "DELETE FROM answers WHERE key = ? RETURNING length(key) + length(value) + 40", (key,)
            ).fetchone()
            if size is not None:
                self._db.execute("UPDATE totals SET bytes = bytes - ?", (size[0],))

    def _write(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error): one writer at a time, all or nothing."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind else "COMMIT")
