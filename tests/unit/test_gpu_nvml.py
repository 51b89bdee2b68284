"""NvmlBackend against the stateful fake pynvml (injected): mapping, errors, constraints, MIG."""

from __future__ import annotations

import pynvml
import pytest

from nodeagent.device.backend import GpuBackend
from nodeagent.device.nvml import NvmlBackend, throttle_reason_names
from shapeshifter.common.errors import (
    DeviceTimeout,
    FailedPrecondition,
    GpuLost,
    InsufficientResources,
    Internal,
    InUse,
    InvalidArgument,
    NotFound,
    NotSupported,
    PermissionDenied,
    ResetRequired,
    Unavailable,
)
from tests.fakes.fake_pynvml import FakeNvml


def make(gpu_type: str = "a100-80gb", **kw) -> tuple[NvmlBackend, FakeNvml]:
    fake = FakeNvml(gpu_type, **kw)
    return NvmlBackend(nvml=fake), fake


def test_discovery_and_type_identification() -> None:
    b, _ = make("h100-80gb")
    assert isinstance(b, GpuBackend) and b.kind == "nvml"
    devs = b.devices()
    assert len(devs) == 8 and [d.index for d in devs] == list(range(8))
    d = devs[3]
    assert d.name == "NVIDIA H100 80GB HBM3" and d.gpu_type == "h100-80gb"
    assert d.memory_total_mib == 81559 and d.uuid.startswith("GPU-") and d.serial


def test_telemetry_converts_units_at_the_boundary() -> None:
    b, fake = make()
    g = fake.gpus[2]
    g.demand_mw, g.energy_mj, g.temperature_c, g.memory_temperature_c = 312_500, 7_200_000, 61, 70
    g.memory_used_mib, g.utilization_pct, g.pids = 20_000, (87, 55), [4242]
    g.throttle_mask = pynvml.nvmlClocksThrottleReasonSwPowerCap | \
        pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
    t = b.telemetry(2)
    assert t.power_draw_w == pytest.approx(312.5)
    assert t.power_draw_avg_w == pytest.approx(312.0)  # the field value, not the instant reading
    assert t.power_limit_w == pytest.approx(400.0)
    assert t.energy_j == pytest.approx(7200.0)
    assert (t.temperature_c, t.memory_temperature_c) == (61.0, 70.0)
    assert (t.sm_clock_mhz, t.memory_clock_mhz) == (1410, 1593)
    assert (t.utilization_gpu_pct, t.utilization_memory_pct) == (87.0, 55.0)
    assert (t.memory_used_mib, t.memory_total_mib) == (20_000, 81920)
    assert t.throttle_reasons == ("sw_power_cap", "sw_thermal")
    assert t.process_pids == (4242,)
    assert t.health.healthy and t.health.ecc_uncorrected_volatile == 0


def test_average_power_falls_back_to_instant() -> None:
    b, fake = make(power_average_supported=False)
    fake.gpus[0].demand_mw = 250_000
    t = b.telemetry(0)
    assert t.power_draw_avg_w == t.power_draw_w == pytest.approx(250.0)


def test_constraints() -> None:
    b, _ = make("h100-80gb")
    c = b.power_constraints(0)
    assert (c.min_w, c.max_w, c.default_w) == (200.0, 700.0, 700.0)
    th = b.thermal_thresholds(0)
    assert th.slowdown_c < th.shutdown_c
    clocks = b.supported_clocks(0)
    assert clocks.sm_max_mhz == 1980 and clocks.sm_min_mhz == 345
    assert list(clocks.sm_clocks_mhz_by_memory_mhz) == [2619]


def test_throttle_reason_bits_match_nvml() -> None:
    assert throttle_reason_names(pynvml.nvmlClocksThrottleReasonGpuIdle) == ("gpu_idle",)
    assert throttle_reason_names(pynvml.nvmlClocksThrottleReasonHwSlowdown) == ("hw_slowdown",)
    assert throttle_reason_names(pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown) == (
        "hw_power_brake",)
    assert throttle_reason_names(pynvml.nvmlClocksThrottleReasonDisplayClockSetting) == (
        "display_clocks_setting",)
    assert throttle_reason_names(0) == ()


def test_power_limit_is_set_in_milliwatts() -> None:
    b, fake = make()
    b.set_power_limit_w(1, 250.5)
    assert fake.gpus[1].power_limit_mw == 250_500
    assert b.telemetry(1).power_limit_w == pytest.approx(250.5)


@pytest.mark.parametrize("watts", [99.0, 401.0, float("nan")])
def test_out_of_range_power_limit_is_refused_before_nvml(watts: float) -> None:
    b, fake = make()
    with pytest.raises(InvalidArgument) as e:
        b.set_power_limit_w(0, watts)
    assert e.value.field == "power_limit_w" and "[100, 400] W" in str(e.value)
    assert fake.calls == [] and fake.gpus[0].power_limit_mw == 400_000


def test_clock_lock_and_reset() -> None:
    b, fake = make()
    b.lock_gpu_clocks_mhz(0, 855, 1320)
    assert fake.gpus[0].locked_mhz == (855, 1320)
    assert b.telemetry(0).sm_clock_mhz == 1320
    b.reset_gpu_clocks(0)
    assert fake.gpus[0].locked_mhz is None


@pytest.mark.parametrize(("lo", "hi", "field"), [(100, 1000, "min_mhz"), (300, 1500, "max_mhz"),
                                                 (1300, 900, "min_mhz")])
def test_bad_clock_range_is_refused(lo: int, hi: int, field: str) -> None:
    b, fake = make()
    with pytest.raises(InvalidArgument) as e:
        b.lock_gpu_clocks_mhz(0, lo, hi)
    assert e.value.field == field
    assert fake.calls == []


def test_unknown_index() -> None:
    b, _ = make()
    with pytest.raises(NotFound) as e:
        b.telemetry(8)
    assert e.value.field == "index"


def test_init_failure_is_unavailable_with_reason() -> None:
    with pytest.raises(Unavailable, match="NVML failed to initialise: Driver Not Loaded"):
        NvmlBackend(nvml=FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))


def test_no_permission_maps_to_permission_denied() -> None:
    b, fake = make(root=False)
    with pytest.raises(PermissionDenied, match="Insufficient Permissions"):
        b.set_power_limit_w(0, 300)
    assert fake.gpus[0].power_limit_mw == 400_000


def test_lost_gpu_maps_to_unavailable() -> None:
    b, fake = make()
    fake.lose_gpu(5)
    with pytest.raises(GpuLost, match="GPU is lost") as e:
        b.telemetry(5)
    assert isinstance(e.value, Unavailable) and "nvidia-smi -r" in str(e.value)
    assert b.telemetry(4).index == 4


@pytest.mark.parametrize(("code", "domain"), [
    (pynvml.NVML_ERROR_NOT_SUPPORTED, NotSupported),
    (pynvml.NVML_ERROR_NO_PERMISSION, PermissionDenied),
    (pynvml.NVML_ERROR_INVALID_ARGUMENT, InvalidArgument),
    (pynvml.NVML_ERROR_GPU_IS_LOST, GpuLost),
    (pynvml.NVML_ERROR_IN_USE, InUse),
    (pynvml.NVML_ERROR_RESET_REQUIRED, ResetRequired),
    (pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES, InsufficientResources),
    (pynvml.NVML_ERROR_NOT_FOUND, NotFound),
    (pynvml.NVML_ERROR_TIMEOUT, DeviceTimeout),
    (pynvml.NVML_ERROR_UNKNOWN, Internal),
])
def test_each_nvml_error_maps_once(code: int, domain: type) -> None:
    b, fake = make()

    def failing(handle):
        raise pynvml.NVMLError(code)  # the real class hierarchy builds the subclass

    fake.nvmlDeviceResetGpuLockedClocks = failing
    with pytest.raises(domain) as e:
        b.reset_gpu_clocks(0)
    assert type(e.value) is domain
    assert f"NVML error {code}" in str(e.value) and "reset locked clocks" in str(e.value)


def test_reset_required_xid_is_sticky_and_informational_xids_are_not_unhealthy() -> None:
    b, fake = make()
    fake.inject_xid(2, 79)
    fake.inject_xid(2, 13)  # a later application fault must not clear it
    h = b.telemetry(2).health
    assert (h.last_xid, h.reset_required_xid, h.healthy) == (13, 79, False)
    for xid in (63, 92, 94):
        fake.inject_xid(4, xid)
        h4 = b.telemetry(4).health
        assert h4.last_xid == xid and h4.healthy and h4.reset_required_xid == 0
    b.gpu_was_reset(2)
    assert b.telemetry(2).health.healthy


def test_xid_of_a_lost_gpu_does_not_break_the_others() -> None:
    b, fake = make()
    fake.inject_xid(3, 79)
    fake.lose_gpu(3)  # its UUID can no longer be read when the event is drained
    h = b.telemetry(0).health
    assert h.healthy
    with pytest.raises(GpuLost):
        b.telemetry(3)
    assert b._xid.state(3) == (79, 79)


def test_enforced_power_limit_shows_an_external_cap() -> None:
    b, fake = make()
    t = b.telemetry(0)
    assert t.enforced_power_limit_w == pytest.approx(400.0)
    fake.gpus[0].external_cap_mw, fake.gpus[0].demand_mw = 250_000, 390_000
    t = b.telemetry(0)
    assert (t.power_limit_w, t.enforced_power_limit_w) == (400.0, 250.0)
    assert t.effective_power_limit_w == 250.0 and t.power_draw_w == 250.0


def test_xid_events_and_ecc_make_a_gpu_unhealthy() -> None:
    b, fake = make()
    fake.inject_xid(3, 79)  # fell off the bus
    fake.gpus[6].ecc_uncorrected = 2
    h3 = b.telemetry(3).health
    assert h3.last_xid == 79 and not h3.healthy
    h6 = b.telemetry(6).health
    assert h6.ecc_uncorrected_volatile == 2 and not h6.healthy
    fake.inject_xid(1, 13)  # an application fault: recorded, the GPU stays healthy
    h1 = b.telemetry(1).health
    assert h1.last_xid == 13 and h1.healthy


def test_mig_profiles_known_before_enable_and_read_from_nvml_after() -> None:
    b, _ = make("h100-80gb")
    before = {p.name for p in b.mig_profiles(0)}
    assert {"1g.10gb", "3g.40gb", "7g.80gb"} <= before
    b.set_mig_mode(0, True)
    after = {p.name: p for p in b.mig_profiles(0)}
    assert set(after) == before
    assert after["3g.40gb"].placement_starts == (0, 4) and after["3g.40gb"].placement_size == 4


def test_mig_layout_round_trip() -> None:
    b, fake = make("h100-80gb")
    with pytest.raises(FailedPrecondition, match="disabled"):
        b.apply_mig_layout(0, ["3g.40gb"])
    b.set_mig_mode(0, True)
    assert b.mig_state(0).enabled
    assert b.telemetry(0).utilization_gpu_pct == -1.0  # NVML does not report it in MIG mode
    instances = b.apply_mig_layout(0, ["3g.40gb", "2g.20gb", "1g.10gb"])
    assert [(i.profile, i.placement_start) for i in instances] == [
        ("3g.40gb", 0), ("2g.20gb", 4), ("1g.10gb", 6)]
    assert all(i.uuid.startswith("MIG-") and i.memory_mib > 0 for i in instances)
    assert b.mig_state(0).instances == tuple(instances)
    # A new layout replaces the old one (compute instances destroyed before GPU instances).
    again = b.apply_mig_layout(0, ["7g.80gb"])
    assert [i.profile for i in again] == ["7g.80gb"]
    assert b.apply_mig_layout(0, []) == []
    b.set_mig_mode(0, False)
    assert not b.mig_state(0).enabled and fake.gpus[0].gis == {}


def test_mig_layout_refusals_change_nothing() -> None:
    b, fake = make("h100-80gb")
    b.set_mig_mode(0, True)
    b.apply_mig_layout(0, ["4g.40gb"])
    writes = list(fake.calls)
    with pytest.raises(InvalidArgument) as e:
        b.apply_mig_layout(0, ["1g.5gb"])
    assert e.value.field == "profiles" and "1g.5gb" in str(e.value)
    with pytest.raises(InvalidArgument, match="at most 1"):
        b.apply_mig_layout(0, ["4g.40gb", "4g.40gb"])
    fake.gpus[0].pids = [77]
    with pytest.raises(InUse):
        b.apply_mig_layout(0, ["7g.80gb"])
    with pytest.raises(InUse):
        b.set_mig_mode(0, False)
    assert fake.calls == writes
    assert [i.profile for i in b.mig_state(0).instances] == ["4g.40gb"]


def test_a100_mig_mode_stays_pending_until_reset_and_says_so() -> None:
    b, fake = make("a100-80gb")
    with pytest.raises(ResetRequired, match=r"pending.*nvidia-smi -r -i 2") as e:
        b.set_mig_mode(2, True)
    assert isinstance(e.value, FailedPrecondition) and e.value.field == "index"
    state = b.mig_state(2)
    assert (state.enabled, state.pending_enabled) == (False, True)
    # The layout is refused with the reason, not "MIG is disabled" forever.
    with pytest.raises(ResetRequired, match="pending a GPU reset"):
        b.apply_mig_layout(2, ["3g.40gb"])
    with pytest.raises(ResetRequired):  # asking again never claims success
        b.set_mig_mode(2, True)
    fake.reset_gpu(2)
    b.gpu_was_reset(2)
    b.set_mig_mode(2, True)  # active now: nothing to do
    assert [i.profile for i in b.apply_mig_layout(2, ["3g.40gb"])] == ["3g.40gb"]


def test_h100_mig_mode_applies_at_once() -> None:
    b, fake = make("h100-80gb")
    b.set_mig_mode(1, True)
    assert b.mig_state(1).enabled and fake.calls == ["nvmlDeviceSetMigMode"]


def test_mig_placement_is_passed_by_pointer() -> None:
    fake = FakeNvml("h100-80gb")
    b = NvmlBackend(nvml=fake)
    b.set_mig_mode(0, True)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    by_value = pynvml.c_nvmlGpuInstancePlacement_t(0, 8)
    with pytest.raises(TypeError, match="pointer"):  # what pynvml would hand the C function
        fake.nvmlDeviceCreateGpuInstanceWithPlacement(h, 0, by_value)
    assert [i.placement_start for i in b.apply_mig_layout(0, ["3g.40gb", "3g.40gb"])] == [0, 4]


def test_mig_capability_comes_from_nvml() -> None:
    b, _ = make("h100-80gb", mig_supported=False)
    assert b.mig_profiles(0) == []
    with pytest.raises(NotSupported, match="does not support MIG"):
        b.set_mig_mode(0, True)


@pytest.mark.parametrize(("name", "gpu_type", "profile"), [
    ("NVIDIA H100 PCIe", "", "3g.40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb", "3g.40gb"),
])
def test_pcie_boards_keep_mig(name: str, gpu_type: str, profile: str) -> None:
    b, _ = make("h100-80gb" if "H100" in name else "a100-80gb", name=name)
    d = b.devices()[0]
    assert (d.name, d.gpu_type) == (name, gpu_type)
    assert profile in {p.name for p in b.mig_profiles(0)}


def test_compute_pids_cover_the_gpu_and_each_mig_instance() -> None:
    b, fake = make("h100-80gb")
    b.set_mig_mode(0, True)
    insts = b.apply_mig_layout(0, ["3g.40gb", "3g.40gb"])
    fake.root = False  # unprivileged: the GPU's own list has no MIG processes
    g = fake.gpus[0]
    g.mig_pids[(insts[1].gpu_instance_id, insts[1].compute_instance_id)] = [501, 502]
    assert b.compute_pids(0) == frozenset({501, 502})
    assert b.telemetry(0).process_pids == (501, 502)
    assert b.compute_pids(1) == frozenset()
    real = fake.nvmlDeviceGetComputeRunningProcesses

    def refused_on_parent(handle):  # some drivers refuse the aggregate to unprivileged callers
        if handle is g or handle is fake.gpus[1]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        return real(handle)

    fake.nvmlDeviceGetComputeRunningProcesses = refused_on_parent
    assert b.compute_pids(0) == frozenset({501, 502})
    with pytest.raises(PermissionDenied):  # no MIG instances to ask instead: the error stands
        b.compute_pids(1)
    fake.nvmlDeviceGetComputeRunningProcesses = real
    fake.root = True
    with pytest.raises(InUse, match="501, 502"):
        b.apply_mig_layout(0, ["7g.80gb"])
    assert len(b.mig_state(0).instances) == 2


def test_mig_inventory_is_cached_until_a_change() -> None:
    b, fake = make("h100-80gb")
    b.set_mig_mode(0, True)
    b.apply_mig_layout(0, ["2g.20gb"])
    counted: list[int] = []
    real = fake.nvmlDeviceGetMigDeviceHandleByIndex

    def counting(handle, slot):
        counted.append(slot)
        return real(handle, slot)

    fake.nvmlDeviceGetMigDeviceHandleByIndex = counting
    first = b.mig_state(0)
    for _ in range(5):
        assert b.mig_state(0) == first
        b.telemetry(0)
    assert counted == []  # enumerated when the layout was applied, not on every read
    b.apply_mig_layout(0, ["7g.80gb"])
    assert [i.profile for i in b.mig_state(0).instances] == ["7g.80gb"] and counted


def test_close_shuts_nvml_down() -> None:
    b, fake = make()
    b.close()
    assert not fake.initialized


def test_half_applied_layout_is_rolled_back() -> None:
    b, fake = make("h100-80gb")
    b.set_mig_mode(0, True)
    b.apply_mig_layout(0, ["7g.80gb"])
    real_create = fake.nvmlGpuInstanceCreateComputeInstance
    created: list[object] = []

    def create_twice(gi, profile_id):
        if len(created) == 2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
        created.append(real_create(gi, profile_id))
        return created[-1]

    fake.nvmlGpuInstanceCreateComputeInstance = create_twice
    with pytest.raises(InsufficientResources,
                       match="instance 3 of 3 failed; the 2 created by this call were destroyed"):
        b.apply_mig_layout(0, ["3g.40gb", "2g.20gb", "1g.10gb"])
    assert b.mig_state(0).instances == () and fake.gpus[0].gis == {}  # no half layout left


def test_set_mig_mode_is_idempotent_even_with_processes() -> None:
    b, fake = make()
    fake.gpus[0].pids = [1]
    b.set_mig_mode(0, False)  # already off: no write, no refusal
    assert fake.calls == []


def test_fake_enforces_driver_rules_with_real_error_classes() -> None:
    fake = FakeNvml("a100-40gb", root=False)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetPowerManagementLimit(h, 99_000)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        fake.nvmlDeviceSetPowerManagementLimit(h, 300_000)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetGpuLockedClocks(h, 1000, 2000)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # MIG is off
        fake.nvmlDeviceGetGpuInstanceById(h, 1)


def test_importing_the_gpu_package_does_not_import_pynvml() -> None:
    import subprocess
    import sys

    code = ("import sys, nodeagent.device, nodeagent.device.sim, nodeagent.device.nvml; "
            "sys.exit('pynvml' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_discovery_failure_surfaces_and_shuts_nvml_down() -> None:
    fake = FakeNvml()
    fake.lose_gpu(0)
    with pytest.raises(Unavailable, match="discover GPUs"):
        NvmlBackend(nvml=fake)
    assert not fake.initialized
