"""Validation of the simulator against the live system: one scenario, both ways (issue 8 item 5).

The scenario: N nodes x G simulated GPUs (default 16 x 8 H100) in 2 rows (shapectl demo's
topology: node i in rack i mod 4, racks k1/k2 in row r1, k3/k4 in row r2), every GPU at a
constant full load, row feeds at ROW_LIMIT_FRAC of the rows' peak draw (the load fits), airflow
limits out of reach. After --emergency-at S seconds a UPS failure drops row r1 to 75 %.

(a) live: the real coordinator daemon and N `nodeagent --backend sim --sim-load busy` processes
    on localhost (started and stopped by shapectl.commands.demo.start_cluster); the emergency is
    declared over the Emergency gRPC service (shapectl.commands.demo.UpsScript). Row power is
    sampled from GetCluster every 0.5 s; time-to-under-limit is read from the emergency's status
    (what `shapectl emergency show --json` prints: under_limit_s) and from those samples.
(b) simulated: the same topology, load and failure through simulator.engine with 1 s steps;
    caps come from coordinator.policy.capping.shed, as in the live controller, on every 1 s report.

What is comparable:
- Both sides use shapeshifter/hw/physics.py and shapeshifter/hw/server_model.py: at the same
  activity (1.0 = the agents' `busy` load = a flat opaque shape at 1.0 without per-GPU jitter)
  the GPU, host and fan power are the same formulas, so the peak row power must agree closely.
- Reports every 1 s on both sides (agents' report_interval_s = sampling interval = 1 s; the
  simulator's cadence.report_s = 1 s) and the same shedding margin (SHED_MARGIN, passed to the
  coordinator as --emergency-margin-frac).
What is not:
- Time-to-under-limit. The live controller plans the caps at declaration from the latest
  reports and the agents apply them within milliseconds; "under limit" is the first report
  that carries a sample taken after that. An agent samples every 1 s and reports its latest
  sample every 1 s, two loops with independent phases, so the live figure is declaration +
  (0..2 s) + transport, about 1 s on average. The simulator's failure is aligned with a report
  tick: caps planned at that tick, the next report (1 s later) is under, so it reads exactly
  one report interval. The difference therefore lies within -1..+1 s by construction; the
  samples of (a) add up to 0.5 s of their own quantization.
- Power after the cut. The live controller plans once from the pre-cap draw and holds its caps
  (fans slow down under the caps, so the row ends below its target); the simulator re-plans on
  every report from the current fan draw and settles nearer the target. Shown, not asserted.
- Phase 2 (`--phase2`, issue 18): both sides lock the capped GPUs at the clock that fits their
  cap (coordinator.policy.capping.phase2, the same function): live once the row has been under its
  limit for PHASE2_AFTER_S, simulated on every routing interval (set to the report interval).
  Compared: the row's mean power over the last PHASE2_WINDOW_S (target: within 5 %) and
  time-to-under-limit (within one report interval), and how many GPUs each side locked. The
  agents here serve no LLM instance, so Phase 2's routing and reshape have nothing to move.
  Without `--phase2` both sides run Phase 1 only.
- Live extras the simulator has not: the rebalancer's reconfiguration (switched off here with
  --emergency-reconfigure-after-s 0), pre-arming, acknowledgements, re-issues. Temperatures
  (the agents' inlet is a constant 25 C; the simulator's comes from the inlet model) stay far
  below throttling at this load.

    .venv/bin/python bench/sim_validation.py [--nodes 16] [--gpus 8] [--seconds 30]

    .venv/bin/python bench/sim_validation.py --phase2 [...]

The last line is: peak_row_power_diff_pct=X under_limit_diff_s=Y (live minus simulated;
X relative to the live figure); with --phase2 also phase2_row_power_diff_pct=Z.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from coordinator.profiles.schema import ProfileRow
from coordinator.profiles.store import default_rows
from shapectl.commands.cluster import cluster_status
from shapectl.commands.demo import UpsScript, demo_topology, start_cluster
from shapectl.commands.emergency import status_json as emergency_json
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.common.errors import NotFound
from simulator.control.policies import SHED_MARGIN, Components, ComposedPolicy
from simulator.engine import Engine
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import Trace, default_trace_path, load_trace
from simulator.model.service import fit_service

GPU_TYPE = "h100-80gb"
ROW_LIMIT_FRAC = 1.05  # row feed / the row's draw at full load: fits; 75 % of it does not
AISLE_LIMIT_FRAC = 1.5  # airflow limits out of reach (neither side caps for airflow here)
CAPACITY = 0.75  # UpsScript's UPS failure: row r1 to 75 %
LIVE_ROW, SIM_ROW = "r1", 0  # the failing row on each side (same nodes: the first rack pair)
REPORT_INTERVAL_S = 1.0
SAMPLE_INTERVAL_S = 0.5
STARTUP_TIMEOUT_S = 90.0
ROW_COUNT = 2  # demo_topology's rows
NODE_MULTIPLE = 4  # demo_topology's racks: equal rows need a multiple of 4 nodes
PHASE2_AFTER_S = 2.0  # live: under the limit this long -> Phase 2 clock locks
PHASE2_WINDOW_S = 5.0  # the row's mean power over the run's last seconds (Phase 2 in force)


@dataclass(frozen=True)
class Setup:
    nodes: int = 16
    gpus: int = 8
    seconds: float = 30.0  # run length after every node reported
    emergency_at_s: float = 10.0  # UPS failure this long after every node reported
    seed: int = 0  # the simulator's seed (the agents' are fixed per node by start_cluster)
    phase2: bool = False  # Phase 2 clock locks on both sides

    def __post_init__(self) -> None:
        if self.nodes < NODE_MULTIPLE or self.nodes % NODE_MULTIPLE or self.nodes > 64:
            raise ValueError(f"nodes={self.nodes}: a multiple of {NODE_MULTIPLE} in [4, 64]")
        if not 1 <= self.gpus <= 16:
            raise ValueError(f"gpus={self.gpus} is outside [1, 16]")
        if not 2.0 <= self.emergency_at_s <= self.seconds - 3.0:
            raise ValueError("need emergency_at_s >= 2 and seconds >= emergency_at_s + 3")


@dataclass(frozen=True)
class SideResult:
    peak_row_power_w: float  # the failing row, highest sample before the failure
    limit_w: float  # the failing row's limit during the failure
    under_limit_s: float  # failure -> the row under its new limit (-1: never)
    sampled_under_limit_s: float  # the same from the 0.5 s samples (live) or the steps (sim)
    final_row_power_w: float  # the failing row at the end of the run
    end_row_power_w: float = 0.0  # its mean over the last PHASE2_WINDOW_S
    gpus_locked: int = 0  # GPUs under a Phase 2 clock lock at the end


# ---------------------------------------------------------------- (b) the simulator

def validation_scenario(setup: Setup) -> Scenario:
    """The simulator's side of the scenario: opaque GPUs only, flat full load, no jitter."""
    per_row = setup.nodes // ROW_COUNT
    return Scenario.model_validate({
        "name": "live-validation", "duration_s": setup.seconds, "seed": setup.seed,
        "cluster": {"servers": setup.nodes, "gpu_type": GPU_TYPE, "gpus_per_server": setup.gpus,
                    "rows": ROW_COUNT, "aisles": 2, "servers_per_rack": max(1, per_row // 2),
                    "saas_fraction": 0.0, "row_provision_frac": ROW_LIMIT_FRAC,
                    "aisle_provision_frac": AISLE_LIMIT_FRAC},
        "opaque": {"shape": "flat", "tenants": 1, "mean_activity": 1.0, "amplitude": 0.0,
                   "gpu_jitter": 0.0},
        "cadence": {"report_s": REPORT_INTERVAL_S, "route_s": REPORT_INTERVAL_S},
        "failures": [{"kind": "ups", "at_s": setup.emergency_at_s, "target": SIM_ROW,
                      "capacity_frac": CAPACITY}],
        "policies": ["baseline"]})


def stand_in_profiles(scenario: Scenario) -> list[ProfileRow]:
    """The engine fits a service model for the LLM endpoints even when no server serves one
    (saas_fraction 0). Without profiles of the workload model on this GPU, the a100-80gb rows,
    relabelled, stand in: no request arrives, so they change nothing."""
    rows = default_rows()
    model, gpu = scenario.workload.model, scenario.cluster.gpu_type
    try:
        fit_service(rows, gpu, model)
        return rows
    except NotFound:  # no LISO/SILO MSRR rows for this model on this GPU
        return [dataclasses.replace(r, gpu_type=gpu) for r in rows
                if r.model == model and r.gpu_type == "a100-80gb"]


def simulate_side(setup: Setup, trace: Trace) -> tuple[SideResult, Any]:
    """Run the simulator; returns its figures and its Metrics (row power per step)."""
    scenario = validation_scenario(setup)
    policy = ComposedPolicy("live-validation", Components(priority_shed=True,
                                                          phase2=setup.phase2))
    engine = Engine(scenario, trace, policy, profile_rows=stand_in_profiles(scenario))
    m = engine.run()
    power_w, limit_w = m.row_power_w[:, SIM_ROW], m.row_limit_w[:, SIM_ROW]
    at_s = setup.emergency_at_s
    under = first_under_s(m.t_s - at_s, power_w, limit_w)
    before = m.t_s < at_s
    end = m.t_s >= m.t_s[-1] - PHASE2_WINDOW_S
    return SideResult(peak_row_power_w=float(power_w[before].max()),
                      limit_w=float(limit_w[-1]), under_limit_s=under,
                      sampled_under_limit_s=under, final_row_power_w=float(power_w[-1]),
                      end_row_power_w=float(power_w[end].mean()),
                      gpus_locked=int(engine.phase2_locked.sum())), m


def first_under_s(rel_t_s: np.ndarray, power_w: np.ndarray, limit_w: np.ndarray) -> float:
    """The first time >= 0 (relative to the failure) with power <= limit; -1 if none."""
    ok = (rel_t_s >= 0) & (power_w <= limit_w)
    return float(rel_t_s[np.argmax(ok)]) if ok.any() else -1.0


# ---------------------------------------------------------------- (a) the live system

def live_side(setup: Setup, workdir: Path) -> tuple[SideResult, dict[str, Any]]:
    """Start coordinator + agents in workdir, run the scenario, stop them. Returns the figures
    and the emergency's `show --json` object."""
    topology = demo_topology(setup.nodes, GPU_TYPE, setup.gpus, ROW_LIMIT_FRAC, AISLE_LIMIT_FRAC)
    cluster = start_cluster(
        workdir, setup.nodes, GPU_TYPE, setup.gpus, sim_load="busy",
        report_interval_s=REPORT_INTERVAL_S, topology=topology,
        coordinator_args=["--log-level", "warning", "--emergency-margin-frac", str(SHED_MARGIN),
                          "--emergency-phase2-after-s",
                          str(PHASE2_AFTER_S if setup.phase2 else 0),
                          "--emergency-reconfigure-after-s", "0"])
    try:
        all_up_mono_s = wait_all_reported(cluster.coordinator_addr, setup)
        ups = UpsScript(cluster.coordinator_addr, setup.emergency_at_s, math.inf)
        samples = sample_rows(cluster.coordinator_addr, ups, all_up_mono_s, setup.seconds)
        ups.refresh()
    finally:
        cluster.stop()
    if ups.error or ups.status is None:
        raise RuntimeError(f"the emergency failed: {ups.error or 'never declared'}")
    shown = emergency_json(ups.status)
    return live_figures(samples, shown, setup.seconds), shown


def wait_all_reported(address: str, setup: Setup) -> float:
    """Poll GetCluster until every node is up with all its GPUs; the monotonic time then."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        status = try_status(address)
        if status is not None and sum(r.nodes_up for r in status.rows) >= setup.nodes \
                and sum(r.gpus for r in status.rows) >= setup.nodes * setup.gpus:
            return time.monotonic()
        time.sleep(SAMPLE_INTERVAL_S)
    raise TimeoutError(f"not every node reported within {STARTUP_TIMEOUT_S:g} s")


def try_status(address: str) -> cpb.ClusterStatus | None:
    try:
        return cluster_status(address, 2.0)
    except grpc.RpcError:
        return None


def sample_rows(address: str, ups: UpsScript, all_up_mono_s: float,
                seconds: float) -> list[tuple[float, float]]:
    """(coordinator time, failing row's power) every SAMPLE_INTERVAL_S; the UPS script declares
    its failure on schedule in between."""
    samples: list[tuple[float, float]] = []
    next_s = time.monotonic()
    while (now_s := time.monotonic()) - all_up_mono_s < seconds:
        status = try_status(address)
        if status is not None:
            row = next(r for r in status.rows if r.name == LIVE_ROW)
            samples.append((status.generated_at_unix_s, row.power_draw_w))
        ups.step(now_s - all_up_mono_s)
        next_s += SAMPLE_INTERVAL_S
        time.sleep(max(0.0, next_s - time.monotonic()))
    return samples


def live_figures(samples: list[tuple[float, float]], shown: dict[str, Any],
                 seconds: float = math.inf) -> SideResult:
    t0 = float(shown["declared_at_unix_s"])
    limit_w = float(shown["power_limit_w"])
    rel_t_s = np.array([t for t, _ in samples]) - t0
    power_w = np.array([p for _, p in samples])
    before = rel_t_s < 0
    end = rel_t_s >= rel_t_s[-1] - PHASE2_WINDOW_S
    return SideResult(peak_row_power_w=float(power_w[before].max()), limit_w=limit_w,
                      under_limit_s=float(shown["under_limit_s"]),
                      sampled_under_limit_s=first_under_s(rel_t_s, power_w,
                                                          np.full(len(power_w), limit_w)),
                      final_row_power_w=float(power_w[-1]),
                      end_row_power_w=float(power_w[end].mean()),
                      gpus_locked=phase2_locks(shown))


def phase2_locks(shown: dict[str, Any]) -> int:
    """Clock locks of the emergency's Phase 2 events (its timeline in `show --json`)."""
    return sum(int(e.get("detail", {}).get("clock_locks", 0))
               for e in shown.get("timeline", []) if e.get("kind") == "phase2")


# ---------------------------------------------------------------- comparison

def differences(live: SideResult, sim: SideResult) -> dict[str, float]:
    return {"peak_row_power_diff_pct": 100.0 * (live.peak_row_power_w - sim.peak_row_power_w)
            / live.peak_row_power_w,
            "under_limit_diff_s": live.under_limit_s - sim.under_limit_s,
            "phase2_row_power_diff_pct": 100.0 * (live.end_row_power_w - sim.end_row_power_w)
            / live.end_row_power_w}


def table(live: SideResult, sim: SideResult) -> str:
    rows = [("peak row power before, W", "peak_row_power_w"), ("row limit during, W", "limit_w"),
            ("time to under limit, s", "under_limit_s"),
            ("  from the samples, s", "sampled_under_limit_s"),
            ("row power at the end, W", "final_row_power_w"),
            (f"  mean of the last {PHASE2_WINDOW_S:g} s, W", "end_row_power_w"),
            ("GPUs clock-locked (Phase 2)", "gpus_locked")]
    lines = [f"{'':28} {'live':>10} {'simulated':>10} {'live-sim':>10} {'rel':>7}"]
    for label, key in rows:
        a, b = getattr(live, key), getattr(sim, key)
        rel = f"{100 * (a - b) / a:+.2f}%" if a > 0 else ""
        lines.append(f"{label:28} {a:10.2f} {b:10.2f} {a - b:+10.2f} {rel:>7}")
    return "\n".join(lines)


def run(setup: Setup, workdir: Path | None = None, keep: bool = False
        ) -> tuple[SideResult, SideResult, dict[str, Any]]:
    """Both sides of the scenario; returns (live, simulated, the emergency's show --json)."""
    sim, _ = simulate_side(setup, load_trace(default_trace_path()))
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="shapeshifter-validation-")) if own else workdir
    assert wd is not None
    try:
        live, shown = live_side(setup, wd)
    finally:
        if own and not keep:
            shutil.rmtree(wd, ignore_errors=True)
    return live, sim, shown


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=16, help="agents, a multiple of 4 (4-64)")
    p.add_argument("--gpus", type=int, default=8, help="simulated H100s per node")
    p.add_argument("--seconds", type=float, default=30.0, help="run length after all report")
    p.add_argument("--emergency-at", type=float, default=10.0, metavar="S",
                   help="UPS failure S seconds after every node reported")
    p.add_argument("--seed", type=int, default=0, help="the simulator's seed")
    p.add_argument("--workdir", type=Path, help="logs, state and db here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.add_argument("--phase2", action="store_true",
                   help="Phase 2 clock locks on both sides (live after "
                        f"{PHASE2_AFTER_S:g} s under the limit)")
    args = p.parse_args()
    setup = Setup(args.nodes, args.gpus, args.seconds, args.emergency_at, args.seed,
                  args.phase2)
    live, sim, _ = run(setup, args.workdir, args.keep)
    diff = differences(live, sim)
    print(f"{setup.nodes} nodes x {setup.gpus} {GPU_TYPE}, {ROW_COUNT} rows, busy load; "
          f"UPS {CAPACITY:.0%} on row {LIVE_ROW} at {setup.emergency_at_s:g} s; reports every "
          f"{REPORT_INTERVAL_S:g} s")
    print(table(live, sim))
    if args.json:
        print(json.dumps({"live": dataclasses.asdict(live), "simulated": dataclasses.asdict(sim),
                          **diff}))
    last = (f"peak_row_power_diff_pct={diff['peak_row_power_diff_pct']:.3f} "
            f"under_limit_diff_s={diff['under_limit_diff_s']:.3f}")
    if setup.phase2:
        last += f" phase2_row_power_diff_pct={diff['phase2_row_power_diff_pct']:.3f}"
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
