"""Prometheus exposition of the latest snapshot: shapeshifter_* gauges plus the dcgm-exporter
names and labels (gpu, UUID, device, modelName, Hostname) for the quantities DCGM also exports,
so existing Grafana dashboards work unchanged. Values are read at scrape time, not stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nodeagent.telemetry.sampler import GpuSnapshot, NodeSnapshot

GPU_LABELS = ("gpu", "uuid", "node")
DCGM_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname")
SAFETY_STATES = ("standalone", "leased", "failsafe")

# (name, help, value) for shapeshifter_gpu_* gauges.
_GPU_GAUGES: tuple[tuple[str, str, Callable[[GpuSnapshot], float]], ...] = (
    ("power_draw_watts", "GPU power draw (W).", lambda g: g.telemetry.power_draw_w),
    (
        "power_limit_watts",
        "Power limit applied to the GPU (W).",
        lambda g: g.telemetry.power_limit_w,
    ),
    (
        "power_requested_watts",
        "Power limit requested by operator/plan (W).",
        lambda g: g.power_state.requested_w,
    ),
    ("temperature_celsius", "GPU temperature (C).", lambda g: g.telemetry.temperature_c),
    ("sm_clock_mhz", "SM clock (MHz).", lambda g: g.telemetry.sm_clock_mhz),
    ("memory_clock_mhz", "Memory clock (MHz).", lambda g: g.telemetry.memory_clock_mhz),
    ("memory_used_mib", "Framebuffer memory used (MiB).", lambda g: g.telemetry.memory_used_mib),
    ("memory_total_mib", "Framebuffer memory total (MiB).", lambda g: g.telemetry.memory_total_mib),
    ("utilization_pct", "GPU utilization (%).", lambda g: g.telemetry.utilization_gpu_pct),
    (
        "memory_headroom_mib",
        "Memory budget headroom (MiB).",
        lambda g: g.budget.memory_headroom_mib,
    ),
    (
        "compute_headroom_requests",
        "Compute budget headroom (concurrent requests).",
        lambda g: g.budget.compute_headroom_requests,
    ),
    ("power_headroom_watts", "Power budget headroom (W).", lambda g: g.budget.power_headroom_w),
    (
        "thermal_headroom_celsius",
        "Headroom to the slowdown temperature (C).",
        lambda g: g.budget.thermal_headroom_c,
    ),
    (
        "kv_cache_usage_ratio",
        "KV-cache usage reported by engines (-1 = none).",
        lambda g: g.budget.kv_cache_usage_frac,
    ),
)

# dcgm-exporter names with DCGM's units.
_DCGM_GAUGES: tuple[tuple[str, str, Callable[[GpuSnapshot], float]], ...] = (
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda g: g.telemetry.power_draw_w),
    (
        "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        "Power management limit (in W).",
        lambda g: g.telemetry.power_limit_w,
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: g.telemetry.temperature_c),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda g: g.telemetry.sm_clock_mhz),
    (
        "DCGM_FI_DEV_MEM_CLOCK",
        "Memory clock frequency (in MHz).",
        lambda g: g.telemetry.memory_clock_mhz,
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        lambda g: g.telemetry.memory_used_mib,
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        lambda g: g.telemetry.memory_total_mib - g.telemetry.memory_used_mib,
    ),
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: g.telemetry.utilization_gpu_pct),
)


class SnapshotCollector(Collector):
    def __init__(self, latest: Callable[[], NodeSnapshot | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        snapshot = self._latest()
        if snapshot is None:
            return
        yield from _gpu_families(snapshot)
        yield from _dcgm_families(snapshot)
        yield from _node_families(snapshot)


def _gpu_labels(s: NodeSnapshot, g: GpuSnapshot) -> list[str]:
    return [str(g.static.identity.index), g.static.identity.uuid, s.identity.node_id]


def _dcgm_labels(s: NodeSnapshot, g: GpuSnapshot) -> list[str]:
    ident = g.static.identity
    return [str(ident.index), ident.uuid, f"nvidia{ident.index}", ident.name, s.identity.hostname]


def _gpu_families(s: NodeSnapshot) -> Iterator[Metric]:
    for name, doc, value in _GPU_GAUGES:
        family = GaugeMetricFamily(f"shapeshifter_gpu_{name}", doc, labels=GPU_LABELS)
        for g in s.gpus:
            family.add_metric(_gpu_labels(s, g), float(value(g)))
        yield family


def _dcgm_families(s: NodeSnapshot) -> Iterator[Metric]:
    for name, doc, value in _DCGM_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=DCGM_LABELS)
        for g in s.gpus:
            family.add_metric(_dcgm_labels(s, g), float(value(g)))
        yield family
    mem_temp = GaugeMetricFamily(
        "DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", labels=DCGM_LABELS
    )
    # DCGM's energy counter is in mJ since driver load.
    energy = CounterMetricFamily(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        labels=DCGM_LABELS,
    )
    for g in s.gpus:
        if g.telemetry.memory_temperature_c is not None:
            mem_temp.add_metric(_dcgm_labels(s, g), g.telemetry.memory_temperature_c)
        energy.add_metric(_dcgm_labels(s, g), g.telemetry.energy_j * 1000.0)
    yield mem_temp
    yield energy


def _node_families(s: NodeSnapshot) -> Iterator[Metric]:
    labels = ("node",)
    node = [s.identity.node_id]
    b = s.budget
    for name, doc, value in (
        ("node_power_watts", "Node power: idle + GPUs + fans (W).", b.node_power_w),
        ("node_gpu_power_watts", "Sum of GPU power draw (W).", b.gpu_power_w),
        ("node_fan_power_watts", "Estimated fan power (W).", b.fan_power_w),
        ("node_airflow_cfm", "Estimated airflow (CFM).", b.airflow_cfm),
        ("node_epoch_seen", "Newest coordinator plan epoch seen.", float(s.epoch_seen)),
    ):
        family = GaugeMetricFamily(f"shapeshifter_{name}", doc, labels=labels)
        family.add_metric(node, value)
        yield family
    safety = GaugeMetricFamily(
        "shapeshifter_node_safety_state",
        "1 for the current safety state.",
        labels=("node", "state"),
    )
    for state in SAFETY_STATES:
        safety.add_metric([*node, state], 1.0 if s.safety.state == state else 0.0)
    yield safety
    ceiling = GaugeMetricFamily(
        "shapeshifter_gpu_thermal_ceiling_watts",
        "Ceiling set by the local thermal guard (W).",
        labels=GPU_LABELS,
    )
    for g in s.gpus:
        index = g.static.identity.index
        if index in s.thermal_ceilings_w:
            ceiling.add_metric(_gpu_labels(s, g), s.thermal_ceilings_w[index])
    yield ceiling


def serve_metrics(
    listen: str, latest: Callable[[], NodeSnapshot | None], registry: CollectorRegistry
) -> tuple[object, int]:
    """Register the collector and serve /metrics on HOST:PORT (0 = a free port).
    Returns (server, bound port); call server.shutdown() to stop."""
    registry.register(SnapshotCollector(latest))
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return server, server.server_address[1]
