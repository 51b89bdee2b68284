"""What the simulated coordinator knows at one moment (the policies' input) and instance states."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.profiles.schema import ProfileRow, QueryClass
from simulator.model.cluster import Cluster
from simulator.model.service import ServiceParams

NONE, STARTING, READY, DRAINING = 0, 1, 2, 3


@dataclass
class Fleet:
    """LLM instances, one per GPU (TP1 on a full GPU): indexed by GPU."""

    endpoint: np.ndarray  # endpoint index, -1 when the GPU hosts no instance
    state: np.ndarray  # NONE / STARTING / READY / DRAINING
    ready_at_s: np.ndarray
    fp8: np.ndarray  # bool: the instance serves the fp8 variant
    stop_at_s: np.ndarray  # a replaced instance drains from then on (inf = not due to stop)

    @classmethod
    def empty(cls, n_gpus: int) -> Fleet:
        return cls(endpoint=np.full(n_gpus, -1), state=np.zeros(n_gpus, np.int8),
                   ready_at_s=np.zeros(n_gpus), fp8=np.zeros(n_gpus, bool),
                   stop_at_s=np.full(n_gpus, np.inf))

    def hosting(self) -> np.ndarray:
        return self.state != NONE


@dataclass(frozen=True)
class Workload:
    """Fixed facts about the endpoints the policies may use."""

    n_endpoints: int
    fp8_allowed: np.ndarray  # per endpoint: the quality floor admits fp8
    fp8_speedup: float  # MSRR ratio fp8 / fp16 from the profiles
    instance_rps: float  # profiled MSRR of one fp16 instance at max clock for the trace's mix
    decode_share: float  # share of instance time spent decoding for the trace's mix
    clock_candidates_mhz: tuple[int, ...]  # profiled clock points (ascending), max clock last
    service: ServiceParams
    model: str  # the endpoints' model (profile rows' `model`)
    slo_s: float  # end-to-end latency SLO (the endpoints' slo_p95_s)
    class_mix: tuple[tuple[QueryClass, float], ...]  # a mean request as profiled-class work
    profiles: tuple[ProfileRow, ...]  # the cost table the rebalancer sizes with
    count_lead_s: float = 90.0  # a new instance's start + one rebalance interval


@dataclass(frozen=True)
class View:
    """A snapshot, as the coordinator sees it from the latest reports."""

    t_s: float
    cluster: Cluster
    workload: Workload
    fleet: Fleet
    opaque: np.ndarray  # bool per GPU: an opaque (IaaS) GPU
    gpu_row: np.ndarray
    gpu_aisle: np.ndarray
    gpu_power_w: np.ndarray
    gpu_uncapped_w: np.ndarray  # what each GPU would draw without its power limit
    gpu_temp_c: np.ndarray
    in_flight: np.ndarray  # requests per GPU
    row_power_w: np.ndarray
    row_limit_w: np.ndarray  # current (a failure lowers it)
    aisle_limit_cfm: np.ndarray  # current
    server_power_w: np.ndarray  # measured node power (idle + GPUs + fans)
    server_cfm: np.ndarray
    server_inlet_c: np.ndarray  # current inlet temperature
    demand_rps: np.ndarray  # per endpoint, smoothed arrivals
    locked_mhz: np.ndarray  # per GPU locked maximum SM clock, NaN = not locked
    gpu_clock_mhz: np.ndarray | None = None  # per GPU SM clock now (as the agents report)
