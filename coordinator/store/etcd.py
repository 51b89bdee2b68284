"""The coordinator's desired state in etcd, for replicas that fail over to each other.

In etcd (shared by the replicas, every write fenced by the leader's epoch, coordinator.ha.election):
the topology, the epoch, each node's lease, the emergencies with their timelines, the declared
endpoints, the rebalance plans with their action journal and the planner's settings. A new leader
resumes from them exactly as a restarted single coordinator resumes from its SQLite file.

Left in the replica's local SQLite file (`--db`): each node's latest report, which the agents
send again every second to whichever replica leads, and the audit log, which is append-only and
local to the replica that took the action (`ListAudit` on the leader shows that leader's entries).

The classes mirror the SQLite stores' methods (coordinator.store: sqlite, emergency, plans);
documents are the same JSON.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.ha.election import FencedKV
from coordinator.store.emergency import EmergencyRecord, Event
from coordinator.store.sqlite import Store, StoredNode
from shapeshifter.api.v1 import agent_pb2

LEASES_PER_FLUSH = 1000


class EtcdStore(Store):
    """Nodes and audit in SQLite (the parent class); epoch, topology and leases in etcd."""

    def __init__(self, path: Path, kv: FencedKV) -> None:
        super().__init__(path)
        self._kv = kv
        self._staged_leases: dict[str, agent_pb2.Lease] = {}

    def epoch(self) -> int:
        return self._kv.epoch

    def bump_epoch(self) -> int:
        return self._kv.epoch  # the election made it: the leader key's create revision

    def save_topology(self, source: str, text: str, at_unix_s: float) -> None:
        if self.latest_topology_text() != text:
            self._kv.put("topology", json.dumps({"source": source, "text": text,
                                                 "loaded_at_unix_s": at_unix_s}))

    def latest_topology_text(self) -> str | None:
        doc = self._kv.get("topology")
        return json.loads(doc)["text"] if doc else None

    def save_lease(self, node_id: str, lease: agent_pb2.Lease, granted_at_unix_s: float) -> None:
        # A new leader grants every node a lease at its first report (thousands at once): staged
        # here and written with the next batch of node state, 100 per etcd transaction.
        self._staged_leases[node_id] = lease

    def save_nodes(self, nodes: Iterable[StoredNode]) -> None:
        super().save_nodes(nodes)
        # At most LEASES_PER_FLUSH per call: each is ~0.1 ms of the event loop's time.
        batch = dict(itertools.islice(self._staged_leases.items(), LEASES_PER_FLUSH))
        self._kv.put_many((f"leases/{node_id}", _b64(lease.SerializeToString()))
                          for node_id, lease in batch.items())
        for node_id, lease in batch.items():  # unless re-granted meanwhile: then next time
            if self._staged_leases.get(node_id) is lease:
                del self._staged_leases[node_id]

    def load_leases(self) -> dict[str, agent_pb2.Lease]:
        out = {}
        for key, value in self._kv.get_prefix("leases/"):
            lease = agent_pb2.Lease()
            lease.ParseFromString(base64.b64decode(value))
            out[key.removeprefix("leases/")] = lease
        return out


class EtcdEmergencyStore:
    def __init__(self, kv: FencedKV) -> None:
        self._kv = kv
        self._appended = 0

    def close(self) -> None:
        pass

    def save(self, rec: EmergencyRecord) -> None:
        self._kv.put(f"emergencies/records/{rec.emergency_id}", json.dumps(asdict(rec)))

    def load(self, active_only: bool = False) -> list[EmergencyRecord]:
        recs = [EmergencyRecord(**json.loads(v))
                for _, v in self._kv.get_prefix("emergencies/records/")]
        if active_only:
            recs = [r for r in recs if r.state != "cleared"]
        return sorted(recs, key=lambda r: r.declared_at_unix_s)

    def append(self, emergency_id: str, events: Iterable[Event]) -> None:
        batch = [{**asdict(e), "detail": e.detail or {}} for e in events]  # as SQLite keeps it
        if not batch:
            return
        self._appended += 1  # keys sort by (epoch, batch): a later leader's come after
        key = f"emergencies/events/{emergency_id}/{self._kv.epoch:015d}-{self._appended:09d}"
        self._kv.put(key, json.dumps(batch))

    def timeline(self, emergency_id: str) -> list[Event]:
        return [Event(**e) for _, v in self._kv.get_prefix(f"emergencies/events/{emergency_id}/")
                for e in json.loads(v)]


class EtcdPlanStore:
    def __init__(self, kv: FencedKV) -> None:
        self._kv = kv

    def close(self) -> None:
        pass

    def save_endpoint(self, name: str, doc: dict[str, Any], now_unix_s: float) -> None:
        self._kv.put(f"endpoints/{name}", json.dumps(doc, sort_keys=True))

    def delete_endpoint(self, name: str) -> bool:
        return self._kv.delete(f"endpoints/{name}")

    def load_endpoints(self) -> list[dict[str, Any]]:
        return [json.loads(v) for _, v in self._kv.get_prefix("endpoints/")]

    # Plans are keyed by creation time, so that the latest few are one bounded range read (the
    # history only grows); plan-keys/<id> finds a plan's key by its id.

    def save_plan(self, plan_id: str, created_at_unix_s: float, state: str,
                  doc: dict[str, Any]) -> None:
        key = f"plans/{created_at_unix_s:020.6f}-{plan_id}"
        self._kv.put_many([(key, json.dumps({"state": state, "doc": doc}, sort_keys=True)),
                           (f"plan-keys/{plan_id}", key)])

    def load_plan(self, plan_id: str) -> dict[str, Any] | None:
        key = self._kv.get(f"plan-keys/{plan_id}")
        value = self._kv.get(key) if key else None
        return json.loads(value)["doc"] if value else None

    def latest_plans(self, limit: int) -> list[dict[str, Any]]:
        return [json.loads(v)["doc"]
                for _, v in self._kv.get_prefix("plans/", limit, descending=True)]

    def plans_in_state(self, state: str) -> list[dict[str, Any]]:
        rows = (json.loads(v) for _, v in self._kv.get_prefix("plans/"))
        return [r["doc"] for r in rows if r["state"] == state]

    def get_setting(self, key: str) -> str | None:
        return self._kv.get(f"settings/{key}")

    def set_setting(self, key: str, value: str) -> None:
        self._kv.put(f"settings/{key}", value)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
