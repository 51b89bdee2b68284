"""The coordinator's domain core: registration, report ingest, leases, operator actions, audit.

Both gRPC servicers (agent link and admin API) only translate and call into this object. It runs
on the server's event loop; nothing here blocks for long (SQLite writes are small and batched).
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass

import structlog
from google.protobuf import json_format

from coordinator import leases
from coordinator.registry import NodeRecord, Registry
from coordinator.rpc import agent_codec
from coordinator.session import AgentSession
from coordinator.state import ClusterRollups, NodeView, rollup
from coordinator.store.sqlite import AuditRecord, Store
from coordinator.validation import validate_action
from shapeshifter.api.v1 import agent_pb2, link_pb2
from shapeshifter.common import errors
from shapeshifter.common.clock import Clock
from shapeshifter.topology import Topology

_ERRORS_BY_CODE: dict[str, type[errors.DomainError]] = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "NOT_FOUND": errors.NotFound,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "UNAUTHENTICATED": errors.Unauthenticated,
    "UNAVAILABLE": errors.Unavailable,
}


def error_for_code(code: str, message: str) -> errors.DomainError:
    """The domain error for an agent's ActionResult.code (INTERNAL for anything else)."""
    return _ERRORS_BY_CODE.get(code, errors.Internal)(message)


@dataclass(frozen=True)
class IngestSnapshot:
    reports_total: int
    window_reports: int
    delay_p50_s: float
    delay_p99_s: float
    delay_max_s: float


class IngestStats:
    """Send-to-visible delay of recent reports (bounded window) and the total count."""

    def __init__(self, window: int = 200_000) -> None:
        self.reports_total = 0
        self._delays_s: deque[float] = deque(maxlen=window)

    def record(self, delay_s: float) -> None:
        self.reports_total += 1
        self._delays_s.append(delay_s)

    def snapshot(self, reset: bool = False) -> IngestSnapshot:
        d = sorted(self._delays_s)
        if reset:
            self._delays_s.clear()

        def q(frac: float) -> float:
            return d[min(len(d) - 1, int(frac * len(d)))] if d else 0.0

        return IngestSnapshot(self.reports_total, len(d), q(0.5), q(0.99), d[-1] if d else 0.0)


class CoordinatorCore:
    def __init__(self, topology: Topology, store: Store, clock: Clock, *, epoch: int,
                 lease_policy: leases.LeasePolicy, action_timeout_s: float = 30.0,
                 instance_action_timeout_s: float = 600.0) -> None:
        self.topology = topology
        self.store = store
        self.clock = clock
        self.epoch = epoch
        self.lease_policy = lease_policy
        self.action_timeout_s = action_timeout_s
        # Engine actions wait for READY (64 s for the tiny model on a 2-core CPU; minutes for a
        # large model on GPUs), so they get their own, longer deadline.
        self.instance_action_timeout_s = instance_action_timeout_s
        self.registry = Registry(topology, clock)
        self.ingest_stats = IngestStats()
        self._log = structlog.get_logger().bind(component="coordinator")
        self.registry.restore(store.load_nodes(), store.load_leases())

    # ---------------------------------------------------------------- agent link

    def register(self, msg: link_pb2.Register,
                 session: AgentSession) -> tuple[NodeRecord, link_pb2.Registered]:
        if not msg.node_id:
            raise errors.InvalidArgument("register.node_id must not be empty", field="node_id")
        rec = self.registry.register(msg, session)
        self.store.save_nodes([rec.stored()])
        known = rec.placement is not None
        note = "" if known else f"labels {dict(msg.labels)} match no rack of the topology"
        self._log.info("node_registered", node_id=rec.node_id, labels=rec.labels,
                       topology_known=known, gpus=len(msg.gpus), version=msg.software_version)
        if not known:
            self._log.warning("node_topology_unknown", node_id=rec.node_id, labels=rec.labels)
        return rec, agent_codec.registered(rec.node_id, self.epoch, known, note)

    def report(self, rec: NodeRecord, report: link_pb2.NodeReport) -> agent_pb2.Lease | None:
        """Ingest one report; returns a lease to send when a (re)grant or renewal is due."""
        if not self.registry.ingest(rec, report):
            return None
        if report.sent_at_unix_s > 0:
            self.ingest_stats.record(self.clock.time() - report.sent_at_unix_s)
        now = self.clock.monotonic()
        if not self.lease_policy.renewal_due(rec.lease_sent_mono_s, now):
            return None
        return self._grant(rec, now)

    def _grant(self, rec: NodeRecord, now_mono_s: float) -> agent_pb2.Lease:
        caps_w = leases.normal_caps_w(rec.current_gpus())
        fresh = (rec.lease is None or rec.lease.epoch != self.epoch
                 or dict(rec.lease.gpu_power_limit_w) != caps_w)
        if fresh:
            rec.grants += 1
            rec.lease = agent_codec.lease(rec.node_id, self.epoch, rec.grants,
                                          self.lease_policy.ttl_s, caps_w)
            self.store.save_lease(rec.node_id, rec.lease, self.clock.time())
            self._log.info("lease_granted", node_id=rec.node_id, lease_id=rec.lease.lease_id,
                           ttl_s=rec.lease.ttl_s)
        rec.lease_sent_mono_s = now_mono_s
        return rec.lease

    def plan_result(self, rec: NodeRecord, session: AgentSession,
                    result: agent_pb2.ApplyPlanResponse) -> None:
        if not session.resolve(result):
            self._log.warning("plan_result_unexpected", node_id=rec.node_id, plan_id=result.plan_id)

    def close_sessions(self) -> None:
        """End every agent stream (shutdown): the agents redial and fall back on their leases."""
        for rec in self.registry.records():
            if rec.session is not None:
                rec.session.close()

    def disconnect(self, rec: NodeRecord, session: AgentSession) -> None:
        if self.registry.detach(rec, session):
            self._log.info("node_disconnected", node_id=rec.node_id)

    # ---------------------------------------------------------------- admin

    def cluster(self, views: list[NodeView] | None = None) -> ClusterRollups:
        """Rollups of a snapshot (default: now). Pure given the views: may run off the loop."""
        return rollup(self.topology, self.registry.views() if views is None else views)

    async def pass_through(self, node_id: str, action: agent_pb2.Action,
                           actor: str) -> agent_pb2.ActionResult:
        """Validate, send as a one-action plan over the node's stream, await, audit either way."""
        name = action.WhichOneof("kind") or ""
        action.action_id = action.action_id or uuid.uuid4().hex
        request_json = json_format.MessageToJson(action, indent=None,
                                                 preserving_proto_field_name=True,
                                                 always_print_fields_with_no_presence=True)
        try:
            result = await self._send_action(node_id, action)
        except errors.DomainError as err:
            self._audit(node_id, name, request_json, False, errors.grpc_code(err).name, str(err),
                        actor)
            raise
        self._audit(node_id, name, request_json, True, "OK", result.message, actor)
        return result

    async def _send_action(self, node_id: str, action: agent_pb2.Action) -> agent_pb2.ActionResult:
        rec = self.registry.get(node_id)
        if rec.report is None:
            raise errors.Unavailable(f"node {node_id} has not reported yet", field="node_id")
        validate_action(rec.report, action)
        if rec.session is None or rec.session.closed:
            raise errors.Unavailable(f"node {node_id} is not connected", field="node_id")
        plan = agent_codec.plan([action], self.epoch, "operator pass-through")
        kind = action.WhichOneof("kind") or ""
        timeout_s = (self.instance_action_timeout_s if kind.endswith("_instance")
                     else self.action_timeout_s)
        resp = await rec.session.apply_plan(plan, timeout_s)
        if not resp.results:
            raise errors.Internal(f"node {node_id} answered plan {plan.plan_id} without results")
        result = resp.results[0]
        if not result.ok:
            raise error_for_code(result.code, result.message)
        return result

    def _audit(self, node_id: str, action: str, request_json: str, ok: bool, code: str,
               message: str, actor: str) -> None:
        self.store.append_audit(self.clock.time(), self.epoch, node_id, action, request_json, ok,
                                code, message, actor)
        self._log.info("action_audited", node_id=node_id, action=action, ok=ok, code=code,
                       actor=actor)

    def audit(self, limit: int, node_id: str) -> list[AuditRecord]:
        return self.store.list_audit(limit or 100, node_id)

    # ---------------------------------------------------------------- persistence

    def flush(self, limit: int | None = None) -> int:
        """Write up to limit changed nodes (all by default) in one transaction. A small limit
        bounds how long the event loop is held (~0.1 ms per node); FIFO, so none starves."""
        taken = self.registry.take_dirty(limit)
        try:
            self.store.save_nodes([r.stored() for r in taken])
        except BaseException:
            for r in taken:  # written next time
                self.registry.mark_dirty(r)
            raise
        return len(taken)
