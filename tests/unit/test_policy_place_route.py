"""place(): filters and ordering (TAPAS §4.5); routing_weights(): zero for at-risk instances."""

from __future__ import annotations

import pytest

from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceState,
    Limits,
    NodeState,
)
from coordinator.policy.placement import PlaceRequest, place
from coordinator.policy.routing import RoutingConfig, routing_weights
from shapeshifter.common.errors import InvalidArgument, NotFound

A100 = "a100-80gb"


def node(node_id: str, row: str, inlet_c: float, *, power_w: float = 2000.0, n: int = 4,
         reserved: tuple[int, ...] = (), temps_c: tuple[float, ...] = ()) -> NodeState:
    gpus = tuple(GpuState(i, A100, power_draw_w=60.0, reserved=i in reserved,
                          temperature_c=temps_c[i] if temps_c else 40.0) for i in range(n))
    return NodeState(node_id, row, f"a-{row}", gpus, inlet_temp_c=inlet_c, power_draw_w=power_w,
                     airflow_cfm=300.0)


NODES = (node("cold", "r1", 20.0), node("mid", "r1", 25.0), node("warm", "r2", 30.0))


@pytest.mark.parametrize(("workload", "order"), [
    ("opaque", ["cold", "mid", "warm"]),  # opaque to cooler servers
    ("flexible", ["warm", "mid", "cold"]),  # flexible to warmer ones
])
def test_ordering_by_temperature(workload: str, order: list[str]) -> None:
    ranked = place(PlaceRequest(1, 300.0, workload), ClusterSnapshot(NODES), Limits())
    assert [r.node_id for r in ranked] == order
    assert all(r.reason for r in ranked)


def test_row_power_filter() -> None:
    limits = Limits(row_power_limit_w={"r1": 4000.0 + 100.0, "r2": 1e6})
    ranked = place(PlaceRequest(1, 400.0, "opaque"), ClusterSnapshot(NODES), limits)
    assert [r.node_id for r in ranked] == ["warm"]  # r1's predicted peak would exceed 4100 W
    ranked = place(PlaceRequest(1, 400.0, "opaque"), ClusterSnapshot(NODES),
                   Limits(aisle_airflow_cfm={"a-r2": 300.0}))
    assert "warm" not in [r.node_id for r in ranked]  # aisle airflow filter


def test_gpu_count_and_thermal_filters() -> None:
    nodes = (node("full", "r1", 20.0, reserved=(0, 1, 2)), node("hot", "r1", 60.0),
             node("ok", "r2", 25.0))
    ranked = place(PlaceRequest(2, 800.0, "opaque"), ClusterSnapshot(nodes), Limits())
    # 'full' has 1 free GPU; 'hot': 60 C + 0.1 C/W x 400 W = 100 C > 84 C
    assert [r.node_id for r in ranked] == ["ok"]
    assert len(ranked[0].gpu_indices) == 2


def test_row_mix_balance_beats_temperature() -> None:
    # r1 already holds only opaque GPUs; another opaque load goes to r2 though r1 is cooler.
    nodes = (node("r1a", "r1", 20.0, reserved=(0, 1)), node("r2a", "r2", 28.0))
    inst = InstanceState("i", "e", "r2a", (0, 1), "m")
    ranked = place(PlaceRequest(1, 300.0, "opaque"), ClusterSnapshot(nodes, (inst,)), Limits())
    assert ranked[0].node_id == "r2a"


def test_bad_request_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        place(PlaceRequest(0, 100.0), ClusterSnapshot(NODES), Limits())
    assert err.value.field == "gpus" and "[1, 64]" in str(err.value)
    with pytest.raises(InvalidArgument, match="workload"):
        place(PlaceRequest(1, 100.0, "weird"), ClusterSnapshot(NODES), Limits())


# ---------------------------------------------------------------------- routing


def _route_snapshot(**inst_kw: object) -> ClusterSnapshot:
    nodes = (node("n1", "r1", 25.0, temps_c=(40.0, 86.0, 40.0, 40.0)),
             node("n2", "r2", 25.0, power_w=9000.0))
    insts = (
        InstanceState("ok", "e", "n1", (0,), "m", kv_cache_usage_frac=0.2),
        InstanceState("hot", "e", "n1", (1,), "m"),  # GPU at 86 C, slowdown 89 - 5 headroom
        InstanceState("slow", "e", "n1", (2,), "m", e2e_latency_p95_s=30.0),  # SLO 20 s
        InstanceState("notready", "e", "n1", (3,), "m", ready=False),
        InstanceState("rowhot", "e", "n2", (0,), "m"),  # row r2 over its limit
        InstanceState("busy", "e", "n2", (1,), "m", kv_cache_usage_frac=0.6),
    )
    return ClusterSnapshot(nodes, insts, (EndpointSpec("e", "m", slo_p95_s=20.0),))


def test_zero_weight_for_at_risk_instances() -> None:
    limits = Limits(row_power_limit_w={"r2": 8000.0})
    weights = {w.instance_id: w for w in routing_weights("e", _route_snapshot(), limits)}
    for risky, word in (("hot", "thermal"), ("slow", "SLO"), ("notready", "ready"),
                        ("rowhot", "power")):
        assert weights[risky].weight == 0.0 and word in weights[risky].reason
    assert weights["ok"].weight == pytest.approx(1.0)  # 'busy' is in the over-limit row too


def test_energy_concentrates_latency_spreads() -> None:
    s = _route_snapshot()
    lat = {w.instance_id: w.weight for w in routing_weights("e", s, Limits())}
    eng = {w.instance_id: w.weight
           for w in routing_weights("e", s, Limits(), RoutingConfig(mode="energy"))}
    assert lat["ok"] > lat["busy"] and eng["busy"] > eng["ok"]
    assert sum(lat.values()) == pytest.approx(1.0) and sum(eng.values()) == pytest.approx(1.0)


def test_routing_unknown_endpoint_and_bad_mode() -> None:
    with pytest.raises(NotFound):
        routing_weights("nope", _route_snapshot())
    with pytest.raises(InvalidArgument, match="mode"):
        routing_weights("e", _route_snapshot(), config=RoutingConfig(mode="fastest"))


def _capped_snapshot(cap_w: float) -> ClusterSnapshot:
    gpus = (GpuState(0, A100, emergency_cap_w=cap_w), GpuState(1, A100))
    n = NodeState("n1", "r1", "a1", gpus, power_draw_w=2000.0)
    insts = (InstanceState("capped", "e", "n1", (0,), "m"),
             InstanceState("free", "e", "n1", (1,), "m"))
    return ClusterSnapshot((n,), insts, (EndpointSpec("e", "m"),))


def test_instances_on_emergency_capped_gpus_get_less_traffic_not_none() -> None:
    limits = Limits(row_power_limit_w={"r1": 2500.0})  # under the (reduced) limit: no risk
    same = {w.instance_id: w.weight for w in routing_weights("e", _capped_snapshot(0.0), limits)}
    assert same["capped"] == pytest.approx(same["free"])
    weights = {w.instance_id: w for w in routing_weights("e", _capped_snapshot(250.0), limits)}
    assert weights["capped"].weight == pytest.approx(weights["free"].weight / 2)
    assert weights["capped"].weight > 0 and "emergency cap of 250 W" in weights["capped"].reason
    quarter = routing_weights("e", _capped_snapshot(250.0), limits,
                              RoutingConfig(capped_weight_frac=0.25))
    assert quarter[0].weight == pytest.approx(quarter[1].weight / 4)  # sorted: capped, free
    at_risk = routing_weights("e", _capped_snapshot(250.0), Limits(row_power_limit_w={"r1": 2000}))
    assert all(w.weight == 0.0 and "power" in w.reason for w in at_risk)


def test_bad_capped_weight_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"capped_weight_frac.*\(0") as err:
        routing_weights("e", _capped_snapshot(250.0), config=RoutingConfig(capped_weight_frac=0))
    assert err.value.field == "capped_weight_frac"


def test_phase2_throughput_sets_the_capped_weight() -> None:
    """With Phase 2's relative throughput at the cap's clock known, the capped instance keeps
    that share of its weight (not the configured constant)."""
    gpus = (GpuState(0, A100, emergency_cap_w=200.0, capped_throughput_frac=0.8),
            GpuState(1, A100))
    snap = ClusterSnapshot((NodeState("n1", "r1", "a1", gpus, power_draw_w=2000.0),),
                           (InstanceState("capped", "e", "n1", (0,), "m"),
                            InstanceState("free", "e", "n1", (1,), "m")),
                           (EndpointSpec("e", "m"),))
    w = {x.instance_id: x for x in routing_weights("e", snap, Limits())}
    assert w["capped"].weight == pytest.approx(0.8 * w["free"].weight)
    assert "x0.8" in w["capped"].reason
