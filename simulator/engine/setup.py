"""Before the loop: the workload the endpoints serve (fitted to the profiles) and the layout (which
servers serve which endpoint or opaque tenant, from the policy's placement; demand scaled to the
static fleet)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.policy.model import Limits
from coordinator.profiles.schema import ProfileRow
from shapeshifter.hw import physics
from simulator.control.policies import Policy
from simulator.control.snapshot import PlacementInputs, class_mix
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import Trace
from simulator.model import shapes
from simulator.model.cluster import Cluster
from simulator.model.service import fit_service, quant_speedup
from simulator.model.state import Workload

PROFILE_POINTS = 48  # placement's predicted power profiles: points per opaque period

RoleCounts = list[tuple[int, int]]  # (role, servers): endpoint e >= 0, opaque tenant t as -1 - t


def build_workload(s: Scenario, c: Cluster, trace: Trace, rows: list[ProfileRow]) -> Workload:
    model = s.workload.model
    params = fit_service(rows, c.gpu.key, model)
    mean_p, mean_g = float(trace.prompt_tokens.mean()), float(trace.output_tokens.mean())
    total_s = params.mean_request_s(mean_p, mean_g)
    decode_s = mean_g * (params.tau0_s / params.max_concurrency + params.kappa_s)
    clocks = sorted({r.sm_clock_mhz for r in rows if r.model == model
                     and r.gpu_type == c.gpu.key and r.sm_clock_mhz
                     and r.sm_clock_mhz < c.gpu.sm_max_clock_mhz})
    n_ep = s.workload.endpoints
    fp8_allowed = np.arange(n_ep) < round(n_ep * s.workload.fp8_endpoints_frac)
    try:
        fp8_speedup = quant_speedup(rows, c.gpu.key, model, "fp8")
    except Exception:  # no fp8 profile for this model: the variant is not offered
        fp8_speedup, fp8_allowed = 1.0, np.zeros(n_ep, bool)
    return Workload(n_endpoints=n_ep, fp8_allowed=fp8_allowed, fp8_speedup=fp8_speedup,
                    instance_rps=1.0 / total_s, decode_share=decode_s / total_s,
                    clock_candidates_mhz=(*clocks, c.gpu.sm_max_clock_mhz), service=params,
                    model=model, slo_s=s.workload.slo_s,
                    class_mix=class_mix(mean_p, mean_g), profiles=tuple(rows),
                    count_lead_s=s.cadence.instance_start_s + s.cadence.rebalance_s)


@dataclass(frozen=True)
class Layout:
    """Per GPU its role, per endpoint its static fleet and demand scaling."""

    opaque: np.ndarray  # bool per GPU: an opaque (IaaS) GPU
    home: np.ndarray  # per GPU the endpoint its server serves, -1 for opaque
    static_count: np.ndarray  # per endpoint, GPUs of its servers (the static fleet)
    opaque_phase: np.ndarray  # per GPU its tenant's phase (0 for LLM GPUs)
    opaque_jitter: np.ndarray  # per GPU constant activity offset
    demand_scale: np.ndarray  # per endpoint, trace rate multiplier
    demand_offset_s: np.ndarray  # per endpoint, trace time offset


def lay_out(s: Scenario, c: Cluster, w: Workload, trace: Trace, policy: Policy,
            rng: np.random.Generator) -> Layout:
    """Server roles from the policy's placement; demand scaled to the static fleet."""
    n_saas = round(c.n_servers * s.cluster.saas_fraction)
    n_ep = w.n_endpoints
    weights = 1.0 + (np.arange(n_ep) % 3)  # endpoints of different sizes
    ep_servers = split(n_saas, weights)
    tenants = s.opaque.tenants
    op_servers = split(c.n_servers - n_saas, np.ones(tenants))
    role_counts = [(e, int(n)) for e, n in enumerate(ep_servers) if n > 0]
    role_counts += [(-1 - t, int(n)) for t, n in enumerate(op_servers) if n > 0]
    phases = shapes.tenant_phases(tenants, rng)  # placement reads no random numbers
    roles = policy.roles(placement_inputs(s, c, role_counts, phases), role_counts,
                         peak_gpu_w(s, c, role_counts))
    gpu_role = roles[c.gpu_server]
    opaque = gpu_role < 0
    home = np.where(gpu_role >= 0, gpu_role, -1)
    static_count = np.bincount(home[home >= 0], minlength=n_ep)
    opaque_phase = np.where(opaque, phases[np.maximum(-1 - gpu_role, 0)], 0.0)
    opaque_jitter = shapes.gpu_jitter(c.n_gpus, rng, s.opaque.gpu_jitter)
    # Each endpoint's peak demand = peak_load_frac x its static fleet's profiled capacity.
    peak_rps = s.workload.peak_load_frac * static_count * w.instance_rps
    return Layout(opaque=opaque, home=home, static_count=static_count,
                  opaque_phase=opaque_phase, opaque_jitter=opaque_jitter,
                  demand_scale=peak_rps / trace.peak_rate_rps,
                  demand_offset_s=np.arange(n_ep) * s.workload.endpoint_phase_s)


def placement_inputs(s: Scenario, c: Cluster, role_counts: RoleCounts, phases: np.ndarray
                     ) -> PlacementInputs:
    n, max_w = c.gpus_per_server, c.gpu.power.max_w
    idle_cfm = c.server.airflow_cfm(0.0, n)
    cfm_per_w = (c.server.airflow_cfm(1.0, n) - idle_cfm) / (n * max_w)
    limits = Limits(row_power_limit_w={f"row{r}": float(v)
                                       for r, v in enumerate(c.row_limit_w)},
                    aisle_airflow_cfm={f"aisle{a}": float(v)
                                       for a, v in enumerate(c.aisle_limit_cfm)})
    return PlacementInputs(c.n_servers, c.gpus_per_server, c.spec.gpu_type, c.server_row,
                           c.server_aisle, c.inlet_base_c, c.gpu.idle_power_w,
                           c.gpu.thermal_c_per_w, limits,
                           role_profiles_w(s, c, role_counts, phases),
                           float(c.server.idle_power_w(c.gpus_per_server)),
                           idle_server_cfm=idle_cfm, cfm_per_gpu_w=cfm_per_w)


def role_profiles_w(s: Scenario, c: Cluster, role_counts: RoleCounts, phases: np.ndarray
                    ) -> dict[int, np.ndarray]:
    """Predicted draw per GPU of each role over one opaque period (TAPAS Place: a VM's power
    profile from its history; the shapes are periodic, so one past period is it): an opaque
    tenant's at its phase, an endpoint's flat at the busy decode draw."""
    m = c.gpu
    t = np.linspace(0.0, s.opaque.period_s, PROFILE_POINTS, endpoint=False)
    def power(act: np.ndarray) -> np.ndarray:
        return np.asarray(physics.power_w(act, m.sm_max_clock_mhz, m.sm_max_clock_mhz,
                                          m.idle_power_w, m.dynamic_power_max_w))
    out = {}
    for role, _ in role_counts:
        if role < 0:
            act = np.array([shapes.opaque_activity(s.opaque, float(x),
                                                   np.array([phases[-1 - role]]),
                                                   np.zeros(1))[0] for x in t])
        else:
            act = np.full(PROFILE_POINTS, physics.OASIS_DECODE_ACTIVITY)
        out[role] = power(act)
    return out


def peak_gpu_w(s: Scenario, c: Cluster, role_counts: RoleCounts) -> dict[int, float]:
    """Predicted peak draw per GPU of each role: opaque at the shape's highest activity, an LLM
    GPU at the profiled busy decode activity (OASIS Table 3's load)."""
    m, o = c.gpu, s.opaque
    opaque_act = min(1.0, o.mean_activity + o.amplitude + o.gpu_jitter)
    def power(act: float) -> float:
        return float(physics.power_w(act, m.sm_max_clock_mhz, m.sm_max_clock_mhz,
                                     m.idle_power_w, m.dynamic_power_max_w))
    return {role: power(opaque_act if role < 0 else physics.OASIS_DECODE_ACTIVITY)
            for role, _ in role_counts}


def split(n: int, weights: np.ndarray) -> np.ndarray:
    """n split in proportion to weights, largest remainders, at least 1 each while n allows."""
    share = n * weights / weights.sum()
    out = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - out))[: n - int(out.sum())]:
        out[i] += 1
    return out
