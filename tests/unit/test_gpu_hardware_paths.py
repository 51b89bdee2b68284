"""What real hardware does that the fakes now do too (issue 19), through the agent's layers:
MIG mode pending until a GPU reset (A100), the journal re-applied after a reset, a lost GPU that
must not blind the node, the board catalog (PCIe/NVL/H200) and compute processes per GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.journal import Journal
from nodeagent.device.nvml import NvmlBackend
from nodeagent.device.sim import SimulatedBackend
from nodeagent.telemetry.sampler import NodeIdentity, Sampler
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import InUse, ResetRequired
from shapeshifter.hw.models import gpu_type_for, mig_profiles_for
from tests.fakes.fake_pynvml import FakeNvml


class NullLog:
    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


def actuator(backend: Any, state_dir: Path) -> Actuator:
    act = Actuator(backend, Journal.open(state_dir), ManualClock(), NullLog())
    act.capture_defaults()
    return act


def test_pending_mig_mode_is_reported_journaled_and_applied_after_reset(tmp_path: Path) -> None:
    fake = FakeNvml("a100-80gb", n_gpus=2)
    backend = NvmlBackend(nvml=fake)
    act = actuator(backend, tmp_path)
    with pytest.raises(ResetRequired, match="pending"):
        act.set_mig_mode(0, True)
    assert Journal.open(tmp_path).requested(0).mig_enabled is True  # the driver accepted it
    with pytest.raises(ResetRequired, match="pending a GPU reset"):
        act.apply_mig_layout(0, ["3g.40gb", "3g.40gb"])
    with pytest.raises(ResetRequired):  # never "already done"
        act.set_mig_mode(0, True)
    fake.reset_gpu(0)
    assert act.after_gpu_reset(0) == []
    assert act.apply_mig_layout(0, ["3g.40gb", "3g.40gb"]) is True
    assert [i.profile for i in backend.mig_state(0).instances] == ["3g.40gb", "3g.40gb"]


def test_after_gpu_reset_reapplies_power_clocks_and_mig(tmp_path: Path) -> None:
    sim = SimulatedBackend("h100-80gb", 2, ManualClock())
    act = actuator(sim, tmp_path)
    act.set_power_limit(1, 450)
    act.lock_clocks(1, 990, 1410)
    act.set_mig_mode(1, True)
    act.apply_mig_layout(1, ["4g.40gb", "3g.40gb"])
    sim.reset_gpu(1)  # a reset clears them all
    assert sim.telemetry(1).power_limit_w == 700 and not sim.mig_state(1).instances
    assert act.after_gpu_reset(1) == []
    tel = sim.telemetry(1)
    assert tel.power_limit_w == 450 and tel.sm_clock_mhz <= 1410
    assert sorted(i.profile for i in sim.mig_state(1).instances) == ["3g.40gb", "4g.40gb"]
    assert sim.telemetry(0).power_limit_w == 700  # the other GPU was not touched


def test_after_gpu_reset_clears_the_sticky_xid(tmp_path: Path) -> None:
    fake = FakeNvml("h100-80gb", n_gpus=2)
    backend = NvmlBackend(nvml=fake)
    act = actuator(backend, tmp_path)
    act.set_power_limit(0, 500)
    fake.inject_xid(0, 79)
    assert not backend.telemetry(0).health.healthy
    fake.reset_gpu(0)
    assert backend.telemetry(0).power_limit_w == 700
    act.after_gpu_reset(0)
    tel = backend.telemetry(0)
    assert tel.health.healthy and tel.power_limit_w == 500


def test_one_lost_gpu_does_not_blind_the_node(tmp_path: Path) -> None:
    fake = FakeNvml("h100-80gb", n_gpus=3)
    backend = NvmlBackend(nvml=fake)
    act = actuator(backend, tmp_path)
    clock = ManualClock()
    sampler = Sampler(backend, act, NodeIdentity("n", {}, "nvml", "0"), clock, NullLog(),
                      interval_s=1.0)
    fake.gpus[1].demand_mw = 333_000
    sampler.sample_now()
    fake.inject_xid(1, 79)
    fake.lose_gpu(1)
    fake.gpus[2].demand_mw = 222_000
    clock.advance(2.0)
    snap = sampler.sample_now()
    lost, other = snap.gpus[1].telemetry, snap.gpus[2].telemetry
    assert lost.health.lost and not lost.health.healthy and "GPU is lost" in lost.health.error
    assert lost.power_draw_w == 333.0  # its last reading stays counted
    assert other.power_draw_w == 222.0 and other.health.healthy and not other.health.lost
    assert snap.budget.gpu_power_w == pytest.approx(
        sum(g.telemetry.power_draw_w for g in snap.gpus))


def test_a_gpu_lost_before_the_first_sample_reads_as_zero_and_lost(tmp_path: Path) -> None:
    fake = FakeNvml("a100-40gb", n_gpus=2)
    backend = NvmlBackend(nvml=fake)
    sampler = Sampler(backend, actuator(backend, tmp_path), NodeIdentity("n", {}, "nvml", "0"),
                      ManualClock(), NullLog(), interval_s=1.0)
    fake.lose_gpu(0)
    snap = sampler.sample_now()
    assert snap.gpus[0].telemetry.health.lost and snap.gpus[0].telemetry.power_draw_w == 0
    assert not snap.gpus[1].telemetry.health.lost


@pytest.mark.parametrize(("name", "memory_mib", "gpu_type", "largest"), [
    ("NVIDIA A100-PCIE-40GB", 40536, "a100-40gb", "7g.40gb"),
    ("NVIDIA A100 80GB PCIe", 81920, "a100-80gb", "7g.80gb"),
    ("NVIDIA H100 PCIe", 81559, "", "7g.80gb"),
    ("NVIDIA H100 NVL", 95830, "", "7g.94gb"),
    ("NVIDIA H200", 143771, "", "7g.141gb"),
    ("NVIDIA H100 80GB HBM3", 81559, "h100-80gb", "7g.80gb"),
])
def test_board_catalog(name: str, memory_mib: int, gpu_type: str, largest: str) -> None:
    assert gpu_type_for(name, memory_mib) == gpu_type
    profiles = mig_profiles_for(name, memory_mib)
    assert len(profiles) == 6 and profiles[-1].name == largest
    assert profiles[-1].memory_mib <= memory_mib


def test_boards_without_mig_have_no_profiles() -> None:
    assert mig_profiles_for("NVIDIA GeForce RTX 4090", 24564) == ()
    assert gpu_type_for("NVIDIA A10", 23028) == ""


def test_sim_compute_pids_are_the_registered_processes() -> None:
    sim = SimulatedBackend("a100-40gb", 2, ManualClock())
    assert sim.compute_pids(0) == frozenset()
    sim.set_processes(0, [7, 8])
    assert sim.compute_pids(0) == frozenset({7, 8}) and sim.compute_pids(1) == frozenset()
    with pytest.raises(InUse):
        sim.reset_gpu(0)
    tel = sim.telemetry(0)
    assert tel.enforced_power_limit_w == tel.power_limit_w
