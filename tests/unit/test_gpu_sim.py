"""SimulatedBackend: the real device's constraints and the physics' response (ManualClock)."""

from __future__ import annotations

import threading

import pytest

from nodeagent.device.backend import GpuBackend
from nodeagent.device.sim import SimulatedBackend
from nodeagent.device.simload import demo_load
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import FailedPrecondition, InUse, InvalidArgument, NotFound
from shapeshifter.hw.models import GPU_MODELS


def make(gpu_type: str = "a100-40gb", n: int = 8, **kw) -> tuple[SimulatedBackend, ManualClock]:
    clock = ManualClock()
    return SimulatedBackend(gpu_type, n, clock, **kw), clock


def snapshot(b: SimulatedBackend, i: int) -> tuple:
    t = b.telemetry(i)
    return (t.power_limit_w, t.sm_clock_mhz, t.power_draw_w, b.mig_state(i))


@pytest.mark.parametrize("gpu_type", sorted(GPU_MODELS))
def test_discovery_matches_the_model(gpu_type: str) -> None:
    b, _ = make(gpu_type, n=4)
    assert isinstance(b, GpuBackend) and b.kind == "sim"
    devs = b.devices()
    m = GPU_MODELS[gpu_type]
    assert [d.index for d in devs] == [0, 1, 2, 3]
    assert all(d.name == m.driver_name and d.gpu_type == gpu_type for d in devs)
    assert len({d.uuid for d in devs}) == 4
    assert b.power_constraints(0) == m.power
    assert b.supported_clocks(0).sm_max_mhz == m.sm_max_clock_mhz
    assert b.telemetry(0).power_limit_w == m.power.default_w


def test_uuids_are_deterministic_and_differ_between_nodes() -> None:
    a1, _ = make(node_name="node-a")
    a2, _ = make(node_name="node-a")
    b, _ = make(node_name="node-b")
    assert [d.uuid for d in a1.devices()] == [d.uuid for d in a2.devices()]
    assert not {d.uuid for d in a1.devices()} & {d.uuid for d in b.devices()}


def test_temperature_offsets_spread_up_to_10c_and_depend_on_seed() -> None:
    b, _ = make(seed=1)
    temps = [b.telemetry(i).temperature_c for i in range(8)]
    assert 0.0 < max(temps) - min(temps) <= 10.0
    other, _ = make(seed=2)
    assert temps != [other.telemetry(i).temperature_c for i in range(8)]


@pytest.mark.parametrize("watts", [99.9, 400.1, -1.0, float("nan")])
def test_out_of_range_power_limit_is_refused_and_changes_nothing(watts: float) -> None:
    b, _ = make()
    before = snapshot(b, 0)
    with pytest.raises(InvalidArgument) as e:
        b.set_power_limit_w(0, watts)
    assert e.value.field == "power_limit_w"
    assert "[100, 400] W" in str(e.value)
    assert snapshot(b, 0) == before


@pytest.mark.parametrize(("lo", "hi", "field"), [(100, 1410, "min_mhz"), (210, 2000, "max_mhz"),
                                                 (1200, 900, "min_mhz")])
def test_bad_clock_range_is_refused(lo: int, hi: int, field: str) -> None:
    b, _ = make()
    before = snapshot(b, 0)
    with pytest.raises(InvalidArgument) as e:
        b.lock_gpu_clocks_mhz(0, lo, hi)
    assert e.value.field == field
    assert snapshot(b, 0) == before


@pytest.mark.parametrize("index", [-1, 8, 99])
def test_unknown_index_is_not_found(index: int) -> None:
    b, _ = make()
    for call in (lambda: b.telemetry(index), lambda: b.set_power_limit_w(index, 300),
                 lambda: b.power_constraints(index), lambda: b.apply_mig_layout(index, [])):
        with pytest.raises(NotFound):
            call()


def test_load_inputs_are_validated() -> None:
    b, _ = make()
    with pytest.raises(InvalidArgument, match="activity"):
        b.set_load(0, 1.5)
    with pytest.raises(InvalidArgument, match="memory_used_mib"):
        b.set_load(0, 0.5, memory_used_mib=50_000)
    with pytest.raises(InvalidArgument, match="decode_frac"):
        b.set_load(0, 0.5, decode_frac=-0.1)
    with pytest.raises(InvalidArgument, match="inlet_temp_c"):
        b.set_inlet_temp_c(80.0)
    assert b.telemetry(0).utilization_gpu_pct == 0.0


def test_idle_gpu_reports_idle_clock_and_power() -> None:
    b, _ = make()
    t = b.telemetry(0)
    m = GPU_MODELS["a100-40gb"]
    assert t.sm_clock_mhz == m.sm_idle_clock_mhz
    assert t.power_draw_w == pytest.approx(m.idle_power_w)
    assert t.throttle_reasons == ("gpu_idle",)


def test_power_cap_lowers_power_and_clock_within_one_sample() -> None:
    b, clock = make("h100-80gb")
    b.set_load(0, 1.0, memory_used_mib=40_000)
    clock.advance(2.0)
    full = b.telemetry(0)
    assert full.sm_clock_mhz == 1980 and full.power_draw_w > 650
    b.set_power_limit_w(0, 350)
    capped = b.telemetry(0)  # no time has passed: electrical response is immediate
    assert capped.power_draw_w <= 350
    assert capped.sm_clock_mhz < full.sm_clock_mhz
    assert "sw_power_cap" in capped.throttle_reasons
    assert b.relative_throughput(0) < 1.0
    clock.advance(1.5)
    assert b.telemetry(0).power_draw_avg_w <= 350  # the 1 s average catches up
    assert capped.memory_used_mib == 40_000


def test_average_power_lags_the_instant_power() -> None:
    b, clock = make()
    b.set_load(0, 1.0)
    clock.advance(0.5)
    t = b.telemetry(0)
    # Half a second at full load: the instant draw is full, the mean over 1 s covers only that.
    assert t.power_draw_w == pytest.approx(400.0)
    assert t.power_draw_avg_w == pytest.approx(400.0)
    b.set_load(0, 0.0)
    clock.advance(0.5)
    t = b.telemetry(0)
    assert t.power_draw_w == pytest.approx(55.0)
    assert 55.0 < t.power_draw_avg_w < 400.0


def test_energy_integrates_power() -> None:
    b, clock = make()
    b.set_load(0, 1.0)
    e0 = b.telemetry(0).energy_j
    clock.advance(10.0)
    assert b.telemetry(0).energy_j - e0 == pytest.approx(4000.0, rel=1e-6)


def test_temperature_lags_then_converges_to_steady_state() -> None:
    b, clock = make("a100-40gb", n=1, inlet_temp_c=25.0)
    cold = b.telemetry(0).temperature_c
    b.set_load(0, 1.0)
    clock.advance(5.0)
    warming = b.telemetry(0).temperature_c
    clock.advance(600.0)
    hot = b.telemetry(0).temperature_c
    m = GPU_MODELS["a100-40gb"]
    rise_c = m.thermal_c_per_w * (400.0 - m.idle_power_w)
    assert hot - cold == pytest.approx(rise_c, abs=0.1)  # steady state = inlet + k*P + offset
    # After 5 s of a 30 s time constant, only ~15% of the way there.
    assert 0.05 * rise_c < warming - cold < 0.3 * rise_c


def test_throttling_near_slowdown_on_hot_inlet() -> None:
    b, clock = make("a100-40gb", n=8, inlet_temp_c=45.0)
    for i in range(8):
        b.set_load(i, 1.0)
    clock.advance(900.0)
    hottest = max((b.telemetry(i) for i in range(8)), key=lambda t: t.temperature_c)
    slowdown = b.thermal_thresholds(0).slowdown_c
    assert "sw_thermal" in hottest.throttle_reasons or "hw_slowdown" in hottest.throttle_reasons
    assert hottest.sm_clock_mhz < 1410
    assert 83.0 < hottest.temperature_c < slowdown + 4.0  # held near the limit, not run away


def test_locked_clocks_hold_and_reset() -> None:
    b, clock = make()
    b.set_load(0, 0.6)
    b.lock_gpu_clocks_mhz(0, 855, 855)
    clock.advance(1.0)
    assert b.telemetry(0).sm_clock_mhz == 855
    b.reset_gpu_clocks(0)
    assert b.telemetry(0).sm_clock_mhz == 1410


def test_mig_rules() -> None:
    b, _ = make("a100-80gb")
    with pytest.raises(FailedPrecondition, match="disabled"):
        b.apply_mig_layout(0, ["3g.40gb"])
    b.set_processes(0, [1234])
    with pytest.raises(InUse):
        b.set_mig_mode(0, True)
    b.set_processes(0, [])
    b.set_mig_mode(0, True)
    assert b.mig_state(0).enabled
    with pytest.raises(InvalidArgument) as e:
        b.apply_mig_layout(0, ["3g.40gb", "9g.90gb"])
    assert e.value.field == "profiles" and "9g.90gb" in str(e.value)
    instances = b.apply_mig_layout(0, ["3g.40gb", "2g.20gb", "1g.10gb"])
    assert sorted(i.profile for i in instances) == ["1g.10gb", "2g.20gb", "3g.40gb"]
    assert b.mig_state(0).instances == tuple(instances)
    b.set_processes(0, [99])
    with pytest.raises(InUse):
        b.apply_mig_layout(0, [])
    b.set_processes(0, [])
    with pytest.raises(InUse, match="empty layout"):
        b.set_mig_mode(0, False)
    assert b.apply_mig_layout(0, []) == []
    b.set_mig_mode(0, False)
    assert b.mig_state(0) == b.mig_state(1)


def test_concurrent_calls_are_safe() -> None:
    b, clock = make()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for k in range(200):
                b.set_load(i % 8, (k % 10) / 10)
                b.set_power_limit_w(i % 8, 100 + k % 300)
                b.telemetry((i + 1) % 8)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(50):
        clock.advance(0.1)
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert all(t.power_draw_w <= t.power_limit_w + 1e-9 for t in map(b.telemetry, range(8)))


def test_demo_load_varies_stays_in_range_and_differs_per_node() -> None:
    series = [demo_load(t, 7, 0) for t in range(0, 60)]
    acts = [a for a, _ in series]
    assert all(0.0 <= a <= 1.0 and 0.0 <= m <= 1.0 for a, m in series)
    assert max(acts) - min(acts) > 0.3  # visibly varies within a minute
    assert demo_load(12.5, 7, 0) == demo_load(12.5, 7, 0)
    assert demo_load(12.5, 7, 0) != demo_load(12.5, 8, 0)
    assert demo_load(12.5, 7, 0) != demo_load(12.5, 7, 1)
