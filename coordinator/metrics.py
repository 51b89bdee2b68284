"""Prometheus exposition: row/aisle/rack/site rollup gauges computed at scrape time, node states.

The collector reads the registry when scraped (lazily), so report ingest pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.state import ClusterRollups, Rollup

_ROLLUP_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("power_draw_w", "power_draw_watts", "Server power drawn (idle + GPUs + fans)"),
    ("power_limit_w", "power_limit_watts", "Provisioned power (row feed limit)"),
    ("airflow_cfm", "airflow_cfm", "Estimated server airflow"),
    ("airflow_limit_cfm", "airflow_limit_cfm", "Provisioned air-handler airflow"),
    ("max_gpu_temp_c", "max_gpu_temperature_celsius", "Hottest GPU"),
    ("inlet_temp_c", "inlet_temperature_celsius", "Inlet temperature estimate (TAPAS eq. 1)"),
    ("gpus", "gpus", "GPUs reported"),
    ("gpus_in_use", "gpus_in_use", "GPUs with load or processes"),
    ("memory_used_mib", "memory_used_mib", "GPU memory in use"),
    ("requests_in_flight", "requests_in_flight", "Requests in flight"),
)


class ClusterCollector(Collector):
    def __init__(self, cluster: Callable[[], ClusterRollups], epoch: Callable[[], int]) -> None:
        self._cluster = cluster
        self._epoch = epoch

    def collect(self) -> Iterator[Metric]:
        c = self._cluster()
        for kind, rollups in (("row", c.rows), ("aisle", c.aisles), ("rack", c.racks),
                              ("site", c.sites)):
            yield from _rollup_families(kind, rollups)
        nodes = GaugeMetricFamily("shapeshifter_nodes", "Nodes by liveness state", labels=["state"])
        for state in ("up", "suspect", "lost"):
            nodes.add_metric([state], sum(n.state == state for n in c.nodes))
        yield nodes
        yield GaugeMetricFamily("shapeshifter_coordinator_epoch", "Coordinator epoch",
                                value=self._epoch())


def _rollup_families(kind: str, rollups: list[Rollup]) -> Iterator[Metric]:
    for attr, suffix, doc in _ROLLUP_GAUGES:
        fam = GaugeMetricFamily(f"shapeshifter_{kind}_{suffix}", f"{doc}, per {kind}",
                                labels=[kind])
        for r in rollups:
            fam.add_metric([r.name], float(getattr(r, attr)))
        yield fam


def make_registry(cluster: Callable[[], ClusterRollups],
                  epoch: Callable[[], int]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ClusterCollector(cluster, epoch))
    return registry
