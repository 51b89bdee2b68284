from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.journal import Journal
from nodeagent.device.sim import SimulatedBackend
from nodeagent.engines.types import EngineLoad
from nodeagent.rpc.codec import node_to_pb
from nodeagent.telemetry.sampler import NodeIdentity, Sampler
from shapeshifter.common.clock import ManualClock, SystemClock


class NullLog:
    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


def make(tmp_path: Path, clock: Any, backend: Any = None, **kwargs: Any) -> Sampler:
    backend = backend or SimulatedBackend("a100-40gb", 2, clock)
    actuator = Actuator(backend, Journal.open(tmp_path), clock, NullLog())
    identity = NodeIdentity("n1", {"row": "r1"}, "sim", "0.1", hostname="h")
    return Sampler(backend, actuator, identity, clock, NullLog(), **kwargs)


def test_snapshot_has_budgets_and_engine_loads(tmp_path: Path) -> None:
    loads = {1: EngineLoad(requests_running=5, max_num_seqs=64, kv_cache_usage_frac=0.25)}
    sampler = make(tmp_path, ManualClock(), interval_s=1.0, engine_loads=lambda: loads)
    snap = sampler.sample_now()
    assert [g.static.identity.index for g in snap.gpus] == [0, 1]
    assert snap.gpus[1].budget.compute_headroom_requests == 59
    assert snap.gpus[1].budget.kv_cache_usage_frac == 0.25
    assert snap.gpus[0].budget.kv_cache_usage_frac == -1
    assert snap.budget.node_power_w > snap.budget.gpu_power_w
    assert sampler.peek() is snap and snap.safety.state == "standalone"


def test_failing_sample_still_pings_and_keeps_last_snapshot(tmp_path: Path) -> None:
    clock = ManualClock()
    pings: list[int] = []
    backend = SimulatedBackend("a100-40gb", 1, clock)
    sampler = make(tmp_path, clock, backend, interval_s=1.0, watchdog_ping=lambda: pings.append(1))
    sampler.tick()
    good = sampler.peek()
    backend.telemetry = lambda index: (_ for _ in ()).throw(RuntimeError("gpu lost"))  # type: ignore[method-assign]
    sampler.tick()
    assert sampler.peek() is good and len(pings) == 2


def test_loop_pings_between_long_intervals_and_stops(tmp_path: Path) -> None:
    pinged = threading.Event()
    count: list[int] = []

    def ping() -> None:
        count.append(1)
        if len(count) >= 3:
            pinged.set()

    sampler = make(
        tmp_path, SystemClock(), interval_s=60.0, watchdog_ping=ping, watchdog_interval_s=0.2
    )
    sampler.start()
    try:
        assert pinged.wait(20), "the loop stopped pinging while waiting for its next sample"
    finally:
        sampler.stop()
    assert sampler._thread is not None and not sampler._thread.is_alive()


def test_node_proto_shows_both_power_layers(tmp_path: Path) -> None:
    clock = ManualClock()
    backend = SimulatedBackend("a100-40gb", 2, clock)
    actuator = Actuator(backend, Journal.open(tmp_path), clock, NullLog())
    actuator.capture_defaults()
    sampler = Sampler(
        backend, actuator, NodeIdentity("n", {}, "sim", "0"), clock, NullLog(), interval_s=1
    )
    actuator.set_power_limit(1, 350)
    actuator.set_power_ceilings_w({1: 250.0}, "thermal")
    g = node_to_pb(sampler.sample_now()).gpus[1]
    assert (g.power_limit_requested_w, g.power_ceiling_w, g.power_ceiling_source) == (
        350,
        250,
        "thermal",
    )
    assert g.power_limit_w == 250
    assert node_to_pb(sampler.sample_now()).gpus[0].power_ceiling_source == ""


def test_fresh_reuses_a_young_snapshot_until_the_engine_loads_change(tmp_path: Path) -> None:
    loads: dict[int, EngineLoad] = {}
    sampler = make(tmp_path, ManualClock(), interval_s=10.0, engine_loads=lambda: loads)
    first = sampler.fresh()
    loads[0] = EngineLoad(requests_running=3, requests_waiting=2, max_num_seqs=4)
    assert sampler.fresh() is first  # younger than one interval and nothing marked
    sampler.mark_stale()
    second = sampler.fresh()
    assert second is not first and second.gpus[0].budget.requests_in_flight == 5
    assert sampler.fresh() is second  # one resample per mark
