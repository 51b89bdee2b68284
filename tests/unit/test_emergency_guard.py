"""The agent's emergency guard: coordinator caps, and the pre-armed fallback on its own."""

from __future__ import annotations

import pytest
import structlog

from nodeagent.safety.emergency import EMERGENCY, FALLBACK, EmergencyGuard
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common.clock import ManualClock
from tests.unit.test_leases import FakeCeilings

LEVELS = {0.9: {0: 600.0}, 0.75: {0: 400.0, 1: 500.0}, 0.5: {0: 200.0, 1: 200.0}}


def prearm_msg(epoch: int = 1) -> agent_pb2.EmergencyPrearm:
    return agent_pb2.EmergencyPrearm(prearm_id="p1", epoch=epoch, levels=[
        agent_pb2.PrearmedLevel(capacity_frac=s, gpu_power_ceiling_w=caps)
        for s, caps in LEVELS.items()])


def directive(active: bool = True, caps: dict[int, float] | None = None, epoch: int = 1,
              capacity_frac: float = 0.75) -> agent_pb2.EmergencyDirective:
    return agent_pb2.EmergencyDirective(
        directive_id="d1", epoch=epoch, emergency_id="e1", active=active,
        capacity_frac=capacity_frac, gpu_power_ceiling_w=caps or {}, has_caps=caps is not None,
        fallback_after_s=1.0)


@pytest.fixture
def guard() -> tuple[EmergencyGuard, FakeCeilings, ManualClock]:
    sink, clock = FakeCeilings(), ManualClock()
    g = EmergencyGuard(sink, [0, 1], clock, structlog.get_logger())
    assert g.prearm(prearm_msg()).completed
    g.link_up(True)
    return g, sink, clock


def test_no_fallback_without_a_declared_emergency(guard) -> None:
    g, sink, clock = guard
    g.link_up(False)
    clock.advance(10)
    g.tick()
    assert sink.effective() == {} and not g.fallback_active


def test_link_lost_during_emergency_applies_prearmed_caps_at_once(guard) -> None:
    g, sink, _ = guard
    g.directive(directive())  # the broadcast
    g.link_up(False)
    assert sink.ceilings[FALLBACK] == LEVELS[0.75]
    assert g.fallback_active


def test_broadcast_without_own_caps_falls_back_after_the_deadline(guard) -> None:
    g, sink, clock = guard
    g.directive(directive(capacity_frac=0.8))
    clock.advance(0.5)
    g.tick()
    assert FALLBACK not in sink.ceilings or sink.ceilings[FALLBACK] == {}
    clock.advance(0.6)
    g.tick()
    assert sink.ceilings[FALLBACK] == LEVELS[0.75]  # the mildest level at or below 0.8


def test_own_caps_replace_the_fallback_and_all_clear_lifts_everything(guard) -> None:
    g, sink, _ = guard
    g.directive(directive())
    g.link_up(False)
    g.link_up(True)
    answer = g.directive(directive(caps={1: 350.0}))
    assert answer.completed and answer.plan_id == "d1" and len(answer.results) >= 2
    assert sink.ceilings[EMERGENCY] == {1: 350.0}
    assert sink.ceilings[FALLBACK] == {} and not g.fallback_active
    assert g.directive(directive(active=False)).completed
    assert sink.effective() == {}


def test_own_caps_received_means_no_deadline_fallback(guard) -> None:
    g, sink, clock = guard
    g.directive(directive())
    g.directive(directive(caps={}))  # covered, nothing to cap on this node
    clock.advance(5)
    g.tick()
    assert sink.effective() == {}


def test_failed_write_is_reported_and_the_fallback_retried(guard) -> None:
    g, sink, _ = guard
    sink.fail_next = 1
    answer = g.directive(directive(caps={0: 300.0, 1: 300.0}))
    assert not answer.completed
    assert [r.ok for r in answer.results] == [False, True]
    assert "gpu 0" in g.last_error
    sink.fail_next = 1
    g.link_up(False)  # fallback write fails once ...
    assert not g.fallback_active and g.last_error
    g.tick()  # ... and is retried
    assert g.fallback_active and sink.ceilings[FALLBACK] == LEVELS[0.75]


def test_stale_epoch_refused_and_changes_nothing(guard) -> None:
    g, sink, _ = guard
    g.directive(directive(epoch=3, caps={0: 500.0}))
    answer = g.directive(directive(epoch=2, active=False))
    assert not answer.completed and answer.results[0].code == "FAILED_PRECONDITION"
    assert sink.ceilings[EMERGENCY] == {0: 500.0}


def test_exposed_only_between_the_broadcast_and_caps_or_fallback(guard) -> None:
    g, _, clock = guard
    assert not g.exposed  # nothing declared
    g.directive(directive())
    assert g.exposed  # declared, nothing in effect yet
    clock.advance(1.1)
    g.tick()
    assert not g.exposed and g.fallback_active  # the deadline fallback covers it
    g.directive(directive(active=False))
    g.directive(directive(caps={0: 300.0}))
    assert not g.exposed  # own caps in effect
