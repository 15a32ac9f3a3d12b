"""The bookkeeping of a video index in SQLite: its settings, which videos are indexed in which chunk row, which files
could not be read and why, and the order of the videos in the stage-1 search structures.

    catalog.sqlite
      settings(key, value)                  JSON values: format version, model name and fingerprints, FAISS parameters,
                                            the generation of `positions`, the time of the last update
      videos(path, size, mtime_ns, chunk, row)
      skipped(path, size, mtime_ns, reason)
      chunks(name)                          every chunk recorded (its videos may since have been re-encoded elsewhere)
      positions(position, path)             row i of the FAISS index / stage-1 matrix is the video at position i
      listing(path, size, mtime_ns)         the library's files while an update compares them (empty otherwise)
      changes(position, kind, path, size, mtime_ns)
                                            the last update's plan: the files to encode ("added", "updated") numbered
                                            from 1 in path order, then the videos it "removed"

An update compares the library with the catalog in SQL (`plan_update`), so neither side is ever held in memory
whole. The database runs in WAL mode: readers (searches) never wait for the writer, and every
chunk is recorded in one transaction, so an index killed at any moment reopens at the last recorded chunk. Memory and
disk writes grow with a chunk, not with the library: nothing holds the whole library in memory except what a caller
asks for.
"""

import contextlib
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator


CATALOG = "catalog.sqlite"
LOCK_TIMEOUT_S = 60.0  # how long a statement waits for another connection's lock before giving up

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS videos (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, chunk TEXT NOT NULL, row INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS videos_by_chunk ON videos (chunk);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                                    reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS positions (position INTEGER PRIMARY KEY, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS listing (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS changes (position INTEGER PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL,
                                    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
"""
# A listed file the catalog already knows in this version (indexed, or skipped as unreadable): nothing to do.
UNCHANGED = """(v.path IS NOT NULL AND v.size = l.size AND v.mtime_ns = l.mtime_ns)
               OR (s.path IS NOT NULL AND s.size = l.size AND s.mtime_ns = l.mtime_ns)"""
BATCH = 10_000  # rows per statement batch when a table is read or written in pieces


class IndexCatalog:
    """
    One index's `catalog.sqlite` (see the module docstring). A catalog object may be used from several threads (a
    search page answers queries in a thread pool); its statements are serialised by a lock, and several catalog
    objects, in threads or processes, may read while one writes.
    """

    def __init__(self, path: str):
        self.path = path
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=LOCK_TIMEOUT_S)
        self._lock = threading.RLock()
        with self._lock:
            self._enter_wal_mode()
            self._connection.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints, never corrupt (WAL)
            self._connection.executescript(SCHEMA)

    def _enter_wal_mode(self) -> None:
        """Switch the database to WAL. The switch takes an exclusive lock and SQLite answers "database is locked" at
        once, without its busy timeout, when another connection holds any lock meanwhile (two processes of one
        `torchrun` opening a new index together): wait and retry, as the timeout would."""
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                self._connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @staticmethod
    def path_in(index_dir: str | os.PathLike) -> str:
        return os.path.join(os.fspath(index_dir), CATALOG)

    def journal_mode(self, mode: str) -> None:
        """SQLite's journal mode ("WAL", or "DELETE" to fold the write-ahead log into the file)."""
        with self._lock:
            self._connection.execute(f"PRAGMA journal_mode={mode}")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: everything inside it is recorded together or not at all; a read transaction sees one
        snapshot of the database."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    # -- settings ----------------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        return {key: json.loads(value) for key, value in self._query("SELECT key, value FROM settings")}

    def create_settings(self, **values) -> None:
        """Store `values` as the settings of a new catalog, in one transaction that first checks there are none: of
        several processes creating one index together, one writes them and the others find them."""
        with self.transaction() as connection:
            if not connection.execute("SELECT 1 FROM settings LIMIT 1").fetchone():
                self.set_settings(connection, **values)

    def set_settings(self, connection: sqlite3.Connection, **values) -> None:
        """Inside a transaction: store `values` (JSON-serialisable) under their keys."""
        connection.executemany(
            "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
            [(key, json.dumps(value)) for key, value in values.items()],
        )

    # -- videos ------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM videos")[0][0]

    def __contains__(self, path: str) -> bool:
        return bool(self._query("SELECT 1 FROM videos WHERE path = ?", (path,)))

    def entry(self, path: str) -> dict | None:
        """`{"stat": [size, mtime_ns], "chunk", "row"}` of an indexed video, or None."""
        found = self._query("SELECT size, mtime_ns, chunk, row FROM videos WHERE path = ?", (path,))
        return {"stat": list(found[0][:2]), "chunk": found[0][2], "row": found[0][3]} if found else None

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own reading one snapshot, for long reads that hand out rows as they go."""
        connection = sqlite3.connect(
            f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=LOCK_TIMEOUT_S
        )
        try:
            connection.execute("BEGIN")
            yield connection
        finally:
            connection.close()

    def skipped(self) -> dict[str, tuple[list[int], str]]:
        """Files that could not be indexed: path -> ([size, mtime_ns], reason)."""
        return {path: ([size, mtime], reason)
                for path, size, mtime, reason in self._query("SELECT path, size, mtime_ns, reason FROM skipped")}

    def skipped_count(self) -> int:
        return self._query("SELECT COUNT(*) FROM skipped")[0][0]

    def library_root(self) -> str | None:
        """The deepest folder holding every indexed video (from the first and last path in sorted order)."""
        first_last = self._query("SELECT MIN(path), MAX(path) FROM videos")[0]
        if first_last[0] is None:
            return None
        return os.path.commonpath([os.path.dirname(path) for path in first_last])

    def chunks(self) -> set[str]:
        return {name for (name,) in self._query("SELECT name FROM chunks")}

    def record_chunk(
        self, name: str, videos: Iterable[tuple[str, list[int], int]], skipped: dict[str, tuple[list[int], str]]
    ) -> None:
        """Record a finished chunk in one transaction: its `videos` (path, [size, mtime_ns], row) and the files it
        could not read, `skipped` (path -> ([size, mtime_ns], reason))."""
        videos = list(videos)
        with self.transaction() as connection:
            connection.executemany("DELETE FROM skipped WHERE path = ?", [(path,) for path, _, _ in videos])
            connection.executemany(
                "INSERT OR REPLACE INTO videos (path, size, mtime_ns, chunk, row) VALUES (?, ?, ?, ?, ?)",
                [(path, stat[0], stat[1], name, row) for path, stat, row in videos],
            )
            connection.executemany(
                "INSERT OR REPLACE INTO skipped (path, size, mtime_ns, reason) VALUES (?, ?, ?, ?)",
                [(path, stat[0], stat[1], reason) for path, (stat, reason) in skipped.items()],
            )
            connection.execute("INSERT OR IGNORE INTO chunks (name) VALUES (?)", (name,))

    # -- updates: the library against the catalog ---------------------------------------------------------------------

    def plan_update(self, files: Iterable[tuple[str, int, int]], removes: Callable[[str], bool]) -> None:
        """
        Compare the library's `files` (path, size, mtime_ns) with the catalog, in one transaction: the files go into
        the `listing` table in batches (the library is never held in memory); then number the files to encode in
        path order (`changes` "added": new, or skipped before and changed since; "updated": indexed in another
        version), record as "removed" the indexed videos missing from the listing for which `removes(path)` holds,
        drop from the catalog what the update replaces (the removed and updated videos, and the skipped files that
        changed or went), and empty the listing again.
        """
        files = iter(files)
        with self.transaction() as connection:  # the listing is empty outside it (a killed update rolls back)
            while batch := list(itertools.islice(files, BATCH)):
                connection.executemany("INSERT OR REPLACE INTO listing (path, size, mtime_ns) VALUES (?, ?, ?)", batch)
            connection.execute("DELETE FROM changes")
            connection.execute(f"""
                INSERT INTO changes (position, kind, path, size, mtime_ns)
                SELECT ROW_NUMBER() OVER (ORDER BY l.path), CASE WHEN v.path IS NULL THEN 'added' ELSE 'updated' END,
                       l.path, l.size, l.mtime_ns
                FROM listing l LEFT JOIN videos v ON v.path = l.path LEFT JOIN skipped s ON s.path = l.path
                WHERE NOT ({UNCHANGED})""")
            first = connection.execute("SELECT COUNT(*) FROM changes").fetchone()[0] + 1
            missing = connection.execute(
                "SELECT v.path, v.size, v.mtime_ns FROM videos v LEFT JOIN listing l ON l.path = v.path"
                " WHERE l.path IS NULL ORDER BY v.path")
            numbered = itertools.count(first)
            gone = ((next(numbered), "removed", *row) for row in missing if removes(row[0]))
            while batch := list(itertools.islice(gone, BATCH)):
                connection.executemany(
                    "INSERT INTO changes (position, kind, path, size, mtime_ns) VALUES (?, ?, ?, ?, ?)", batch)
            connection.execute("DELETE FROM videos WHERE path IN (SELECT path FROM changes WHERE kind != 'added')")
            connection.execute("""
                DELETE FROM skipped WHERE NOT EXISTS (
                    SELECT 1 FROM listing l
                    WHERE l.path = skipped.path AND l.size = skipped.size AND l.mtime_ns = skipped.mtime_ns)""")
            connection.execute("DELETE FROM listing")

    def planned_count(self) -> int:
        """How many files the last planned update encodes."""
        return self._query("SELECT COUNT(*) FROM changes WHERE kind != 'removed'")[0][0]

    def planned(self, start: int, stop: int) -> list[tuple[str, list[int]]]:
        """Files `start` to `stop` - 1 (from 0, in path order) that the last planned update encodes: (path, [size,
        mtime_ns])."""
        rows = self._query(
            "SELECT path, size, mtime_ns FROM changes WHERE kind != 'removed' AND position > ? AND position <= ?"
            " ORDER BY position", (start, stop))
        return [(path, [size, mtime]) for path, size, mtime in rows]

    def changes(self, kind: str) -> Iterator[str]:
        """The paths of one kind of change ("added", "updated", "removed") of the last update, in path order, read in
        batches; "added" and "updated" count only the files it did index."""
        join = "" if kind == "removed" else " JOIN videos v ON v.path = c.path"
        with self._snapshot() as connection:
            cursor = connection.execute(f"SELECT c.path FROM changes c{join} WHERE c.kind = ? ORDER BY c.position",
                                        (kind,))
            while rows := cursor.fetchmany(BATCH):
                yield from (path for (path,) in rows)

    def change_counts(self) -> dict[str, int]:
        """How many of each kind of change the last update made (see [`changes`])."""
        counts = dict(self._query(
            "SELECT c.kind, COUNT(*) FROM changes c JOIN videos v ON v.path = c.path GROUP BY c.kind"))
        counts["removed"] = self._query("SELECT COUNT(*) FROM changes WHERE kind = 'removed'")[0][0]
        return {kind: counts.get(kind, 0) for kind in ("added", "updated", "removed")}

    def skipped_in_update(self) -> dict[str, str]:
        """The files the last update tried to encode and could not: path -> reason."""
        return dict(self._query(
            "SELECT s.path, s.reason FROM changes c JOIN skipped s ON s.path = c.path WHERE c.kind != 'removed'"
            " ORDER BY c.position"))

    def dead_chunks(self) -> list[str]:
        """Chunks none of whose rows is indexed any more."""
        return [name for (name,) in self._query(
            "SELECT name FROM chunks WHERE name NOT IN (SELECT DISTINCT chunk FROM videos) ORDER BY name")]

    def drop_chunks(self, names: Iterable[str]) -> None:
        with self.transaction() as connection:
            connection.executemany("DELETE FROM chunks WHERE name = ?", [(name,) for name in names])

    # -- positions: the order of the stage-1 search structures --------------------------------------------------------

    def renumber(self, generation: int, **settings) -> None:
        """Number the indexed videos 0..N-1 in path order (the order of `rows_by_path`, in which the caller built the
        search structures of `generation`), and store `generation` and `settings`, in one transaction."""
        with self.transaction() as connection:
            connection.execute("DELETE FROM positions")
            connection.execute(
                "INSERT INTO positions (position, path) SELECT ROW_NUMBER() OVER (ORDER BY path) - 1, path FROM videos"
            )
            self.set_settings(connection, generation=generation, updated=time.time(), **settings)

    @staticmethod
    def _generation(connection: sqlite3.Connection) -> int:
        found = connection.execute("SELECT value FROM settings WHERE key = 'generation'").fetchone()
        return json.loads(found[0]) if found else 0

    def generation(self) -> int:
        with self._lock:
            return self._generation(self._connection)

    def rows_at(self, positions: list[int]) -> tuple[int, list[tuple[str, str, int]]]:
        """The generation and, for each position, `(path, chunk, row)` (None where the video has gone since the
        positions were numbered: an update is under way), read from one snapshot."""
        with self.transaction(write=False) as connection:
            generation = self._generation(connection)
            found = {}
            for start in range(0, len(positions), 500):  # SQLite limits the parameters of one statement
                batch = positions[start : start + 500]
                found.update(
                    (position, (path, chunk, row))
                    for position, path, chunk, row in connection.execute(
                        "SELECT positions.position, videos.path, videos.chunk, videos.row FROM positions "
                        f"JOIN videos ON videos.path = positions.path WHERE position IN ({','.join('?' * len(batch))})",
                        batch,
                    )
                )
        return generation, [found.get(position) for position in positions]

    def position_count(self) -> int:
        return self._query("SELECT COUNT(*) FROM positions")[0][0]

    def rows_in_order(self, by_path: bool = False, batch: int = BATCH) -> Iterator[tuple[int, str, str, int]]:
        """`(position, path, chunk, row)` of every numbered video in position order (`by_path`: of every indexed
        video in path order, numbered as the next `renumber` numbers them), read in batches from one snapshot. While
        an update is under way, positions whose video has gone are left out."""
        sql = (
            "SELECT ROW_NUMBER() OVER (ORDER BY path) - 1, path, chunk, row FROM videos ORDER BY path"
            if by_path
            else "SELECT positions.position, videos.path, videos.chunk, videos.row FROM positions "
            "JOIN videos ON videos.path = positions.path ORDER BY positions.position"
        )
        with self._snapshot() as connection:
            cursor = connection.execute(sql)
            while rows := cursor.fetchmany(batch):
                yield from rows
