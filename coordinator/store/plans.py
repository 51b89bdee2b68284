"""SQLite persistence of declared endpoints and rebalance plans (same file as
coordinator.store.sqlite).

Its own connection (WAL allows it), used from the event-loop thread only. Endpoints and plans
are stored as JSON documents keyed by name / plan id: the schema of their contents is owned by
coordinator.rebalance.loop, and small enough to rewrite whole on every change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from coordinator.store.sqlite import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rebalance_endpoints (
    name TEXT PRIMARY KEY, doc_json TEXT NOT NULL, updated_at_unix_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rebalance_plans (
    plan_id TEXT PRIMARY KEY, created_at_unix_s REAL NOT NULL, state TEXT NOT NULL,
    doc_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rebalance_plans_by_time ON rebalance_plans (created_at_unix_s);
CREATE TABLE IF NOT EXISTS rebalance_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class PlanStoreLike(Protocol):
    """What the rebalancer needs of a store (this SQLite one, or etcd's)."""

    def save_endpoint(self, name: str, doc: dict[str, Any], now_unix_s: float) -> None: ...
    def delete_endpoint(self, name: str) -> bool: ...
    def load_endpoints(self) -> list[dict[str, Any]]: ...
    def save_plan(self, plan_id: str, created_at_unix_s: float, state: str,
                  doc: dict[str, Any]) -> None: ...
    def load_plan(self, plan_id: str) -> dict[str, Any] | None: ...
    def latest_plans(self, limit: int) -> list[dict[str, Any]]: ...
    def plans_in_state(self, state: str) -> list[dict[str, Any]]: ...
    def get_setting(self, key: str) -> str | None: ...
    def set_setting(self, key: str, value: str) -> None: ...


class PlanStore:
    def __init__(self, path: Path | str) -> None:
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ---------------------------------------------------------------- endpoints

    def save_endpoint(self, name: str, doc: dict[str, Any], now_unix_s: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO rebalance_endpoints VALUES (?, ?, ?)",
                         (name, json.dumps(doc, sort_keys=True), now_unix_s))

    def delete_endpoint(self, name: str) -> bool:
        cur = self._db.execute("DELETE FROM rebalance_endpoints WHERE name = ?", (name,))
        return cur.rowcount > 0

    def load_endpoints(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT doc_json FROM rebalance_endpoints ORDER BY name")
        return [json.loads(r[0]) for r in rows.fetchall()]

    # ---------------------------------------------------------------- plans

    def save_plan(self, plan_id: str, created_at_unix_s: float, state: str,
                  doc: dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO rebalance_plans VALUES (?, ?, ?, ?)",
                         (plan_id, created_at_unix_s, state, json.dumps(doc, sort_keys=True)))

    def load_plan(self, plan_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT doc_json FROM rebalance_plans WHERE plan_id = ?",
                               (plan_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def latest_plans(self, limit: int) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT doc_json FROM rebalance_plans ORDER BY "
                                "created_at_unix_s DESC, rowid DESC LIMIT ?", (limit,))
        return [json.loads(r[0]) for r in rows.fetchall()]

    def plans_in_state(self, state: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT doc_json FROM rebalance_plans WHERE state = ? ORDER BY "
                                "created_at_unix_s, rowid", (state,))
        return [json.loads(r[0]) for r in rows.fetchall()]

    # ---------------------------------------------------------------- settings

    def get_setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM rebalance_settings WHERE key = ?",
                               (key,)).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO rebalance_settings VALUES (?, ?)", (key, value))
