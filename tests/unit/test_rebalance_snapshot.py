"""Reports -> policy snapshot, measured demand and its smoothing, endpoint validation, store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from coordinator.policy.model import EndpointSpec
from coordinator.profiles.schema import QueryClass
from coordinator.rebalance.snapshot import (
    DemandEstimator,
    EndpointDecl,
    emergency_cap_w,
    infer_class,
    instance_states,
    measured_rps,
    validate_decl,
)
from coordinator.store.plans import PlanStore
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common.errors import InvalidArgument


@pytest.mark.parametrize(("prompt", "gen", "expected"), [
    (1000.0, 50.0, QueryClass.LISO), (50.0, 1000.0, QueryClass.SILO),
    (100.0, 100.0, QueryClass.SISO)])
def test_class_inferred_from_the_token_ratio(prompt: float, gen: float,
                                             expected: QueryClass) -> None:
    assert infer_class(prompt, gen) is expected


def test_request_rate_from_generated_tokens() -> None:
    m = agent_pb2.InstanceMetrics(prompt_tokens_per_s=2000, generation_tokens_per_s=100)
    assert measured_rps(m) == (QueryClass.LISO, pytest.approx(2.0))  # 50 output tokens each
    assert measured_rps(m, "SILO") == (QueryClass.SILO, pytest.approx(0.1))
    assert measured_rps(agent_pb2.InstanceMetrics())[1] == 0.0


def test_ewma_moves_a_time_constant_fraction_towards_new_samples() -> None:
    est = DemandEstimator(smoothing_s=10.0)
    est.observe("e", {QueryClass.LISO: 4.0}, now_s=0.0)
    est.observe("e", {QueryClass.LISO: 0.0}, now_s=10.0)
    assert est.demand("e")[QueryClass.LISO] == pytest.approx(4.0 * math.exp(-1))


def test_instances_from_a_report_resolve_model_and_mig_slices() -> None:
    decl = EndpointDecl(EndpointSpec("tiny", "tiny"), model_path="/m/tiny")
    node = agent_pb2.Node(gpus=[agent_pb2.Gpu(index=0, gpu_type="a100-80gb"),
                                agent_pb2.Gpu(index=1, gpu_type="a100-80gb", mig_enabled=True,
                                              mig_instances=[agent_pb2.MigInstance(
                                                  profile="3g.40gb", uuid="MIG-x")])])
    node.instances.add(spec=agent_pb2.InstanceSpec(instance_id="a", endpoint="tiny",
                                                   model_path="/m/tiny", devices=["0"]),
                       state="READY")
    node.instances.add(spec=agent_pb2.InstanceSpec(instance_id="b", endpoint="tiny",
                                                   model_path="/m/tiny", devices=["MIG-x"]),
                       state="STARTING")
    node.instances.add(spec=agent_pb2.InstanceSpec(instance_id="c", endpoint="tiny",
                                                   devices=["0"]), state="STOPPED")
    a, b = instance_states("n1", node, {"tiny": decl})
    assert (a.model, a.gpu_indices, a.ready, a.mig_profile) == ("tiny", (0,), True, "full")
    assert (b.gpu_indices, b.mig_profile, b.mig_uuid, b.ready) == ((1,), "3g.40gb", "MIG-x",
                                                                    False)


def test_bad_declarations_name_the_field() -> None:
    with pytest.raises(InvalidArgument, match="demand_rps") as err:
        validate_decl(EndpointDecl(EndpointSpec("e", "m"), demand_rps=-1))
    assert err.value.field == "demand_rps"
    with pytest.raises(InvalidArgument) as err:
        validate_decl(EndpointDecl(EndpointSpec("e", "m"), query_class="HUGE"))
    assert err.value.field == "query_class"


def test_declarations_and_plans_survive_a_reopen(tmp_path: Path) -> None:
    decl = EndpointDecl(EndpointSpec("e", "m", allowed_quantizations=("none", "fp8")),
                        demand_rps=2.5, query_class="LISO")
    store = PlanStore(tmp_path / "c.db")
    store.save_endpoint("e", decl.to_doc(), 1.0)
    store.save_plan("p1", 1.0, "proposed", {"plan_id": "p1", "state": "proposed"})
    store.close()
    reopened = PlanStore(tmp_path / "c.db")
    assert [EndpointDecl.from_doc(d) for d in reopened.load_endpoints()] == [decl]
    assert reopened.load_plan("p1") == {"plan_id": "p1", "state": "proposed"}
    assert reopened.latest_plans(5)[0]["plan_id"] == "p1"


@pytest.mark.parametrize(("source", "ceiling_w", "expected_w"), [
    ("emergency", 300.0, 300.0), ("emergency_fallback", 250.0, 250.0),
    ("thermal", 300.0, 0.0),  # the agent's own guard, not a constrained scope
    ("emergency", 700.0, 0.0),  # a last relax step at the maximum caps nothing
    ("", 0.0, 0.0)])
def test_emergency_cap_from_the_reported_ceiling(source: str, ceiling_w: float,
                                                 expected_w: float) -> None:
    gpu = agent_pb2.Gpu(power_limit_max_w=700.0, power_ceiling_w=ceiling_w,
                        power_ceiling_source=source)
    assert emergency_cap_w(gpu) == expected_w
