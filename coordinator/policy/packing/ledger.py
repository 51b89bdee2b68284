"""Predicted power and airflow per node, row and aisle, and the per-GPU thermal check.

Node power is the server model of DESIGN §4 (idle + Σ GPU + fans); airflow is linear in the
node's GPU load (TAPAS eq. 3); a GPU's steady temperature is inlet + k·P (TAPAS eq. 2). The
ledger answers "may this node's GPU power change by Δ" against the row power and aisle airflow
limits, and keeps a journal so a tentative placement can be rolled back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from coordinator.policy.model import Limits, NodeState
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.hw.server_model import server_model_for

_EPS = 1e-6


@dataclass(frozen=True)
class NodeShape:
    node_id: str
    row: str
    aisle: str
    n_gpus: int
    max_gpu_power_w: float  # Σ GPU max power limits
    gpu_type: str


def node_power_w(shape: NodeShape, gpu_power_w: float) -> tuple[float, float]:
    """(node power W, airflow CFM) at this GPU power, by the server model."""
    model = server_model_for(shape.gpu_type)
    load = gpu_power_w / shape.max_gpu_power_w if shape.max_gpu_power_w > 0 else 0.0
    return (model.node_power_w(gpu_power_w, load, shape.n_gpus),
            model.airflow_cfm(load, shape.n_gpus))


def gpu_temp_c(inlet_c: float, gpu_type: str, gpu_power_w: float) -> float:
    model = GPU_MODELS.get(gpu_type)
    k = model.thermal_c_per_w if model else 0.1
    return inlet_c + k * gpu_power_w


def gpu_temp_limit_c(gpu_type: str, limits: Limits) -> float:
    model = GPU_MODELS.get(gpu_type)
    slowdown = model.thermal.slowdown_c if model else 85.0
    return slowdown - limits.gpu_thermal_headroom_c


def shape_of(node: NodeState) -> NodeShape:
    gpu_type = node.gpus[0].gpu_type if node.gpus else ""
    max_w = sum(GPU_MODELS[g.gpu_type].power.max_w if g.gpu_type in GPU_MODELS else 400.0
                for g in node.gpus)
    return NodeShape(node.node_id, node.row, node.aisle, len(node.gpus), max_w, gpu_type)


class Ledger:
    def __init__(self, nodes: dict[str, NodeShape], gpu_power_w: dict[str, float],
                 limits: Limits) -> None:
        self.shapes = nodes
        self.limits = limits
        self.gpu_w = dict(gpu_power_w)
        self.node_w: dict[str, float] = {}
        self.node_cfm: dict[str, float] = {}
        self.row_w: dict[str, float] = {}
        self.aisle_cfm: dict[str, float] = {}
        self._journal: list[tuple[str, float]] | None = None
        self._power_memo: dict[tuple[str, int, float, float], tuple[float, float]] = {}
        for node_id, shape in nodes.items():
            p, a = node_power_w(shape, self.gpu_w.get(node_id, 0.0))
            self.node_w[node_id], self.node_cfm[node_id] = p, a
            self.row_w[shape.row] = self.row_w.get(shape.row, 0.0) + p
            self.aisle_cfm[shape.aisle] = self.aisle_cfm.get(shape.aisle, 0.0) + a

    def row_headroom_w(self, row: str) -> float:
        limit = self.limits.row_power_limit_w.get(row)
        return float("inf") if limit is None else limit - self.row_w.get(row, 0.0)

    def aisle_headroom_cfm(self, aisle: str) -> float:
        limit = self.limits.aisle_airflow_cfm.get(aisle)
        return float("inf") if limit is None else limit - self.aisle_cfm.get(aisle, 0.0)

    def _after(self, node_id: str, delta_gpu_w: float) -> tuple[float, float]:
        shape = self.shapes[node_id]
        p, a = self._node_power_w(shape, self.gpu_w.get(node_id, 0.0) + delta_gpu_w)
        return p - self.node_w[node_id], a - self.node_cfm[node_id]

    def _node_power_w(self, shape: NodeShape, gpu_w: float) -> tuple[float, float]:
        """node_power_w(), memoized: nodes of one shape often reach the same GPU power."""
        key = (shape.gpu_type, shape.n_gpus, shape.max_gpu_power_w, gpu_w)
        out = self._power_memo.get(key)
        if out is None:
            out = self._power_memo[key] = node_power_w(shape, gpu_w)
        return out

    def violation(self, node_id: str, delta_gpu_w: float) -> str:
        """'' when the change keeps the node's row and aisle within limits, else why not.

        A decrease is always allowed (it never makes things worse).
        """
        if delta_gpu_w <= 0:
            return ""
        shape = self.shapes[node_id]
        d_w, d_cfm = self._after(node_id, delta_gpu_w)
        if d_w > self.row_headroom_w(shape.row) + _EPS:
            return (f"row {shape.row} would reach {self.row_w[shape.row] + d_w:.0f} W > "
                    f"{self.limits.row_power_limit_w[shape.row]:.0f} W")
        if d_cfm > self.aisle_headroom_cfm(shape.aisle) + _EPS:
            return (f"aisle {shape.aisle} would reach {self.aisle_cfm[shape.aisle] + d_cfm:.0f} "
                    f"CFM > {self.limits.aisle_airflow_cfm[shape.aisle]:.0f} CFM")
        return ""

    def apply(self, node_id: str, delta_gpu_w: float) -> None:
        if self._journal is not None:
            self._journal.append((node_id, delta_gpu_w))
        shape = self.shapes[node_id]
        d_w, d_cfm = self._after(node_id, delta_gpu_w)
        self.gpu_w[node_id] = self.gpu_w.get(node_id, 0.0) + delta_gpu_w
        self.node_w[node_id] += d_w
        self.node_cfm[node_id] += d_cfm
        self.row_w[shape.row] += d_w
        self.aisle_cfm[shape.aisle] += d_cfm

    @contextmanager
    def unlimited(self) -> Iterator[None]:
        """Within: no row or aisle limit refuses a change (thermal limits still hold)."""
        limits = self.limits
        self.limits = replace(limits, row_power_limit_w={}, aisle_airflow_cfm={})
        try:
            yield
        finally:
            self.limits = limits

    def begin(self) -> None:
        self._journal = []

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        journal, self._journal = self._journal or [], None
        for node_id, delta in reversed(journal):
            self.apply(node_id, -delta)

    def over_limits(self) -> list[str]:
        """Rows and aisles above their limits now (for warnings and tests)."""
        out = [f"row {r}: {w:.0f} W > {self.limits.row_power_limit_w[r]:.0f} W"
               for r, w in self.row_w.items()
               if r in self.limits.row_power_limit_w
               and w > self.limits.row_power_limit_w[r] + _EPS]
        out += [f"aisle {a}: {c:.0f} CFM > {self.limits.aisle_airflow_cfm[a]:.0f} CFM"
                for a, c in self.aisle_cfm.items()
                if a in self.limits.aisle_airflow_cfm
                and c > self.limits.aisle_airflow_cfm[a] + _EPS]
        return out
