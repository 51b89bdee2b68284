"""SQLite persistence of emergencies and their timelines (same file as coordinator.store.sqlite).

Its own connection to the coordinator's database (WAL allows it), used from the event-loop
thread only. A fan-out's per-node events are written in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from coordinator.store.sqlite import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS emergencies (
    emergency_id TEXT PRIMARY KEY, scope TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    state TEXT NOT NULL, capacity_frac REAL NOT NULL, normal_limit REAL NOT NULL,
    new_limit REAL NOT NULL, power_limit_w REAL NOT NULL, source TEXT NOT NULL,
    note TEXT NOT NULL, declared_at_unix_s REAL NOT NULL, cleared_at_unix_s REAL NOT NULL,
    shortfall_w REAL NOT NULL);
CREATE TABLE IF NOT EXISTS emergency_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, emergency_id TEXT NOT NULL, at_unix_s REAL NOT NULL,
    kind TEXT NOT NULL, node_id TEXT NOT NULL, detail_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS emergency_events_by_id ON emergency_events (emergency_id, id);
"""


@dataclass
class EmergencyRecord:
    emergency_id: str
    scope: str
    name: str
    kind: str
    state: str  # active | clearing | cleared
    capacity_frac: float
    normal_limit: float
    new_limit: float
    power_limit_w: float
    source: str
    note: str
    declared_at_unix_s: float
    cleared_at_unix_s: float = 0.0
    shortfall_w: float = 0.0


@dataclass(frozen=True)
class Event:
    at_unix_s: float
    kind: str
    node_id: str = ""
    detail: dict[str, Any] | None = None


class EmergencyStoreLike(Protocol):
    """What the emergency controller needs of a store (this SQLite one, or etcd's)."""

    def save(self, rec: EmergencyRecord) -> None: ...
    def load(self, active_only: bool = False) -> list[EmergencyRecord]: ...
    def append(self, emergency_id: str, events: Iterable[Event]) -> None: ...
    def timeline(self, emergency_id: str) -> list[Event]: ...


class EmergencyStore:
    def __init__(self, path: Path | str) -> None:
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, rec: EmergencyRecord) -> None:
        values = tuple(vars(rec).values())
        marks = ", ".join("?" * len(values))
        self._db.execute(f"INSERT OR REPLACE INTO emergencies VALUES ({marks})", values)

    def load(self, active_only: bool = False) -> list[EmergencyRecord]:
        sql = "SELECT * FROM emergencies"
        if active_only:
            sql += " WHERE state != 'cleared'"
        rows = self._db.execute(sql + " ORDER BY declared_at_unix_s").fetchall()
        return [EmergencyRecord(*r) for r in rows]

    def append(self, emergency_id: str, events: Iterable[Event]) -> None:
        rows = [(emergency_id, e.at_unix_s, e.kind, e.node_id,
                 json.dumps(e.detail or {}, sort_keys=True)) for e in events]
        if not rows:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO emergency_events (emergency_id, at_unix_s, kind, node_id, "
                "detail_json) VALUES (?, ?, ?, ?, ?)", rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def timeline(self, emergency_id: str) -> list[Event]:
        rows = self._db.execute(
            "SELECT at_unix_s, kind, node_id, detail_json FROM emergency_events "
            "WHERE emergency_id = ? ORDER BY id", (emergency_id,)).fetchall()
        return [Event(r[0], r[1], r[2], json.loads(r[3])) for r in rows]
