"""The coordinator's in-memory record of every node: identity, latest report, lease, session.

Ingesting a report is cheap on purpose (store the message, stamp the time, sum its load once,
queue the node for persistence): rollups are computed from ``views()`` when someone asks, and
SQLite writes are batched from ``take_dirty()`` in FIFO order, so every node gets written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from coordinator.session import AgentSession
from coordinator.state import NodeLoad, NodeView, node_load
from coordinator.store.sqlite import StoredNode
from shapeshifter.api.v1 import agent_pb2, link_pb2
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import NotFound
from shapeshifter.topology import Placement, Topology


@dataclass
class NodeRecord:
    node_id: str
    hostname: str
    labels: dict[str, str]
    software_version: str
    backend: str
    placement: Placement | None
    registered_at_unix_s: float
    last_seen_mono_s: float
    last_seen_unix_s: float
    gpus: list[agent_pb2.Gpu] = field(default_factory=list)  # from the registration
    report: agent_pb2.Node | None = None
    # When this process received `report` (its clock; 0 = restored from the database): what
    # freshness is judged by, since agents' own timestamps may be skewed.
    report_received_unix_s: float = 0.0
    load: NodeLoad | None = None  # node_load(report), computed once per report at ingest
    seq: int = 0
    lease: agent_pb2.Lease | None = None
    lease_sent_mono_s: float | None = None
    grants: int = 0
    session: AgentSession | None = None
    dirty: bool = False  # queued for the next SQLite batch

    def stored(self) -> StoredNode:
        return StoredNode(self.node_id, self.hostname, dict(self.labels), self.software_version,
                          self.backend, self.registered_at_unix_s, self.last_seen_unix_s,
                          self.report)

    def current_gpus(self) -> list[agent_pb2.Gpu]:
        return list(self.report.gpus) if self.report is not None else self.gpus


class Registry:
    def __init__(self, topology: Topology, clock: Clock) -> None:
        self.topology = topology
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}
        self._dirty: deque[NodeRecord] = deque()  # each record at most once (its dirty flag)

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> NodeRecord:
        rec = self._nodes.get(node_id)
        if rec is None:
            raise NotFound(f"node_id={node_id!r} is not a known node", field="node_id")
        return rec

    def register(self, msg: link_pb2.Register, session: AgentSession) -> NodeRecord:
        """Create or refresh a node from its Register message and attach its stream."""
        now_mono, now_unix = self._clock.monotonic(), self._clock.time()
        labels = dict(msg.labels)
        rec = self._nodes.get(msg.node_id)
        if rec is None:
            rec = NodeRecord(msg.node_id, msg.hostname, labels, msg.software_version, msg.backend,
                             self.topology.place(labels), now_unix, now_mono, now_unix)
            self._nodes[msg.node_id] = rec
        rec.hostname, rec.labels = msg.hostname, labels
        rec.software_version, rec.backend = msg.software_version, msg.backend
        rec.placement = self.topology.place(labels)
        rec.gpus = list(msg.gpus)
        rec.last_seen_mono_s, rec.last_seen_unix_s = now_mono, now_unix
        rec.seq = 0  # a new stream starts its own sequence
        rec.lease_sent_mono_s = None
        if rec.session is not None and rec.session is not session:
            rec.session.close()  # a reconnect replaces a stream the server has not seen end yet
        rec.session = session
        self.mark_dirty(rec)
        return rec

    def ingest(self, rec: NodeRecord, report: link_pb2.NodeReport) -> bool:
        """Keep a report as the node's latest; False (ignored) when it is older than the last."""
        if report.seq and report.seq <= rec.seq:
            return False
        rec.seq = report.seq
        rec.report = report.node
        # Summed once here, so a rollup over thousands of nodes only adds a few floats per node.
        rec.load = node_load(report.node)
        rec.last_seen_mono_s = self._clock.monotonic()
        rec.last_seen_unix_s = rec.report_received_unix_s = self._clock.time()
        self.mark_dirty(rec)
        return True

    def detach(self, rec: NodeRecord, session: AgentSession) -> bool:
        """Close a stream's session; True when it was the node's current one."""
        session.close()
        if rec.session is not session:
            return False  # already replaced by a newer stream of the same node
        rec.session = None
        return True

    def view(self, rec: NodeRecord, now_mono_s: float | None = None) -> NodeView:
        now = self._clock.monotonic() if now_mono_s is None else now_mono_s
        return NodeView(rec.node_id, rec.labels, rec.placement, rec.report,
                        max(0.0, now - rec.last_seen_mono_s), rec.load)

    def views(self) -> list[NodeView]:
        """A snapshot; safe from other threads (the metrics scrape) as list() copies at once."""
        now = self._clock.monotonic()
        return [self.view(r, now) for r in list(self._nodes.values())]

    def records(self) -> list[NodeRecord]:
        return list(self._nodes.values())

    def mark_dirty(self, rec: NodeRecord) -> None:
        if not rec.dirty:
            rec.dirty = True
            self._dirty.append(rec)

    def take_dirty(self, limit: int | None = None) -> list[NodeRecord]:
        """Up to limit records changed since they were last taken, oldest change first."""
        n = len(self._dirty) if limit is None else min(limit, len(self._dirty))
        taken = [self._dirty.popleft() for _ in range(n)]
        for rec in taken:
            rec.dirty = False
        return taken

    def restore(self, nodes: list[StoredNode], leases: dict[str, agent_pb2.Lease]) -> None:
        """Reload persisted nodes; their age continues from the stored last-seen wall time."""
        now_mono, now_unix = self._clock.monotonic(), self._clock.time()
        for n in nodes:
            age_s = max(0.0, now_unix - n.last_seen_unix_s)
            self._nodes[n.node_id] = NodeRecord(
                n.node_id, n.hostname, n.labels, n.software_version, n.backend,
                self.topology.place(n.labels), n.registered_at_unix_s, now_mono - age_s,
                n.last_seen_unix_s, report=n.last_report, lease=leases.get(n.node_id), dirty=False,
            )
