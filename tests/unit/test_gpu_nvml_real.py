"""Read-only checks of NvmlBackend on a real NVIDIA GPU; skipped where NVML cannot start."""

from __future__ import annotations

import pytest

from nodeagent.device.nvml import NvmlBackend
from shapeshifter.common.errors import Unavailable

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend():
    try:
        b = NvmlBackend()
    except Unavailable as e:
        pytest.skip(f"no usable NVML here: {e}")
    yield b
    b.close()


def test_reads_every_gpu_consistently(backend: NvmlBackend) -> None:
    devices = backend.devices()
    assert devices
    for d in devices:
        c = backend.power_constraints(d.index)
        assert 0 < c.min_w <= c.default_w <= c.max_w
        t = backend.telemetry(d.index)
        assert c.min_w - 1 <= t.power_limit_w <= c.max_w + 1
        assert 0 <= t.power_draw_w < 2 * c.max_w
        assert 0 < t.temperature_c < backend.thermal_thresholds(d.index).shutdown_c
        assert 0 <= t.memory_used_mib <= t.memory_total_mib == d.memory_total_mib
        clocks = backend.supported_clocks(d.index)
        assert t.sm_clock_mhz <= clocks.sm_max_mhz + 15
        backend.mig_state(d.index)  # readable whether or not MIG is supported
