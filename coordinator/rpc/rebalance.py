"""Planner, Placement and Routing servicers: proto <-> domain translation only
(logic: coordinator.rebalance.loop)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from coordinator.policy.model import EndpointSpec
from coordinator.rebalance.loop import Rebalancer
from coordinator.rebalance.snapshot import EndpointDecl
from coordinator.rpc.util import Identify, actor_of, answer
from shapeshifter.api.v1 import rebalance_pb2 as rpb
from shapeshifter.api.v1 import rebalance_pb2_grpc


def decl_from_pb(e: rpb.Endpoint) -> EndpointDecl:
    spec = EndpointSpec(
        name=e.name, model=e.model, slo_p95_s=e.slo_p95_s,
        allowed_quantizations=tuple(e.allowed_quantizations) or ("none",),
        priority_class=e.priority_class or "saas", min_instances=e.min_instances,
        max_instances=e.max_instances or 1000)
    return EndpointDecl(spec, e.model_path, e.demand_rps, e.query_class)


def endpoint_pb(d: EndpointDecl, rps: float) -> rpb.Endpoint:
    s = d.spec
    return rpb.Endpoint(
        name=s.name, model=s.model, model_path=d.model_path, slo_p95_s=s.slo_p95_s,
        allowed_quantizations=s.allowed_quantizations, priority_class=s.priority_class,
        min_instances=s.min_instances, max_instances=s.max_instances, demand_rps=d.demand_rps,
        query_class=d.query_class, measured_rps=rps, updated_at_unix_s=d.updated_at_unix_s)


def plan_pb(doc: dict[str, Any], with_stages: bool = True) -> rpb.PlanStatus:
    msg = json_format.ParseDict(doc, rpb.PlanStatus(), ignore_unknown_fields=True)
    if not with_stages:
        del msg.stages[:]
    return msg


class PlannerServicer(rebalance_pb2_grpc.PlannerServicer):
    def __init__(self, r: Rebalancer, identify: Identify) -> None:
        self._r = r
        self._identify = identify

    async def SetEndpoint(self, request: rpb.Endpoint, context: Any) -> rpb.Endpoint:
        actor = actor_of(context, self._identify)
        return await answer(context, lambda: endpoint_pb(
            self._r.set_endpoint(decl_from_pb(request), actor), 0.0))

    async def DeleteEndpoint(self, request: rpb.DeleteEndpointRequest,
                             context: Any) -> rpb.DeleteEndpointResponse:
        actor = actor_of(context, self._identify)
        return await answer(context, lambda: (
            self._r.delete_endpoint(request.name, actor), rpb.DeleteEndpointResponse())[1])

    async def ListEndpoints(self, request: rpb.ListEndpointsRequest,
                            context: Any) -> rpb.ListEndpointsResponse:
        return await answer(context, lambda: rpb.ListEndpointsResponse(
            endpoints=[endpoint_pb(d, rps) for d, rps in self._r.endpoints()]))

    async def ProposePlan(self, request: rpb.ProposePlanRequest, context: Any) -> rpb.PlanStatus:
        actor = actor_of(context, self._identify)
        return await answer(context, lambda: plan_pb(self._r.propose("operator", actor)))

    async def GetPlan(self, request: rpb.GetPlanRequest, context: Any) -> rpb.PlanStatus:
        return await answer(context, lambda: plan_pb(self._r.plan(request.plan_id)))

    async def ListPlans(self, request: rpb.ListPlansRequest,
                        context: Any) -> rpb.ListPlansResponse:
        return await answer(context, lambda: rpb.ListPlansResponse(
            plans=[plan_pb(d, with_stages=False) for d in self._r.plans(request.limit)]))

    async def GetPlanDiff(self, request: rpb.GetPlanRequest, context: Any) -> rpb.PlanDiff:
        def diff() -> rpb.PlanDiff:
            plan_id, lines = self._r.diff(request.plan_id)
            return rpb.PlanDiff(plan_id=plan_id, lines=lines)

        return await answer(context, diff)

    async def ApplyPlan(self, request: rpb.ApplyPlanRequest, context: Any) -> rpb.PlanStatus:
        actor = actor_of(context, self._identify)
        if not request.plan_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "plan_id must not be empty (see `shapectl plan show`)")
        return await answer(context, lambda: plan_pb(self._r.apply(request.plan_id, actor)))

    async def SetMode(self, request: rpb.SetModeRequest, context: Any) -> rpb.ModeStatus:
        actor = actor_of(context, self._identify)
        return await answer(context, lambda: (
            self._r.set_mode(request.mode, actor), self._mode())[1])

    async def GetMode(self, request: rpb.GetModeRequest, context: Any) -> rpb.ModeStatus:
        return await answer(context, self._mode)

    def _mode(self) -> rpb.ModeStatus:
        mode, interval_s, last_s, last_id = self._r.mode_status()
        return rpb.ModeStatus(mode=mode, interval_s=interval_s, last_run_unix_s=last_s,
                              last_plan_id=last_id)


class PlacementServicer(rebalance_pb2_grpc.PlacementServicer):
    def __init__(self, r: Rebalancer) -> None:
        self._r = r

    async def Place(self, request: rpb.PlaceRequest, context: Any) -> rpb.PlaceResponse:
        def placed() -> rpb.PlaceResponse:
            workload, nodes = self._r.place(request.gpus, request.priority_class,
                                            request.predicted_peak_power_w, request.gpu_type)
            return rpb.PlaceResponse(workload=workload, nodes=[rpb.RankedNode(
                node_id=n.node_id, row=n.row, aisle=n.aisle, gpu_indices=n.gpu_indices,
                inlet_temp_c=n.inlet_temp_c, row_power_after_w=n.row_power_after_w,
                row_mix_opaque_frac_after=n.row_mix_opaque_frac_after, reason=n.reason)
                for n in nodes])

        return await answer(context, placed)


class RoutingServicer(rebalance_pb2_grpc.RoutingServicer):
    def __init__(self, r: Rebalancer) -> None:
        self._r = r

    async def GetRoutingWeights(self, request: rpb.GetRoutingWeightsRequest,
                                context: Any) -> rpb.RoutingWeights:
        return await answer(context, lambda: routing_pb(self._r, request.endpoint,
                                                            request.mode))


def routing_pb(r: Rebalancer, endpoint: str, mode: str) -> rpb.RoutingWeights:
    return rpb.RoutingWeights(endpoint=endpoint, weights=[rpb.RouteWeight(
        instance_id=w.instance_id, node_id=w.node_id, weight=w.weight, reason=w.reason, url=url)
        for w, url in r.routes(endpoint, mode)])


def routes_json(r: Rebalancer, endpoint: str, mode: str) -> dict[str, Any]:
    """The HTTP form of the routing weights (same fields as the gRPC reply)."""
    return json_format.MessageToDict(routing_pb(r, endpoint, mode),
                                     preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def add_rebalance_services(server: grpc.aio.Server, r: Rebalancer,
                           identify: Identify) -> list[str]:
    """Register Planner, Placement and Routing; returns their full names (health, reflection)."""
    rebalance_pb2_grpc.add_PlannerServicer_to_server(PlannerServicer(r, identify), server)
    rebalance_pb2_grpc.add_PlacementServicer_to_server(PlacementServicer(r), server)
    rebalance_pb2_grpc.add_RoutingServicer_to_server(RoutingServicer(r), server)
    return [rpb.DESCRIPTOR.services_by_name[s].full_name
            for s in ("Planner", "Placement", "Routing")]
