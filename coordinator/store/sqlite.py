"""SQLite persistence (WAL): topology, nodes and their latest reports, leases, the epoch, audit.

Reports arrive at up to thousands per second, so they are not written one by one: the caller
hands over the dirty nodes in batches (``save_nodes``), each batch one transaction. Registration,
leases, epochs and audit entries are rare and written at once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shapeshifter.api.v1 import agent_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS topology (
    id INTEGER PRIMARY KEY AUTOINCREMENT, loaded_at_unix_s REAL NOT NULL, source TEXT NOT NULL,
    text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, hostname TEXT NOT NULL, labels_json TEXT NOT NULL,
    software_version TEXT NOT NULL, backend TEXT NOT NULL, registered_at_unix_s REAL NOT NULL,
    last_seen_unix_s REAL NOT NULL, last_report BLOB);
CREATE TABLE IF NOT EXISTS leases (
    node_id TEXT PRIMARY KEY, lease BLOB NOT NULL, granted_at_unix_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_unix_s REAL NOT NULL, epoch INTEGER NOT NULL,
    node_id TEXT NOT NULL, action TEXT NOT NULL, request_json TEXT NOT NULL, ok INTEGER NOT NULL,
    code TEXT NOT NULL, message TEXT NOT NULL, actor TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_node ON audit (node_id, id);
"""


@dataclass(frozen=True)
class StoredNode:
    node_id: str
    hostname: str
    labels: dict[str, str]
    software_version: str
    backend: str
    registered_at_unix_s: float
    last_seen_unix_s: float
    last_report: agent_pb2.Node | None


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at_unix_s: float
    epoch: int
    node_id: str
    action: str
    request_json: str
    ok: bool
    code: str
    message: str
    actor: str


def open_db(path: Path | str, schema: str) -> sqlite3.Connection:
    """The coordinator's SQLite file (autocommit; explicit transactions where needed) with
    `schema` applied. Every store of the coordinator opens the same file this way.

    A file SQLite cannot read, or one that fails `PRAGMA quick_check`, stops the start with a
    message naming it: the file holds the epoch, the emergencies in force and the plans being
    applied, so starting empty in its place would forget them (and reuse epochs)."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems))
        db.executescript(schema)
    except sqlite3.DatabaseError as exc:
        reason = " ".join(str(exc).split())  # quick_check's report spans lines; keep one
        raise sqlite3.DatabaseError(
            f"database {path} is unusable ({reason}); the coordinator will not start from an empty "
            "state in its place: restore the last good copy, or move the file aside to start "
            "afresh (emergencies in force and plans being applied are then forgotten)") from exc
    return db


class Store:
    def __init__(self, path: Path) -> None:
        # Used from the coordinator's event-loop thread only. (A flush thread was measured: its
        # GIL contention slowed report ingest far more than small batches on the loop do.)
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ---- epoch

    def epoch(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        return int(row[0]) if row else 0

    def bump_epoch(self) -> int:
        """Increment and persist the epoch (once per coordinator start); returns the new one."""
        with self._tx():
            epoch = self.epoch() + 1
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(epoch),),
            )
        return epoch

    # ---- topology

    def save_topology(self, source: str, text: str, at_unix_s: float) -> None:
        last = self._db.execute("SELECT text FROM topology ORDER BY id DESC LIMIT 1").fetchone()
        if last is None or last[0] != text:
            self._db.execute(
                "INSERT INTO topology (loaded_at_unix_s, source, text) VALUES (?, ?, ?)",
                (at_unix_s, source, text),
            )

    def latest_topology_text(self) -> str | None:
        row = self._db.execute("SELECT text FROM topology ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    # ---- nodes

    def save_nodes(self, nodes: Iterable[StoredNode]) -> None:
        rows = [
            (n.node_id, n.hostname, json.dumps(n.labels, sort_keys=True), n.software_version,
             n.backend, n.registered_at_unix_s, n.last_seen_unix_s,
             n.last_report.SerializeToString() if n.last_report is not None else None)
            for n in nodes
        ]
        if not rows:
            return
        with self._tx():
            self._db.executemany(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(node_id) DO UPDATE SET "
                "hostname=excluded.hostname, labels_json=excluded.labels_json, "
                "software_version=excluded.software_version, backend=excluded.backend, "
                "registered_at_unix_s=excluded.registered_at_unix_s, "
                "last_seen_unix_s=excluded.last_seen_unix_s, "
                "last_report=COALESCE(excluded.last_report, nodes.last_report)",
                rows,
            )

    def load_nodes(self) -> list[StoredNode]:
        out = []
        for row in self._db.execute("SELECT * FROM nodes ORDER BY node_id"):
            report = None
            if row[7] is not None:
                report = agent_pb2.Node()
                report.ParseFromString(row[7])
            out.append(StoredNode(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5],
                                  row[6], report))
        return out

    # ---- leases

    def save_lease(self, node_id: str, lease: agent_pb2.Lease, granted_at_unix_s: float) -> None:
        self._db.execute(
            "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET "
            "lease=excluded.lease, granted_at_unix_s=excluded.granted_at_unix_s",
            (node_id, lease.SerializeToString(), granted_at_unix_s),
        )

    def load_leases(self) -> dict[str, agent_pb2.Lease]:
        out = {}
        for node_id, blob, _ in self._db.execute("SELECT * FROM leases"):
            lease = agent_pb2.Lease()
            lease.ParseFromString(blob)
            out[node_id] = lease
        return out

    # ---- audit

    def append_audit(self, at_unix_s: float, epoch: int, node_id: str, action: str,
                     request_json: str, ok: bool, code: str, message: str, actor: str) -> int:
        cur = self._db.execute(
            "INSERT INTO audit (at_unix_s, epoch, node_id, action, request_json, ok, code, "
            "message, actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (at_unix_s, epoch, node_id, action, request_json, int(ok), code, message, actor),
        )
        return int(cur.lastrowid or 0)

    def list_audit(self, limit: int = 100, node_id: str = "") -> list[AuditRecord]:
        sql = "SELECT * FROM audit"
        args: tuple = ()
        if node_id:
            sql += " WHERE node_id = ?"
            args = (node_id,)
        sql += " ORDER BY id DESC LIMIT ?"
        rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [AuditRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8], r[9])
                for r in rows]

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
