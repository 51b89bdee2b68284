"""Configurator (DynamoLLM §4): per endpoint the instance count x variant x locked SM clock that
meets its demand at the least predicted power. Pure: no clock reads, no I/O.

Physics (shapeshifter.hw.physics, the same the sim backend runs): an instance's capacity at clock f
is its profiled capacity at the maximum clock x `relative_throughput(f)`, which for decode-heavy
work barely moves (decode is memory-bound), while dynamic power falls as (f / f_max) ** 1.65.
The share of instance time spent decoding comes from the profiles themselves: the LISO and SILO
MSRR rows are two equations in the per-token prefill and decode costs (`decode_share`).

Power of one instance at utilization u (0..1) while it serves: idle + dynamic(f) x activity(u),
activity rising from `activity_empty` (a tiny batch still streams the weights every step) to
`activity_full` at a full batch (OASIS Table 3's load). Minimizing that over the candidates at a
fixed demand is minimizing energy per token (tokens served are the demand's either way).

Time scales (the callers apply them): the clock is re-chosen every routing interval (seconds),
the count every rebalance interval (tens of seconds), the variant only when its saving over
`ConfigureConfig.amortize_s` pays for the reconfiguration (drain + restart) it costs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.policy.model import ClusterSnapshot, InstanceState
from coordinator.policy.packing.candidates import msrr_by_class
from coordinator.profiles.classes import class_tokens
from coordinator.profiles.schema import ProfileRow, QueryClass
from shapeshifter.common.errors import out_of_range
from shapeshifter.hw import physics
from shapeshifter.hw.models import GpuModel

ACTIVITY_FULL = physics.OASIS_DECODE_ACTIVITY  # a full decode batch (OASIS Table 3's load)
ACTIVITY_EMPTY = 0.5 * physics.OASIS_DECODE_ACTIVITY  # a batch of one: weights still streamed


@dataclass(frozen=True)
class ConfigureConfig:
    # Lowest clock the configurator locks, as a share of the maximum: below ~0.6 f_max prefill
    # slows more than the decode-bound power saving is worth (OASIS Table 3 stops at 855/1410).
    min_clock_frac: float = 0.6
    clock_step_mhz: int = 15  # clock table granularity; changes smaller than 2 steps are skipped
    amortize_s: float = 1800.0  # a variant change must pay for itself within this horizon
    reconfigure_s: float = 90.0  # drain + restart of one instance (bench/reconfigure_timing.py)
    # Counts may be sized for a clock below the maximum when that saves energy, accepting at
    # most this share of extra instances for it (energy per token against GPUs freed). 0: size
    # at the maximum clock and let the clock controller use the slack (the simulator's
    # evaluation: 0.15 used 5% more GPUs for 2% less energy per token).
    max_extra_gpu_frac: float = 0.0

    def validate(self) -> ConfigureConfig:
        if not 0.3 <= self.min_clock_frac <= 1.0:
            raise out_of_range("min_clock_frac", self.min_clock_frac, 0.3, 1.0)
        if not 1 <= self.clock_step_mhz <= 500:
            raise out_of_range("clock_step_mhz", self.clock_step_mhz, 1, 500, "MHz")
        if not 0 <= self.amortize_s <= 7 * 86400:
            raise out_of_range("amortize_s", self.amortize_s, 0, 7 * 86400, "s")
        if not 0 <= self.reconfigure_s <= 3600:
            raise out_of_range("reconfigure_s", self.reconfigure_s, 0, 3600, "s")
        if not 0 <= self.max_extra_gpu_frac <= 1:
            raise out_of_range("max_extra_gpu_frac", self.max_extra_gpu_frac, 0, 1)
        return self


@dataclass(frozen=True)
class Variant:
    """One way to run an instance of an endpoint (its clock is chosen separately)."""

    name: str  # e.g. "none", "fp8", "tp2"
    capacity_rps: float  # one instance at the maximum clock, at the SLO, for the demand's mix
    gpus: int = 1
    power_scale: float = 1.0  # dynamic power relative to the fp16 TP1 instance (fp8: 0.9)


@dataclass(frozen=True)
class Choice:
    variant: Variant
    count: int
    clock_mhz: int  # the maximum clock means "not locked"
    power_w: float  # predicted draw of all the endpoint's instances at the demand
    capacity_rps: float  # all instances at this clock


def capacity_at_clock(capacity_max_rps: float, clock_mhz: float, gpu: GpuModel,
                      decode_frac: float) -> float:
    return capacity_max_rps * float(physics.relative_throughput(clock_mhz, gpu.sm_max_clock_mhz,
                                                                decode_frac))


def instance_power_w(gpu: GpuModel, clock_mhz: float, utilization: float, gpus: int = 1,
                     power_scale: float = 1.0) -> float:
    """Predicted draw of one serving instance (all its GPUs) at utilization 0..1."""
    u = min(max(utilization, 0.0), 1.0)
    activity = (ACTIVITY_EMPTY + (ACTIVITY_FULL - ACTIVITY_EMPTY) * u) * power_scale
    return gpus * float(physics.power_w(activity, clock_mhz, gpu.sm_max_clock_mhz,
                                        gpu.idle_power_w, gpu.dynamic_power_max_w))


def candidate_clocks_mhz(gpu: GpuModel, config: ConfigureConfig) -> list[int]:
    """The GPU's supported clocks from min_clock_frac x max up to the max, ascending."""
    floor = config.min_clock_frac * gpu.sm_max_clock_mhz
    return sorted(c for c in gpu.sm_clocks_mhz if c >= floor - 1e-9)


def lowest_clock_mhz(count: int, need_rps: float, capacity_max_rps: float, gpu: GpuModel,
                     decode_frac: float, config: ConfigureConfig) -> int:
    """The lowest candidate clock at which `count` instances cover `need_rps` (the maximum clock
    when even it does not)."""
    clocks = candidate_clocks_mhz(gpu, config)
    for clock in clocks:
        if count * capacity_at_clock(capacity_max_rps, clock, gpu, decode_frac) >= need_rps:
            return clock
    return gpu.sm_max_clock_mhz


def planning_clock_mhz(gpu: GpuModel, decode_frac: float, config: ConfigureConfig) -> int:
    """The clock instance counts are sized for: the least energy per unit of work at a full
    batch among the clocks whose capacity is at least 1 / (1 + max_extra_gpu_frac) of the
    maximum clock's. The clock controller then moves between it and the maximum as demand
    moves within the provisioned capacity."""
    best, best_j = gpu.sm_max_clock_mhz, math.inf
    for clock in candidate_clocks_mhz(gpu, config):
        rel = capacity_at_clock(1.0, clock, gpu, decode_frac)
        if rel < 1.0 / (1.0 + config.max_extra_gpu_frac) - 1e-9:
            continue
        per_work_j = instance_power_w(gpu, clock, 1.0) / rel
        if per_work_j < best_j - 1e-9:
            best, best_j = clock, per_work_j
    return best


def choose(variants: Iterable[Variant], need_rps: float, demand_rps: float, gpu: GpuModel,
           decode_frac: float, config: ConfigureConfig, max_count: int,
           min_count: int = 1) -> Choice:
    """The (variant, count, clock) covering `need_rps` (the provisioned rate: forecast with
    headroom, over the corrected capacity) at the least predicted power serving `demand_rps`.
    Counts from the fewest that cover at the maximum clock up to two more (a lower clock on one
    more instance can cost less than a higher one); ties go to fewer instances."""
    best: Choice | None = None
    for v in variants:
        for choice in _options(v, need_rps, demand_rps, gpu, decode_frac, config, max_count,
                               min_count):
            if best is None or choice.power_w < best.power_w - 1e-6:
                best = choice
    if best is None:
        raise ValueError("choose: no variant given")
    return best


def _options(v: Variant, need_rps: float, demand_rps: float, gpu: GpuModel, decode_frac: float,
             config: ConfigureConfig, max_count: int, min_count: int) -> Iterable[Choice]:
    n0 = max(min_count, math.ceil(max(need_rps, 0.0) / max(v.capacity_rps, 1e-12) - 1e-9), 1)
    for n in range(min(n0, max_count), min(n0 + 2, max_count) + 1):
        clock = lowest_clock_mhz(n, need_rps, v.capacity_rps, gpu, decode_frac, config)
        cap = n * capacity_at_clock(v.capacity_rps, clock, gpu, decode_frac)
        util = demand_rps / cap if cap > 0 else 1.0
        power = n * instance_power_w(gpu, clock, util, v.gpus, v.power_scale)
        yield Choice(variant=v, count=n, clock_mhz=clock, power_w=power, capacity_rps=cap)


def variant_change_pays(current: Choice, proposed: Choice, config: ConfigureConfig) -> bool:
    """Whether switching variant saves more energy over `amortize_s` than the reconfiguration
    costs: each replaced instance runs twice for `reconfigure_s` (make-before-break)."""
    if proposed.variant == current.variant:
        return True
    saving_j = (current.power_w - proposed.power_w) * config.amortize_s
    per_instance_w = proposed.power_w / max(proposed.count, 1)
    cost_j = proposed.count * per_instance_w * config.reconfigure_s
    return saving_j > cost_j


def decode_share(profiles: Sequence[ProfileRow], gpu_type: str, model: str,
                 mix: Mapping[QueryClass, float]) -> float:
    """Share of instance time spent decoding for a request mix (req/s per class), from the
    profile's LISO and SILO MSRR at the maximum clock: 1/MSRR = P x prefill + G x decode per
    class, two equations in the two per-token costs. 0.8 when the rows are missing."""
    msrr = {}
    for r in profiles:
        if (r.gpu_type == gpu_type and r.model == model and r.quantization == "none"
                and r.tensor_parallel == 1 and r.sm_clock_mhz is None and r.msrr_rps
                and r.query_class in (QueryClass.LISO, QueryClass.SILO)):
            msrr.setdefault(r.query_class, r.msrr_rps)
    if len(msrr) < 2:
        return 0.8
    a, b = [], []
    for qc in (QueryClass.LISO, QueryClass.SILO):
        p_tok, g_tok = class_tokens(qc)
        a.append([p_tok, g_tok])
        b.append(1.0 / msrr[qc])
    prefill_s, decode_s = np.linalg.solve(np.array(a, float), np.array(b, float))
    prefill_s, decode_s = max(float(prefill_s), 1e-9), max(float(decode_s), 1e-9)
    pre = dec = 0.0
    for qc, rps in mix.items():
        if rps <= 0 or qc is QueryClass.MIXED:
            continue
        p_tok, g_tok = class_tokens(qc)
        pre += rps * p_tok * prefill_s
        dec += rps * g_tok * decode_s
    return dec / (pre + dec) if pre + dec > 0 else 0.8


# ---------------- live: clock locks for the running instances ----------------

@dataclass(frozen=True)
class ClockAction:
    """Lock (or, with sm_clock_mhz None, reset) the SM clock of one instance's GPUs."""

    node_id: str
    gpu_indices: tuple[int, ...]
    instance_id: str
    endpoint: str
    sm_clock_mhz: int | None
    reason: str


def instance_capacity_rps(profiles: Sequence[ProfileRow], gpu_type: str, model: str,
                          quantization: str, tensor_parallel: int, slo_p95_s: float,
                          mix: Mapping[QueryClass, float]) -> float:
    """One full-GPU instance's capacity at the maximum clock for the demand's class mix (req/s):
    total / Σ_class rps_c / MSRR_c, with the rebalancer's MSRR per class
    (candidates.msrr_by_class). 0 when a class with demand has no MSRR row."""
    rows = [r for r in profiles
            if r.gpu_type == gpu_type and r.model == model and r.quantization == quantization
            and r.tensor_parallel == tensor_parallel and r.mig_profile == "full"
            and r.sm_clock_mhz is None and r.power_limit_w is None]
    msrr = msrr_by_class(rows, slo_p95_s)
    total = sum(v for v in mix.values() if v > 0)
    if total <= 0:
        return 0.0
    if any(rps > 0 and qc not in msrr for qc, rps in mix.items()):
        return 0.0
    return total / sum(rps / msrr[qc] for qc, rps in mix.items() if rps > 0)


def clock_plan(snapshot: ClusterSnapshot, profiles: Sequence[ProfileRow],
               gpu_models: Mapping[str, GpuModel], headroom_frac: float,
               config: ConfigureConfig) -> tuple[ClockAction, ...]:
    """Per endpoint, the lowest clock at which its ready full-GPU instances cover demand x
    (1 + headroom); one action per instance whose lock differs by two clock steps or more.
    Instances without a profile row (or on MIG slices, whose clock is the GPU's, shared) are
    left alone; an endpoint the maximum clock cannot cover gets its locks reset."""
    config.validate()
    gpu_type_of = {(n.node_id, g.index): g.gpu_type for n in snapshot.nodes for g in n.gpus}
    out: list[ClockAction] = []
    for spec in snapshot.endpoints:
        mix = snapshot.demand_rps.get(spec.name, {})
        insts = [i for i in snapshot.instances if i.endpoint == spec.name and i.ready
                 and i.mig_profile == "full" and i.gpu_indices]
        if not insts:
            continue
        need_rps = sum(v for v in mix.values() if v > 0) * (1.0 + headroom_frac)
        out += _endpoint_clocks(spec.name, spec.slo_p95_s, insts, mix, need_rps, profiles,
                                gpu_type_of, gpu_models, config)
    return tuple(out)


def _endpoint_clocks(endpoint: str, slo_p95_s: float, insts: Sequence[InstanceState],
                     mix: Mapping[QueryClass, float], need_rps: float,
                     profiles: Sequence[ProfileRow], gpu_type_of: Mapping[tuple[str, int], str],
                     gpu_models: Mapping[str, GpuModel], config: ConfigureConfig
                     ) -> list[ClockAction]:
    caps = []
    for i in insts:
        gpu = gpu_models.get(gpu_type_of.get((i.node_id, i.gpu_indices[0]), ""))
        cap = 0.0 if gpu is None else instance_capacity_rps(
            profiles, gpu.key, i.model, i.quantization, i.tensor_parallel, slo_p95_s, mix)
        caps.append((i, gpu, cap))
    if any(gpu is None or cap <= 0 for _, gpu, cap in caps):
        return []  # an instance the profiles do not describe: no basis for a clock
    out = []
    total_max_rps = sum(cap for _, _, cap in caps)
    decode_of: dict[tuple[str, str], float] = {}  # one solve per GPU type and model
    for inst, gpu, cap in caps:
        assert gpu is not None
        key = (gpu.key, inst.model)
        if key not in decode_of:
            decode_of[key] = decode_share(profiles, gpu.key, inst.model, mix)
        decode_frac = decode_of[key]
        # Each instance carries its share of the need, in proportion to its capacity.
        share_rps = need_rps * cap / total_max_rps
        clock = lowest_clock_mhz(1, share_rps, cap, gpu, decode_frac, config)
        target = None if clock >= gpu.sm_max_clock_mhz else clock
        now = inst.sm_clock_mhz
        if target == now or (target is not None and now is not None
                             and abs(target - now) < 2 * config.clock_step_mhz):
            continue
        why = (f"{endpoint}: {need_rps:.2f} req/s to cover over {len(caps)} instances; "
               + (f"{target} MHz covers it at the least power" if target is not None
                  else "only the maximum clock covers it: unlocked"))
        out.append(ClockAction(inst.node_id, inst.gpu_indices, inst.instance_id, endpoint,
                               target, why))
    return out
