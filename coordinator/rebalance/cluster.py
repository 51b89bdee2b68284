"""The cluster as the rebalance policies see it, from the latest reports: the snapshot, the
effective limits (the topology's, lowered by the emergencies in force), and placement and
routing answers over them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator.core import CoordinatorCore
from coordinator.policy import model as pm
from coordinator.policy.placement import PlaceRequest, RankedNode, place
from coordinator.policy.routing import RouteWeight, RoutingConfig, routing_weights
from coordinator.rebalance.endpoints import Endpoints
from coordinator.rebalance.snapshot import (
    ScopeCut,
    build_snapshot,
    limits_of,
    with_phase2_demand,
)
from shapeshifter.common import errors
from shapeshifter.hw.models import GPU_MODELS

CLASS_WORKLOAD = {"iaas": "opaque", "saas": "flexible", "best_effort": "flexible"}


class ClusterView:
    """cuts: the emergencies in force, each lowering a scope's limits."""

    def __init__(self, core: CoordinatorCore, endpoints: Endpoints,
                 cuts: Callable[[], Sequence[ScopeCut]]) -> None:
        self._core = core
        self._endpoints = endpoints
        self._cuts = cuts

    def snapshot(self) -> pm.ClusterSnapshot:
        demand = self._endpoints.demand()
        records = self._core.registry.records()
        # Phase 2: capacity that emergency caps took is planned elsewhere (as the simulator).
        return build_snapshot(records, self._core.topology, self._endpoints.decls,
                              with_phase2_demand(records, demand), self._core.clock.time())

    def limits(self) -> pm.Limits:
        """The topology's limits, lowered by the emergencies in force."""
        return limits_of(self._core.topology, cuts=self._cuts())

    def place(self, gpus: int, priority_class: str, power_w: float, gpu_type: str
              ) -> tuple[str, list[RankedNode]]:
        if priority_class not in CLASS_WORKLOAD:
            raise errors.InvalidArgument(f"priority_class={priority_class!r} is unknown; "
                                         f"allowed: {', '.join(CLASS_WORKLOAD)}",
                                         field="priority_class")
        if gpu_type and gpu_type not in GPU_MODELS:
            raise errors.InvalidArgument(f"gpu_type={gpu_type!r} is unknown; allowed: "
                                         f"{', '.join(sorted(GPU_MODELS))}", field="gpu_type")
        if power_w == 0:  # not predicted: the GPUs' TDP
            types = [gpu_type] if gpu_type else list(GPU_MODELS)
            power_w = gpus * max(GPU_MODELS[t].idle_power_w + GPU_MODELS[t].dynamic_power_max_w
                                 for t in types)
        workload = CLASS_WORKLOAD[priority_class]
        request = PlaceRequest(gpus, power_w, workload, gpu_type)
        return workload, place(request, self.snapshot(), self.limits())

    def routes(self, endpoint: str, mode: str) -> list[tuple[RouteWeight, str]]:
        """Weights of the endpoint's instances, each with its URL ("" when not known)."""
        config = RoutingConfig(mode=mode or "latency")
        weights = routing_weights(endpoint, self.snapshot(), self.limits(), config)
        return [(w, self._url(w.node_id, w.instance_id)) for w in weights]

    def _url(self, node_id: str, instance_id: str) -> str:
        rec = self._core.registry.get(node_id)
        for inst in rec.report.instances if rec.report is not None else ():
            if inst.spec.instance_id == instance_id and inst.spec.port:
                return f"http://{rec.hostname or node_id}:{inst.spec.port}"
        return ""
