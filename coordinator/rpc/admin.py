"""Coordinator admin servicer: proto <-> domain translation and DomainError -> status code only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from coordinator.core import CoordinatorCore
from coordinator.rpc.link import AgentLinkServicer
from coordinator.rpc.util import actor_of, answer_async
from coordinator.state import NodeSummary, Rollup, summarize
from shapeshifter.api.v1 import agent_pb2, coordinator_pb2_grpc
from shapeshifter.api.v1 import coordinator_pb2 as pb
from shapeshifter.net.authz import Principal


# vars(), not dataclasses.asdict(): the types are flat, and asdict's deep copy is slow.
def rollup_pb(r: Rollup) -> pb.Rollup:
    return pb.Rollup(**vars(r))


def summary_pb(s: NodeSummary) -> pb.NodeSummary:
    return pb.NodeSummary(**vars(s))


PassThroughRpc = Callable[[Any, Any, grpc.aio.ServicerContext],
                          Awaitable[agent_pb2.ActionResult]]


def _pass_through(action_field: str) -> PassThroughRpc:
    """An RPC that wraps request.request in Action(<action_field>=...) and has the core forward
    it to request.node_id, audited under the caller's actor."""
    async def rpc(self: CoordinatorServicer, request: Any,
                  context: grpc.aio.ServicerContext) -> agent_pb2.ActionResult:
        action = agent_pb2.Action(**{action_field: request.request})
        actor = actor_of(context, self._identify)
        return await answer_async(
            context, lambda: self._core.pass_through(request.node_id, action, actor))

    rpc.__name__ = rpc.__qualname__ = f"pass_through_{action_field}"
    return rpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, core: CoordinatorCore, link: AgentLinkServicer,
                 identify: Callable[[Any], Principal | None] = lambda _context: None) -> None:
        """identify: the authenticated caller (coordinator.security.caller); None: auth off."""
        self._core = core
        self._link = link
        self._identify = identify

    async def ListNodes(self, request: pb.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListNodesResponse:
        c = self._core.cluster()
        return pb.ListNodesResponse(nodes=[summary_pb(s) for s in c.nodes])

    async def GetNode(self, request: pb.GetNodeRequest,
                      context: grpc.aio.ServicerContext) -> pb.NodeStatus:
        async def get() -> pb.NodeStatus:
            rec = self._core.registry.get(request.node_id)
            view = self._core.registry.view(rec)
            return pb.NodeStatus(summary=summary_pb(summarize(view, self._core.topology.liveness)),
                                 last_report=rec.report, lease=rec.lease)

        return await answer_async(context, get)

    async def GetCluster(self, request: pb.GetClusterRequest,
                         context: grpc.aio.ServicerContext) -> pb.ClusterStatus:
        # On the loop, not in a thread: a rollup thread holding the GIL slows ingest far more
        # (measured with bench/coordinator_fanin.py) than the few ms per 1000 nodes it takes.
        c = self._core.cluster()
        return pb.ClusterStatus(
            rows=[rollup_pb(r) for r in c.rows], aisles=[rollup_pb(r) for r in c.aisles],
            racks=[rollup_pb(r) for r in c.racks], sites=[rollup_pb(r) for r in c.sites],
            nodes=[summary_pb(s) for s in c.nodes], epoch=self._core.epoch,
            generated_at_unix_s=self._core.clock.time(),
        )

    # Node actions forwarded over the node's link: (node_id, request) -> Action(<field>=request).
    SetPowerLimit = _pass_through("set_power_limit")
    LockClocks = _pass_through("lock_clocks")
    ResetClocks = _pass_through("reset_clocks")
    ApplyMigLayout = _pass_through("apply_mig_layout")
    SetMigMode = _pass_through("set_mig_mode")
    StartInstance = _pass_through("start_instance")
    StopInstance = _pass_through("stop_instance")
    ReconfigureInstance = _pass_through("reconfigure_instance")

    async def ListInstances(self, request: pb.NodeListInstancesRequest,
                            context: grpc.aio.ServicerContext) -> agent_pb2.ListInstancesResponse:
        async def listed() -> agent_pb2.ListInstancesResponse:
            rec = self._core.registry.get(request.node_id)
            report = rec.report or agent_pb2.Node()
            return agent_pb2.ListInstancesResponse(instances=report.instances)

        return await answer_async(context, listed)

    async def ListAudit(self, request: pb.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListAuditResponse:
        entries = self._core.audit(request.limit, request.node_id)
        return pb.ListAuditResponse(entries=[pb.AuditEntry(**vars(e)) for e in entries])

    async def GetIngestStats(self, request: pb.GetIngestStatsRequest,
                             context: grpc.aio.ServicerContext) -> pb.IngestStats:
        s = self._core.ingest_stats.snapshot(reset=request.reset_window)
        return pb.IngestStats(
            reports_total=s.reports_total, window_reports=s.window_reports,
            delay_p50_ms=s.delay_p50_s * 1e3, delay_p99_ms=s.delay_p99_s * 1e3,
            delay_max_ms=s.delay_max_s * 1e3, connected_agents=self._link.connected,
            epoch=self._core.epoch,
        )
