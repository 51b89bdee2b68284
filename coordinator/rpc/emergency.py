"""Emergency admin servicer: proto <-> domain translation only (logic:
coordinator.emergency.controller)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc

from coordinator.emergency.controller import EmergencyController, EmergencyView
from coordinator.rpc.util import actor_of, answer, answer_async
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc
from shapeshifter.net.authz import Principal


def status_pb(v: EmergencyView) -> epb.EmergencyStatus:
    r = v.rec
    return epb.EmergencyStatus(
        emergency_id=r.emergency_id, scope=r.scope, name=r.name, kind=r.kind, state=r.state,
        capacity_frac=r.capacity_frac, normal_limit=r.normal_limit, new_limit=r.new_limit,
        power_limit_w=r.power_limit_w, source=r.source, note=r.note,
        declared_at_unix_s=r.declared_at_unix_s, cleared_at_unix_s=r.cleared_at_unix_s,
        shortfall_w=r.shortfall_w, nodes=v.nodes, nodes_acked=v.nodes_acked,
        scope_power_w=v.scope_power_w, issued_s=v.issued_s, acked_s=v.acked_s,
        under_limit_s=v.under_limit_s,
        timeline=[epb.EmergencyEvent(at_unix_s=e.at_unix_s, t_s=e.at_unix_s - r.declared_at_unix_s,
                                     kind=e.kind, node_id=e.node_id,
                                     detail_json=_json(e.detail)) for e in v.timeline])


def _json(detail: dict[str, Any] | None) -> str:
    return json.dumps(detail or {}, sort_keys=True)


class EmergencyServicer(emergency_pb2_grpc.EmergencyServicer):
    def __init__(self, controller: EmergencyController,
                 identify: Callable[[Any], Principal | None] = lambda _context: None) -> None:
        self._c = controller
        self._identify = identify

    async def DeclareEmergency(self, request: epb.DeclareEmergencyRequest,
                               context: grpc.aio.ServicerContext) -> epb.EmergencyStatus:
        actor = actor_of(context, self._identify)

        async def declare() -> epb.EmergencyStatus:
            return status_pb(await self._c.declare_and_send(
                request.scope, request.name, request.kind, request.capacity_frac,
                request.capacity_w, request.capacity_cfm, request.source, request.note, actor))

        return await answer_async(context, declare)

    async def ClearEmergency(self, request: epb.ClearEmergencyRequest,
                             context: grpc.aio.ServicerContext) -> epb.EmergencyStatus:
        actor = actor_of(context, self._identify)
        return await answer(context, lambda: status_pb(
            self._c.clear(request.emergency_id, request.note, actor)))

    async def GetEmergency(self, request: epb.GetEmergencyRequest,
                           context: grpc.aio.ServicerContext) -> epb.EmergencyStatus:
        return await answer(context, lambda: status_pb(self._c.view(request.emergency_id)))

    async def ListEmergencies(self, request: epb.ListEmergenciesRequest,
                              context: grpc.aio.ServicerContext) -> epb.ListEmergenciesResponse:
        return await answer(context, lambda: epb.ListEmergenciesResponse(
            emergencies=[status_pb(v) for v in self._c.list(request.active_only)],
            prearmed_nodes=self._c.prearmed_nodes))



def add_emergency_service(server: grpc.aio.Server, controller: EmergencyController,
                          identify: Callable[[Any], Principal | None]) -> list[str]:
    """Register the Emergency service; returns its full name (for health and reflection)."""
    emergency_pb2_grpc.add_EmergencyServicer_to_server(EmergencyServicer(controller, identify),
                                                       server)
    return [epb.DESCRIPTOR.services_by_name["Emergency"].full_name]
