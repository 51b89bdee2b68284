"""The cluster's physical state over a run: every GPU (numpy), the servers' power and airflow with
their fans, row power and aisle airflow, the limits in force (a failure lowers them), the clock
locks (the clock controller's and Phase 2's) and what each GPU would draw uncapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shapeshifter.hw import physics
from simulator.inputs.scenario import FailureSpec
from simulator.model.cluster import Cluster
from simulator.model.gpus import GpuArrays, operating_clock_mhz

FAN_GRID = 1001  # server fan power/airflow tabulated from ServerModel on this many load points
BUSY_ACTIVITY = 0.5  # an idle GPU ramps up as soon as work arrives: serve at this activity's clock


class Plant:
    def __init__(self, cluster: Cluster, rng: np.random.Generator) -> None:
        c = cluster
        self.cluster = c
        self.gpu_server = c.gpu_server
        self.gpu_row = c.server_row[self.gpu_server]
        self.gpu_aisle = c.server_aisle[self.gpu_server]
        self.gpus = GpuArrays.create(c.gpu, c.n_gpus, c.inlet_base_c[self.gpu_server], rng)
        self.fan_w, self.airflow_cfm = server_tables(c)
        self.row_limit_w = c.row_limit_w.copy()
        self.aisle_limit_cfm = c.aisle_limit_cfm.copy()
        self.activity = np.zeros(c.n_gpus)
        self.server_inlet_c = c.inlet_base_c.copy()
        self.controller_mhz = np.full(c.n_gpus, np.nan)  # the clock controller's locks
        self.phase2_locked = np.zeros(c.n_gpus, bool)  # locked by Phase 2 now
        self.rollup()

    def rollup(self) -> None:
        """Server power (host + GPUs + fans) and airflow, row power and aisle airflow."""
        c = self.cluster
        server_gpu_w = np.bincount(self.gpu_server, self.gpus.power_w, minlength=c.n_servers)
        load = server_gpu_w / (c.gpus_per_server * c.gpu.power.max_w)
        idx = np.clip(np.rint(load * (FAN_GRID - 1)).astype(np.int64), 0, FAN_GRID - 1)
        host_w = c.server.idle_power_w(c.gpus_per_server)
        self.server_power_w = host_w + server_gpu_w + self.fan_w[idx]
        self.server_cfm = self.airflow_cfm[idx]
        self.row_power_w = np.bincount(c.server_row, self.server_power_w, minlength=c.n_rows)
        self.aisle_cfm = np.bincount(c.server_aisle, self.server_cfm, minlength=c.n_aisles)

    def apply_failures(self, failures: Sequence[FailureSpec], t_s: float) -> None:
        """The limits in force at t_s: a UPS failure lowers its row's, an air handler's its
        aisle's, while it lasts."""
        c = self.cluster
        self.row_limit_w = c.row_limit_w.copy()
        self.aisle_limit_cfm = c.aisle_limit_cfm.copy()
        for f in failures:
            end = math.inf if f.duration_s is None else f.at_s + f.duration_s
            if f.at_s <= t_s < end:
                if f.kind == "ups":
                    self.row_limit_w[f.target] = c.row_limit_w[f.target] * f.capacity
                else:
                    self.aisle_limit_cfm[f.target] = c.aisle_limit_cfm[f.target] * f.capacity

    def service_speeds(self) -> tuple[np.ndarray, np.ndarray]:
        """(prefill, decode) throughput relative to the max clock, at the clock a busy GPU runs
        at now."""
        m, g = self.cluster.gpu, self.gpus
        busy_activity = np.maximum(self.activity, BUSY_ACTIVITY)
        clock, _, _ = operating_clock_mhz(m, busy_activity, g.power_limit_w, g.locked_max_mhz,
                                          g.temperature_c)
        return (physics.relative_throughput(clock, m.sm_max_clock_mhz, 0.0),
                physics.relative_throughput(clock, m.sm_max_clock_mhz, 1.0))

    def heat(self, activity: np.ndarray, step_s: float) -> None:
        """One step of the GPUs at this activity, the inlet following the site's load."""
        c = self.cluster
        self.activity = activity
        site_load = self.row_power_w.sum() / (c.nameplate_server_w() * c.n_servers)
        inlet_c = c.inlet_base_c + c.inlet_per_load_c * min(max(site_load, 0.0), 1.0)
        self.server_inlet_c = inlet_c
        self.gpus.step(self.activity, inlet_c[self.gpu_server], step_s)
        self.rollup()

    def uncapped_w(self) -> np.ndarray:
        """Each GPU's draw at its current activity without the emergency's measures: no power
        limit, and the clock controller's lock instead of a Phase 2 one (else the scope would
        look released while only the Phase 2 locks hold it under its limit)."""
        m, g = self.cluster.gpu, self.gpus
        locks = np.where(self.phase2_locked, self.controller_mhz, g.locked_max_mhz)
        clock, _, _ = operating_clock_mhz(m, self.activity, np.full_like(g.power_limit_w,
                                                                         m.power.max_w),
                                          locks, g.temperature_c)
        return physics.power_w(self.activity, clock, m.sm_max_clock_mhz, m.idle_power_w,
                               m.dynamic_power_max_w)

    def apply_phase2(self, locks: np.ndarray) -> None:
        """Capped GPUs locked at their Phase 2 clock point (NaN: none), not above the clock
        controller's lock; a GPU whose cap was lifted gets the controller's lock back."""
        g = self.gpus
        released = self.phase2_locked & np.isnan(locks)
        g.locked_max_mhz[released] = self.controller_mhz[released]
        new = ~np.isnan(locks)
        g.locked_max_mhz[new] = np.fmin(self.controller_mhz[new], locks[new])
        self.phase2_locked = new

    def set_controller_clocks(self, clocks: np.ndarray) -> int:
        """The clock controller's locks; returns how many GPUs' locks changed."""
        g = self.gpus
        old = g.locked_max_mhz
        # GPUs under an emergency cap keep their lock, as live (coordinator.policy.clocks): the
        # caps were planned from the draw at that lock, and raising it between two reports
        # would take the row over its limit before the next re-plan.
        capped = g.power_limit_w < self.cluster.gpu.power.max_w
        self.controller_mhz = clocks.copy()
        clocks = np.where(capped, old, clocks)
        changed = ~((np.isnan(old) & np.isnan(clocks)) | (old == clocks))
        g.locked_max_mhz = clocks.copy()
        return int(changed.sum())


def server_tables(c: Cluster) -> tuple[np.ndarray, np.ndarray]:
    """Fan power and airflow of one server over GPU load 0..1, from ServerModel itself."""
    n = c.gpus_per_server
    loads = np.linspace(0.0, 1.0, FAN_GRID)
    fan_w = np.array([c.server.fan_power_w(float(x), n) for x in loads])
    cfm = np.array([c.server.airflow_cfm(float(x), n) for x in loads])
    return fan_w, cfm
