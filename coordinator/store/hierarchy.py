"""SQLite persistence of a parent coordinator's site limits (same file as coordinator.store.sqlite).

A site limit is kept with the per-row limits it was split into, so a restarted parent re-sends
exactly what was in force, before any leaf has reported again. The change sequence number is
kept too: it only ever grows, across restarts, so a leaf's acknowledgement is never mistaken for
one of an older change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.store.sqlite import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS site_limits (
    limit_id TEXT PRIMARY KEY, site TEXT NOT NULL, state TEXT NOT NULL,
    power_limit_w REAL NOT NULL, capacity_frac REAL NOT NULL, normal_limit_w REAL NOT NULL,
    source TEXT NOT NULL, note TEXT NOT NULL, declared_at_unix_s REAL NOT NULL,
    cleared_at_unix_s REAL NOT NULL, infeasible INTEGER NOT NULL, seq INTEGER NOT NULL,
    acked_at_unix_s REAL NOT NULL, row_limits_json TEXT NOT NULL, actor TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS site_limits_by_site ON site_limits (site, seq);
CREATE TABLE IF NOT EXISTS hierarchy_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

ACTIVE, REPLACED, CLEARED = "active", "replaced", "cleared"


@dataclass
class SiteLimitRecord:
    limit_id: str
    site: str
    state: str  # active | replaced (by a newer limit) | cleared
    power_limit_w: float
    capacity_frac: float
    normal_limit_w: float
    source: str
    note: str
    declared_at_unix_s: float
    cleared_at_unix_s: float = 0.0
    infeasible: bool = False
    seq: int = 0  # of the latest change (declaration or clearing)
    acked_at_unix_s: float = 0.0  # every leaf acknowledged that change (0 = not yet)
    row_limits_w: dict[str, float] = field(default_factory=dict)
    actor: str = ""


class SiteLimitStore:
    def __init__(self, path: Path | str) -> None:
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, rec: SiteLimitRecord) -> None:
        values = (rec.limit_id, rec.site, rec.state, rec.power_limit_w, rec.capacity_frac,
                  rec.normal_limit_w, rec.source, rec.note, rec.declared_at_unix_s,
                  rec.cleared_at_unix_s, int(rec.infeasible), rec.seq, rec.acked_at_unix_s,
                  json.dumps(rec.row_limits_w, sort_keys=True), rec.actor)
        marks = ", ".join("?" * len(values))
        self._db.execute(f"INSERT OR REPLACE INTO site_limits VALUES ({marks})", values)

    def latest(self) -> dict[str, SiteLimitRecord]:
        """Per site, its newest limit (in force or not)."""
        rows = self._db.execute("SELECT * FROM site_limits ORDER BY seq").fetchall()
        return {r[1]: _record(r) for r in rows}

    def next_seq(self) -> int:
        """The next change number (persisted before it is used)."""
        row = self._db.execute("SELECT value FROM hierarchy_meta WHERE key = 'seq'").fetchone()
        seq = (int(row[0]) if row else 0) + 1
        self._db.execute("INSERT OR REPLACE INTO hierarchy_meta VALUES ('seq', ?)", (str(seq),))
        return seq

    def seq(self) -> int:
        row = self._db.execute("SELECT value FROM hierarchy_meta WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0


def _record(r: tuple) -> SiteLimitRecord:  # type: ignore[type-arg]
    return SiteLimitRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                           bool(r[10]), r[11], r[12], json.loads(r[13]), r[14])
