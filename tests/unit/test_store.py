"""SQLite store: epoch monotonic across reopen, nodes/leases/audit round trip, WAL on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from coordinator.core import CoordinatorCore, IngestStats
from coordinator.leases import LeasePolicy
from coordinator.registry import NodeRecord
from coordinator.session import AgentSession
from coordinator.store.sqlite import Store, StoredNode
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common.clock import ManualClock
from shapeshifter.topology import parse_topology


def stored(node_id: str, seen_s: float, report: agent_pb2.Node | None) -> StoredNode:
    return StoredNode(node_id, f"host-{node_id}", {"row": "r1"}, "0.1", "sim", 10.0, seen_s, report)


def test_epoch_bumps_and_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    s = Store(db)
    assert s.epoch() == 0
    assert s.bump_epoch() == 1
    assert s.bump_epoch() == 2
    s.close()
    s = Store(db)
    assert s.epoch() == 2 and s.bump_epoch() == 3
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_nodes_round_trip_and_keep_last_report(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    s = Store(db)
    report = agent_pb2.Node(node_id="n1", gpus=[agent_pb2.Gpu(index=0, power_draw_w=123.0)])
    s.save_nodes([stored("n1", 20.0, report), stored("n2", 21.0, None)])
    s.save_nodes([stored("n1", 30.0, None)])  # a registration without a report keeps the old one
    s.close()
    nodes = {n.node_id: n for n in Store(db).load_nodes()}
    assert nodes["n1"].last_seen_unix_s == 30.0
    assert nodes["n1"].last_report is not None
    assert nodes["n1"].last_report.gpus[0].power_draw_w == 123.0
    assert nodes["n2"].last_report is None and nodes["n2"].labels == {"row": "r1"}


def test_leases_and_topology_persist(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    s = Store(db)
    lease = agent_pb2.Lease(lease_id="n1/e1/g1", epoch=1, ttl_s=5.0, gpu_power_limit_w={0: 700.0})
    s.save_lease("n1", lease, 100.0)
    s.save_topology("t.yaml", "version: 1\n", 100.0)
    s.save_topology("t.yaml", "version: 1\n", 101.0)  # unchanged text: no new row
    s.close()
    s = Store(db)
    assert s.load_leases()["n1"] == lease
    assert s.latest_topology_text() == "version: 1\n"
    assert s._db.execute("SELECT COUNT(*) FROM topology").fetchone()[0] == 1


def test_audit_newest_first_filtered_by_node(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    for i, node_id in enumerate(["n1", "n2", "n1"]):
        s.append_audit(float(i), 3, node_id, "set_power_limit", "{}", i != 1, "OK", f"m{i}", "me")
    entries = s.list_audit(limit=10)
    assert [e.message for e in entries] == ["m2", "m1", "m0"]
    assert [e.ok for e in entries] == [True, False, True]
    assert [e.message for e in s.list_audit(limit=10, node_id="n1")] == ["m2", "m0"]
    assert len(s.list_audit(limit=1)) == 1


def _register(core: CoordinatorCore, node_id: str) -> NodeRecord:
    msg = lpb.Register(node_id=node_id, labels={"site": "s1"})
    rec, _ = core.register(msg, AgentSession(node_id))
    return rec


def test_batched_flush_is_fifo_bounded_and_retried(tmp_path: Path) -> None:
    topo = parse_topology("version: 1\nsites: [{name: s1, aisles: [{name: a1, "
                          "aisle_airflow_cfm: 1}], rows: [{name: r1, row_power_limit_w: 1, "
                          "racks: [{name: k1, aisle: a1}]}]}]\n")
    store = Store(tmp_path / "c.db")
    core = CoordinatorCore(topo, store, ManualClock(), epoch=1, lease_policy=LeasePolicy(5.0))
    recs = [_register(core, f"n{i}") for i in range(5)]
    assert core.flush(limit=2) == 2 and core.flush(limit=2) == 2  # n0, n1 then n2, n3
    for i, rec in enumerate(recs[:2]):
        report = lpb.NodeReport(node=agent_pb2.Node(node_id=rec.node_id), seq=i + 1)
        core.registry.ingest(rec, report)
    assert [r.node_id for r in core.registry.take_dirty(10)] == ["n4", "n0", "n1"]

    core.registry.ingest(recs[2], lpb.NodeReport(node=agent_pb2.Node(node_id="n2"), seq=1))
    store.close()  # the next write fails: the node must stay queued
    with pytest.raises(sqlite3.ProgrammingError):
        core.flush()
    assert [r.node_id for r in core.registry.take_dirty()] == ["n2"]


def test_ingest_stats_quantiles_and_reset() -> None:
    stats = IngestStats(window=1000)
    for ms in range(1, 101):  # 1..100 ms
        stats.record(ms / 1000)
    s = stats.snapshot(reset=True)
    assert (s.reports_total, s.window_reports) == (100, 100)
    assert (s.delay_p50_s, s.delay_p99_s, s.delay_max_s) == (0.051, 0.1, 0.1)
    after = stats.snapshot()
    assert (after.reports_total, after.window_reports, after.delay_p99_s) == (100, 0, 0.0)
