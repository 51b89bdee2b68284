"""Leases: the coordinator's grant policy and the agent's standalone/leased/failsafe machine."""

from __future__ import annotations

import pytest
import structlog

from coordinator.leases import LeasePolicy, normal_caps_w
from coordinator.rpc.agent_codec import lease as make_lease
from nodeagent.safety.lease import LeaseKeeper
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import InvalidArgument, Unavailable

FAILSAFE_W = {0: 280.0, 1: 300.0}


class FakeCeilings:
    """Records ceilings per (source, gpu); can be told to fail the next writes."""

    def __init__(self) -> None:
        self.ceilings: dict[str, dict[int, float]] = {}
        self.fail_next = 0
        self.calls = 0

    def set_power_ceilings_w(self, ceilings: dict[int, float | None],
                             source: str) -> dict[int, bool]:
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1
            raise Unavailable("gpu lost")
        mine = self.ceilings.setdefault(source, {})
        for i, w in ceilings.items():
            if w is None:
                mine.pop(i, None)
            else:
                mine[i] = w
        return dict.fromkeys(ceilings, True)

    def effective(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for caps in self.ceilings.values():
            for i, w in caps.items():
                out[i] = min(w, out.get(i, w))
        return out


def lease(epoch: int = 1, ttl_s: float = 2.0, grant: int = 1) -> agent_pb2.Lease:
    return make_lease("n1", epoch, grant, ttl_s, {0: 700.0, 1: 700.0})


@pytest.fixture
def keeper() -> tuple[LeaseKeeper, FakeCeilings, ManualClock]:
    sink, clock = FakeCeilings(), ManualClock()
    return LeaseKeeper(sink, FAILSAFE_W, clock, structlog.get_logger()), sink, clock


def test_policy_renews_every_third_of_ttl_and_checks_range() -> None:
    p = LeasePolicy(ttl_s=3.0)
    assert p.renewal_due(None, 0.0)
    assert not p.renewal_due(10.0, 10.9)
    assert p.renewal_due(10.0, 11.0)
    with pytest.raises(InvalidArgument, match=r"lease_ttl_s=0.1 s is outside .*\[0.5, 3600\]"):
        LeasePolicy(ttl_s=0.1)


def test_normal_caps_are_each_gpus_max_limit() -> None:
    gpus = [agent_pb2.Gpu(index=0, power_limit_max_w=400.0),
            agent_pb2.Gpu(index=3, power_limit_max_w=700.0)]
    assert normal_caps_w(gpus) == {0: 400.0, 3: 700.0}
    lease_pb = make_lease("n1", 7, 2, 5.0, normal_caps_w(gpus))
    assert (lease_pb.lease_id, lease_pb.epoch, lease_pb.ttl_s) == ("n1/e7/g2", 7, 5.0)


def test_standalone_until_first_lease(keeper) -> None:
    k, sink, clock = keeper
    clock.advance(100.0)
    k.tick()
    assert k.state == "standalone" and sink.calls == 0
    assert k.view().lease is None


def test_lease_expiry_applies_failsafe_and_renewal_restores(keeper) -> None:
    k, sink, clock = keeper
    assert k.grant(lease())
    assert k.state == "leased" and sink.effective() == {0: 700.0, 1: 700.0}
    clock.advance(1.5)
    k.grant(lease())  # renewal: expiry moves to 3.5
    clock.advance(1.9)
    k.tick()
    assert k.state == "leased"
    assert k.view().lease.remaining_s == pytest.approx(0.1)
    clock.advance(0.2)
    k.tick()
    assert k.state == "failsafe" and sink.effective() == FAILSAFE_W
    assert "lease" not in sink.ceilings or not sink.ceilings["lease"]
    assert k.view().lease.remaining_s == 0.0
    k.grant(lease(epoch=2))
    assert k.state == "leased" and sink.effective() == {0: 700.0, 1: 700.0}


def test_stale_epoch_lease_is_refused(keeper) -> None:
    k, _, _ = keeper
    assert k.grant(lease(epoch=5))
    assert not k.grant(lease(epoch=4, grant=9))
    assert k.view().lease.lease_id == "n1/e5/g1"


def test_failed_ceiling_write_is_retried_and_state_stays_honest(keeper) -> None:
    k, sink, clock = keeper
    k.grant(lease())
    clock.advance(3.0)
    sink.fail_next = 1
    k.tick()
    assert k.state == "leased"  # the fail-safe caps are not in effect yet: do not claim them
    assert "gpu lost" in k.last_error
    k.tick()
    assert k.state == "failsafe" and sink.effective() == FAILSAFE_W and k.last_error == ""
