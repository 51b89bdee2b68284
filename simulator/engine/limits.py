"""Row power and aisle airflow limits on every report: detection, shedding through the policy
while a scope is over (within a margin), release once its uncapped draw has stayed below the
limit for the hold time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simulator.control.policies import SHED_MARGIN
from simulator.model.cluster import Cluster
from simulator.model.plant import Plant
from simulator.model.state import View

RELEASE_FRAC = 0.95  # caps are lifted once the uncapped draw stays below this share of the limit

# The policy's cut: (view, the scope's GPUs, their power budget W) -> a cap W per GPU.
Shed = Callable[[View, np.ndarray, float], np.ndarray]


@dataclass
class Scope:
    """A row (power) or an aisle (airflow) with the GPUs under it and its capping state."""

    kind: str  # "row" | "aisle"
    index: int
    gpus: np.ndarray
    servers: np.ndarray
    capping: bool = False
    below_since_s: float | None = None


class LimitGuard:
    def __init__(self, plant: Plant, release_hold_s: float) -> None:
        self.plant = plant
        self.release_hold_s = release_hold_s
        self.scopes = scopes(plant.cluster, plant.gpu_server)

    def enforce(self, t_s: float, view: Callable[[float], View], shed: Shed) -> None:
        """Set every GPU's power limit for the scopes over (or still held under) their limit."""
        p = self.plant
        snapshot = None
        caps = np.full(p.cluster.n_gpus, p.cluster.gpu.power.max_w)
        for sc in self.scopes:
            budget_w, measured_over, uncapped_w = self.budget(sc)
            if measured_over or sc.capping:
                if uncapped_w <= budget_w / (1.0 - SHED_MARGIN) * RELEASE_FRAC:
                    sc.below_since_s = t_s if sc.below_since_s is None else sc.below_since_s
                    if t_s - sc.below_since_s >= self.release_hold_s:
                        sc.capping, sc.below_since_s = False, None
                        continue
                else:
                    sc.below_since_s = None
                sc.capping = True
                snapshot = snapshot or view(t_s)
                caps[sc.gpus] = np.minimum(caps[sc.gpus], shed(snapshot, sc.gpus, budget_w))
        p.gpus.power_limit_w = caps

    def budget(self, sc: Scope) -> tuple[float, bool, float]:
        """(GPU power budget W, measured over the limit, uncapped GPU draw W) for a scope."""
        p = self.plant
        c = p.cluster
        uncapped_w = float(p.uncapped_w()[sc.gpus].sum())
        gpu_w = float(p.gpus.power_w[sc.gpus].sum())
        margin = 1.0 - SHED_MARGIN
        if sc.kind == "row":
            limit = float(p.row_limit_w[sc.index])
            other_w = float(p.row_power_w[sc.index]) - gpu_w  # hosts and fans
            return limit * margin - other_w, float(p.row_power_w[sc.index]) > limit, uncapped_w
        # Aisle: airflow is linear in each server's GPU load, so a CFM limit is a GPU power limit.
        limit_cfm = float(p.aisle_limit_cfm[sc.index])
        n_srv = len(sc.servers)
        base_cfm = p.airflow_cfm[0] * n_srv
        per_w = (p.airflow_cfm[-1] - p.airflow_cfm[0]) / (c.gpus_per_server * c.gpu.power.max_w)
        budget_w = (limit_cfm * margin - base_cfm) / per_w
        return budget_w, float(p.aisle_cfm[sc.index]) > limit_cfm, uncapped_w


def scopes(c: Cluster, gpu_server: np.ndarray) -> list[Scope]:
    out = []
    for kind, owner, n in (("row", c.server_row, c.n_rows), ("aisle", c.server_aisle,
                                                              c.n_aisles)):
        for i in range(n):
            servers = np.flatnonzero(owner == i)
            out.append(Scope(kind, i, np.flatnonzero(np.isin(gpu_server, servers)), servers))
    return out
