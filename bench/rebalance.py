"""Solve time and quality of rebalance() on synthetic clusters.

    python bench/rebalance.py --gpus 1000 [--endpoints 50] [--rounds 15] [--seed 1]
        [--trace /work/shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv]

Cluster: 8-GPU nodes, half A100-80GB and half H100-80GB (MIG-capable), 8 nodes per row, two
rows per aisle; row power and aisle airflow limits at 80% of their peak (every GPU at max).
Endpoints (50 at 1k GPUs, 500 at 10k by default): 8B-class models and a 70B-class model;
each endpoint's query-class mix is that of a random 2,000-request window of the Azure trace
(read here, classified with τ = 500); demands are log-normal, scaled so that the static
baseline fills ~70% of the GPUs.

The profile table is SYNTHETIC (printed assumptions below, not measurements): A100 LISO/SILO
MSRRs of the shipped OASIS rows for the 8B model, other classes, MIG slices, FP8, a lower clock
and H100 scaled by fixed factors.

Static baseline: each endpoint's default configuration (FP16, TP1 for 8B / TP2 for 70B, full
clock, whole GPUs), ⌈demand x 1.2 / MSRR⌉ instances, first-fit. The rebalancer starts from that
placement (so its moves are the restarts away from it). Lower bound: the integer program over
instance counts per configuration (coverage per endpoint, compute-slice and memory-slot capacity
per GPU type, GPU counts per type; placement, row power and airflow relaxed), HiGHS's dual bound.

Last line: gpus=G solve_p99_s=A used_over_lower_bound=B used_vs_static=C
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceState,
    Limits,
    NodeState,
    RebalanceConfig,
)
from coordinator.policy.packing.candidates import (
    MIG_COMPUTE_SLICES,
    MIG_MEMORY_SLOTS,
    all_candidates,
)
from coordinator.policy.packing.ledger import node_power_w, shape_of
from coordinator.policy.rebalance import rebalance
from coordinator.profiles.classes import CLASSES, class_shares, read_azure_trace
from coordinator.profiles.schema import ProfileRow, QueryClass, Source
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.hw.server_model import server_model_for

TRACE = Path("/work/shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv")
GPUS_PER_NODE, NODES_PER_ROW = 8, 8
HEADROOM = 0.2
# A100 MSRR (req/s, 20 s P95 SLO) per class for an 8B model: LISO/SILO from OASIS Table 1
# (shipped defaults); SISO and LILO are assumptions (short requests fastest, long-long slowest).
A100_8B_MSRR = {QueryClass.SISO: 9.0, QueryClass.LISO: 4.54, QueryClass.SILO: 2.15,
                QueryClass.LILO: 1.2}
ASSUMPTIONS = {
    "h100_perf": 1.7, "h100_power": 1.6,  # H100 vs A100, same config
    "fp8_perf": 1.2, "fp8_power": 0.9, "fp8_mem": 0.5,  # derive.py's QUANT_FP8 factors
    "tp2_perf": 1.6, "tp2_power": 1.6,  # derive.py's TP2 factors
    "clock_low_perf": 0.93, "clock_low_power": 0.7,  # OASIS Table 3 trend (1320 -> ~1035 MHz)
    "mig": {"3g.40gb": 0.45, "2g.20gb": 0.28, "1g.20gb": 0.15, "1g.10gb": 0.13},  # of full perf
}
MODELS = {  # name -> (fp16 memory GB incl. KV at the operating point, perf vs the 8B model)
    "llama-8b": (24.0, 1.0), "qwen-7b": (22.0, 1.1), "mistral-7b": (22.0, 1.2),
    "llama-70b": (150.0, 0.16),
}
MIG_MEM_GB = {"3g.40gb": 39.2, "2g.20gb": 19.5, "1g.20gb": 19.5, "1g.10gb": 9.5}


def synthetic_profiles() -> list[ProfileRow]:
    rows: list[ProfileRow] = []
    a = ASSUMPTIONS
    for gpu in ("a100-80gb", "h100-80gb"):
        g_perf, g_pow = (1.0, 1.0) if gpu.startswith("a100") else (a["h100_perf"], a["h100_power"])
        for model, (mem16, m_perf) in MODELS.items():
            for quant, q_perf, q_pow, q_mem in (("none", 1.0, 1.0, 1.0),
                                                ("fp8", a["fp8_perf"], a["fp8_power"],
                                                 a["fp8_mem"])):
                mem = mem16 * q_mem
                for tp in (1, 2, 4):
                    if mem > 80 * tp:
                        continue
                    t_perf = {1: 1.0, 2: a["tp2_perf"], 4: a["tp2_perf"] ** 2}[tp]
                    t_pow = {1: 1.0, 2: a["tp2_power"], 4: a["tp2_power"] ** 2}[tp]
                    for clock, c_perf, c_pow in ((None, 1.0, 1.0),
                                                 (1035 if gpu.startswith("a100") else 1530,
                                                  a["clock_low_perf"], a["clock_low_power"])):
                        perf = g_perf * m_perf * q_perf * t_perf * c_perf
                        power = 300.0 * g_pow * q_pow * t_pow * c_pow
                        rows += _class_rows(gpu, model, tp, quant, "full", clock, perf, power, mem)
                if model == "llama-70b":
                    continue
                for mig, share in a["mig"].items():  # type: ignore[union-attr]
                    if mem <= MIG_MEM_GB[mig]:
                        rows += _class_rows(gpu, model, 1, quant, mig, None,
                                            g_perf * m_perf * q_perf * share, None, mem)
    return rows


def _class_rows(gpu: str, model: str, tp: int, quant: str, mig: str, clock: int | None,
                perf: float, power: float | None, mem: float) -> list[ProfileRow]:
    return [ProfileRow(gpu, model, tp, quant, mig, clock, None, qc, msrr_rps=round(m * perf, 4),
                       slo_p95_s=20.0, avg_power_w=power, memory_gb=mem, source=Source.DERIVED,
                       provenance="bench synthetic") for qc, m in A100_8B_MSRR.items()]


def cluster(n_gpus: int) -> tuple[tuple[NodeState, ...], Limits]:
    nodes = []
    for i in range(n_gpus // GPUS_PER_NODE):
        gpu_type = "a100-80gb" if i % 2 == 0 else "h100-80gb"
        row = f"row{i // NODES_PER_ROW}"
        aisle = f"aisle{i // (2 * NODES_PER_ROW)}"
        inlet = 22.0 + (i // NODES_PER_ROW) % 3 + 0.3 * (i % NODES_PER_ROW)
        gpus = tuple(GpuState(g, gpu_type) for g in range(GPUS_PER_NODE))
        nodes.append(NodeState(f"n{i:05d}", row, aisle, gpus, inlet_temp_c=inlet))
    row_peak: dict[str, float] = {}
    aisle_peak: dict[str, float] = {}
    for n in nodes:
        shape = shape_of(n)
        p, _ = node_power_w(shape, shape.max_gpu_power_w)
        cfm = server_model_for(shape.gpu_type).airflow_cfm(1.0, shape.n_gpus)
        row_peak[n.row] = row_peak.get(n.row, 0.0) + p
        aisle_peak[n.aisle] = aisle_peak.get(n.aisle, 0.0) + cfm
    return tuple(nodes), Limits({r: 0.8 * w for r, w in row_peak.items()},
                                {a: 0.8 * c for a, c in aisle_peak.items()})


def endpoints(n: int, trace_path: Path, rng: random.Random
              ) -> tuple[tuple[EndpointSpec, ...], dict[str, dict[QueryClass, float]]]:
    trace = read_azure_trace(trace_path)
    specs, mixes = [], {}
    for i in range(n):
        model = "llama-70b" if i % 10 == 0 else rng.choice(["llama-8b", "qwen-7b", "mistral-7b"])
        quants = ("none", "fp8") if i % 3 else ("none",)  # a third keep an FP16 quality floor
        name = f"ep{i:03d}"
        specs.append(EndpointSpec(name, model, allowed_quantizations=quants))
        start = rng.randrange(0, len(trace) - 2000)
        mixes[name] = class_shares(trace[start:start + 2000])
    return tuple(specs), {k: {qc: s for qc, s in v.items()} for k, v in mixes.items()}


def default_config(profiles: Sequence[ProfileRow], model: str, gpu: str,
                   mix: dict[QueryClass, float]) -> tuple[int, float, float]:
    """(TP, capacity req/s, power W) of the static default: FP16, smallest TP that fits,
    full clock."""
    tp = 1 if MODELS[model][0] <= 80 else 2
    rows = [r for r in profiles
            if (r.gpu_type, r.model, r.tensor_parallel, r.quantization, r.mig_profile,
                r.sm_clock_mhz) == (gpu, model, tp, "none", "full", None)]
    per = {r.query_class: r.msrr_rps or 0.0 for r in rows}
    cap = 1.0 / sum(share / per[qc] for qc, share in mix.items() if share > 0)
    return tp, cap, max(r.avg_power_w or 0.0 for r in rows)


def static_baseline(nodes: Sequence[NodeState], specs: Sequence[EndpointSpec],
                    demand: dict[str, dict[QueryClass, float]], profiles: Sequence[ProfileRow],
                    limits: Limits) -> tuple[list[InstanceState], int] | None:
    """First-fit whole-GPU instances within the row power limits; None when they do not fit."""
    free = {n.node_id: list(range(len(n.gpus))) for n in nodes}
    types = {n.node_id: n.gpus[0].gpu_type for n in nodes}
    shapes = {n.node_id: shape_of(n) for n in nodes}
    idle = {t: GPU_MODELS[t].idle_power_w for t in set(types.values())}
    gpu_w = {n.node_id: len(n.gpus) * idle[types[n.node_id]] for n in nodes}
    row_w: dict[str, float] = {}
    for n in nodes:
        row_w[n.row] = row_w.get(n.row, 0.0) + node_power_w(shapes[n.node_id], gpu_w[n.node_id])[0]
    out: list[InstanceState] = []
    cache: dict[tuple[str, str], tuple[int, float, float]] = {}
    for spec in specs:
        d = demand[spec.name]
        total = sum(d.values())
        mix = {qc: v / total for qc, v in d.items()}
        for t in set(types.values()):
            cache[(spec.name, t)] = default_config(profiles, spec.model, t, mix)
        k, placed_rps = 0, 0.0
        while placed_rps < total * (1 + HEADROOM) - 1e-9 or k == 0:
            found = None
            for n in nodes:
                tp, cap, power = cache[(spec.name, types[n.node_id])]
                if len(free[n.node_id]) < tp:
                    continue
                extra = power - tp * idle[types[n.node_id]]
                old = node_power_w(shapes[n.node_id], gpu_w[n.node_id])[0]
                new = node_power_w(shapes[n.node_id], gpu_w[n.node_id] + extra)[0]
                if row_w[n.row] + new - old <= limits.row_power_limit_w[n.row]:
                    found = (n, tp, cap, extra, new - old)
                    break
            if found is None:
                return None
            n, tp, cap, extra, d_w = found
            gpus = tuple(free[n.node_id][:tp])
            free[n.node_id] = free[n.node_id][tp:]
            gpu_w[n.node_id] += extra
            row_w[n.row] += d_w
            out.append(InstanceState(f"{spec.name}-s{k}", spec.name, n.node_id, gpus, spec.model,
                                     tensor_parallel=tp))
            placed_rps += cap
            k += 1
    used = sum(len(n.gpus) - len(free[n.node_id]) for n in nodes)
    return out, used


def lower_bound(nodes: Sequence[NodeState], specs: Sequence[EndpointSpec],
                demand: dict[str, dict[QueryClass, float]], profiles: Sequence[ProfileRow],
                config: RebalanceConfig, time_limit_s: float) -> float:
    gpu_types = sorted({n.gpus[0].gpu_type for n in nodes})
    avail = {t: sum(len(n.gpus) for n in nodes if n.gpus[0].gpu_type == t) for t in gpu_types}
    cols: list[tuple[int, object]] = []  # (endpoint index, candidate)
    for e, spec in enumerate(specs):
        for c in all_candidates(spec, demand[spec.name], profiles, gpu_types, config).values():
            cols.append((e, c))
    nx, nt = len(cols), len(gpu_types)
    cost = np.concatenate([np.zeros(nx), np.ones(nt)])
    rows, lo, hi = [], [], []
    for e, spec in enumerate(specs):  # coverage: Σ x / units >= 1, and min instances
        cover = np.zeros(nx + nt)
        count = np.zeros(nx + nt)
        for j, (ej, c) in enumerate(cols):
            if ej == e:
                cover[j] = 1.0 / c.load_units(demand[spec.name], config.headroom_frac)
                count[j] = 1.0
        rows += [cover, count]
        lo += [1.0, spec.min_instances]
        hi += [np.inf, np.inf]
    for t_i, t in enumerate(gpu_types):  # compute and memory capacity per GPU type
        for dim in ("slices", "slots"):
            r = np.zeros(nx + nt)
            for j, (_, c) in enumerate(cols):
                if c.config.gpu_type == t:
                    if c.gpus:
                        r[j] = c.gpus
                    else:
                        r[j] = (c.slices / MIG_COMPUTE_SLICES if dim == "slices"
                                else c.mem_slots / MIG_MEMORY_SLOTS)
            r[nx + t_i] = -1.0
            rows.append(r)
            lo.append(-np.inf)
            hi.append(0.0)
    res = milp(cost, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.ones(nx + nt),
               bounds=Bounds(np.zeros(nx + nt),
                             np.concatenate([np.full(nx, np.inf),
                                             [avail[t] for t in gpu_types]])),
               options={"time_limit": time_limit_s, "mip_rel_gap": 1e-3})
    bound = getattr(res, "mip_dual_bound", None)
    if bound is None or not math.isfinite(bound):
        bound = res.fun if res.success else float("nan")
    return math.ceil(bound - 1e-6)


def scaled_demand(specs: Sequence[EndpointSpec], mixes: dict[str, dict[QueryClass, float]],
                  nodes: Sequence[NodeState], profiles: Sequence[ProfileRow],
                  limits: Limits, rng: random.Random, fill: float = 0.7
                  ) -> dict[str, dict[QueryClass, float]]:
    weights = {s.name: rng.lognormvariate(0, 1.2) for s in specs}
    n_gpus = sum(len(n.gpus) for n in nodes)
    lo_s, hi_s = 0.0, 1000.0
    for _ in range(16):  # bisect the scale so the static baseline uses ~fill of the GPUs
        mid = (lo_s + hi_s) / 2
        demand = {k: {qc: w * mid * s for qc, s in mixes[k].items()} for k, w in weights.items()}
        base = static_baseline(nodes, specs, demand, profiles, limits)
        if base is not None and base[1] <= fill * n_gpus:
            lo_s = mid
        else:
            hi_s = mid
    return {k: {qc: w * lo_s * s for qc, s in mixes[k].items()} for k, w in weights.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--endpoints", type=int, default=0, help="default: 50 per 1000 GPUs, max 500")
    p.add_argument("--rounds", type=int, default=0, help="solves timed (default 15, 7 at 10k)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--fit", default="dot", choices=("dot", "l2"))
    p.add_argument("--lb-time-limit-s", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.gpus < 64 or args.gpus % GPUS_PER_NODE:
        print(f"--gpus must be a multiple of {GPUS_PER_NODE}, >= 64", file=sys.stderr)
        return 2
    n_ep = args.endpoints or max(10, min(500, args.gpus * 50 // 1000))
    rounds = args.rounds or (7 if args.gpus >= 5000 else 15)
    rng = random.Random(args.seed)
    profiles = synthetic_profiles()
    nodes, limits = cluster(args.gpus)
    specs, mixes = endpoints(n_ep, args.trace, rng)
    print(f"cluster: {args.gpus} GPUs ({len(nodes)} nodes, A100/H100 half each), "
          f"{len(limits.row_power_limit_w)} rows, limits 80% of peak; {n_ep} endpoints; "
          f"{len(profiles)} synthetic profile rows; assumptions {ASSUMPTIONS}")
    trace_shares = class_shares(read_azure_trace(args.trace))
    print("trace class mix: " + ", ".join(f"{qc}={trace_shares[qc]:.1%}" for qc in CLASSES))
    demand = scaled_demand(specs, mixes, nodes, profiles, limits, rng)
    base = static_baseline(nodes, specs, demand, profiles, limits)
    assert base is not None
    static_instances, static_used = base
    config = RebalanceConfig(max_restarts_per_round=100_000, hysteresis_s=0, fit=args.fit)
    times, plan = [], None
    for r in range(rounds):
        jitter = {k: {qc: v * (1 + 0.05 * rng.uniform(-1, 1)) for qc, v in d.items()}
                  for k, d in demand.items()} if r else demand
        snap = ClusterSnapshot(nodes, tuple(static_instances), specs, jitter, now_s=1e6)
        t0 = time.perf_counter()
        result = rebalance(snap, profiles, limits, config)
        times.append(time.perf_counter() - t0)
        if r == 0:
            plan = result
    assert plan is not None
    lb = lower_bound(nodes, specs, demand, profiles, config, args.lb_time_limit_s)
    used = plan.gpus_used_after
    p50 = statistics.median(times)
    p99 = float(np.percentile(times, 99))
    decisions = {d: sum(o.decision == d for o in plan.outcomes)
                 for d in ("reshaped", "kept", "deferred", "unplaceable")}
    print(f"solve time over {rounds} solves (demand +-5%): p50 {p50:.3f} s, p99 {p99:.3f} s "
          f"(p99 of {rounds} samples is about the max)")
    print(f"GPUs used: rebalanced {used}, static baseline {static_used}, lower bound {lb} "
          f"(integer program, placement and limits relaxed)")
    print(f"power (GPU, modeled): static {plan.power_before_w / 1e3:.1f} kW -> "
          f"rebalanced {plan.power_after_w / 1e3:.1f} kW")
    print(f"moves from static: {plan.restarts} restarts in {len(plan.stages)} stages; "
          f"decisions {decisions}; warnings {len(plan.warnings)}")
    for w in plan.warnings[:5]:
        print(f"  warning: {w}")
    print(f"gpus={args.gpus} solve_p99_s={p99:.3f} used_over_lower_bound={used / lb:.2f} "
          f"used_vs_static={used / static_used:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
