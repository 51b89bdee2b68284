"""Hostile input (issue 9): hypothesis over every NodeAgent and Coordinator RPC's request (the
servicers in-process over a sim agent), the AgentLink registration/report ingest, the agent config
and the topology parser. Every case ends in success or a clear refusal, never a crash, and a
refusal changes nothing (tests/hostile.py). bench/fuzz.py runs the same with 10,000+ cases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from shapeshifter.api.v1 import link_pb2 as lpb
from tests import hostile

FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hostile.CoordinatorHarness]:
    harness = hostile.make_coordinator(tmp_path_factory.mktemp("hostile"))
    yield harness
    harness.close()


def _assert_clear(verdict: hostile.Verdict) -> None:
    assert not verdict.crashed, verdict.detail


@pytest.mark.parametrize("method", sorted(hostile.agent_methods()))
def test_agent_rpc_hostile_requests(coordinator: hostile.CoordinatorHarness, method: str) -> None:
    cls = hostile.agent_methods()[method]

    @FAST
    @given(hostile.proto(cls))
    def check(request: object) -> None:
        _assert_clear(coordinator.agent.call(method, request))  # type: ignore[arg-type]

    check()


@pytest.mark.parametrize("method", sorted(hostile.coordinator_methods()))
def test_coordinator_rpc_hostile_requests(coordinator: hostile.CoordinatorHarness,
                                          method: str) -> None:
    cls = hostile.coordinator_methods()[method]

    @FAST
    @given(hostile.proto(cls))
    def check(request: object) -> None:
        _assert_clear(coordinator.call(method, request))  # type: ignore[arg-type]

    check()


def test_hostile_agent_registration_and_reports(coordinator: hostile.CoordinatorHarness) -> None:
    @FAST
    @given(hostile.proto(lpb.Register), hostile.proto(lpb.NodeReport))
    def check(register: lpb.Register, report: lpb.NodeReport) -> None:
        _assert_clear(coordinator.register(register, report))

    check()


@FAST
@given(hostile.config_trees())
def test_config_trees(tree: dict[str, object]) -> None:
    _assert_clear(hostile.check_config(tree))


@FAST
@given(hostile.topology_trees())
def test_topology_trees(tree: dict[str, object]) -> None:
    _assert_clear(hostile.check_topology_tree(tree))


@FAST
@given(hostile.TOPOLOGY_TEXTS)
def test_topology_texts(text: str) -> None:
    _assert_clear(hostile.check_topology_text(text))


def test_out_of_range_port_is_invalid_argument_not_a_crash(
    coordinator: hostile.CoordinatorHarness, tmp_path: Path
) -> None:
    """Found by bench/fuzz.py: port > 65535 reached bind() (OverflowError) before validation."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_attention_heads": 2}')
    spec = hostile.pb.InstanceSpec(instance_id="a", endpoint="e", model_path=str(model),
                                   devices=["0"], port=70_000)
    verdict = coordinator.agent.call("StartInstance", hostile.pb.StartInstanceRequest(spec=spec))
    assert verdict.outcome == "refused:INVALID_ARGUMENT"


@pytest.mark.parametrize("model_path", ["x" * 300, "/tmp/" + "y" * 5000])
def test_overlong_model_path_is_invalid_argument_not_a_crash(
    coordinator: hostile.CoordinatorHarness, model_path: str
) -> None:
    """Found by bench/fuzz.py --cases 10000: is_dir() raised ENAMETOOLONG (OSError)."""
    spec = hostile.pb.InstanceSpec(instance_id="a", endpoint="e", model_path=model_path,
                                   devices=["0"])
    verdict = coordinator.agent.call("StartInstance", hostile.pb.StartInstanceRequest(spec=spec))
    assert verdict.outcome == "refused:INVALID_ARGUMENT", verdict.detail


def test_refusal_that_changed_state_would_count_as_crash() -> None:
    """The harness itself: a refused call whose state differs is reported, not passed."""
    states = iter([1, 2])

    def refuse() -> None:
        raise hostile.Aborted(hostile.grpc.StatusCode.INVALID_ARGUMENT, "no")

    assert hostile.judge(refuse, lambda: next(states)).crashed
    assert hostile.judge(lambda: 1 / 0, lambda: 0).crashed
    assert not hostile.judge(lambda: None, lambda: 0).crashed
