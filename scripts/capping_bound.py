"""How much capping the physics forces: a scenario's opaque tenants at their uncapped draw, every
SaaS GPU at a fixed draw (55 W = idle on A100; ~100 W is about the least the LLM load needs at
the lowest clocks), the servers' hosts and fans from the server model; the share of time (5 s
samples) some row or aisle is over its limit anyway, with the layout a policy's placement gives.

Usage: python scripts/capping_bound.py SCENARIO TRACE [--oversubscription X] [--seed N]
                                       [--saas-gpu-w 55 100] [--policy NAME]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from shapeshifter.hw import physics
from simulator.control.policies import make_policy
from simulator.engine import Engine
from simulator.inputs.scenario import load_scenario
from simulator.inputs.trace import load_trace
from simulator.model import shapes
from simulator.model.plant import FAN_GRID


def over_share(e: Engine, saas_gpu_w: float) -> tuple[float, float, float]:
    """(share of time some aisle is over, some row is over, highest share of a limit)."""
    s, c, m = e.scenario, e.cluster, e.cluster.gpu
    n = over_aisle = over_row = 0
    worst = 0.0
    for t in np.arange(0.0, s.duration_s, 5.0):
        act = shapes.opaque_activity(s.opaque, t, e.opaque_phase, e.opaque_jitter)
        gpu_w = np.where(e.opaque, physics.power_w(act, m.sm_max_clock_mhz, m.sm_max_clock_mhz,
                                                   m.idle_power_w, m.dynamic_power_max_w),
                         saas_gpu_w)
        server_w = np.bincount(e.gpu_server, gpu_w, minlength=c.n_servers)
        load = server_w / (c.gpus_per_server * m.power.max_w)
        idx = np.clip(np.rint(load * (FAN_GRID - 1)).astype(int), 0, FAN_GRID - 1)
        total_w = c.server.idle_power_w(c.gpus_per_server) + server_w + e.fan_w[idx]
        rows = np.bincount(c.server_row, total_w, minlength=c.n_rows) / c.row_limit_w
        aisles = np.bincount(c.server_aisle, e.airflow_cfm[idx],
                             minlength=c.n_aisles) / c.aisle_limit_cfm
        n += 1
        over_aisle += int((aisles > 1).any())
        over_row += int((rows > 1).any())
        worst = max(worst, float(rows.max()), float(aisles.max()))
    return over_aisle / n, over_row / n, worst


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario")
    p.add_argument("trace")
    p.add_argument("--saas-gpu-w", type=float, nargs="+", default=[55.0, 100.0])
    p.add_argument("--policy", default="shapeshifter", help="whose placement (layout)")
    p.add_argument("--oversubscription", type=float, help="extra servers per row (fraction)")
    p.add_argument("--seed", type=int, help="layout seed")
    args = p.parse_args(argv)
    scenario = load_scenario(args.scenario)
    if args.oversubscription is not None:
        scenario = scenario.model_copy(update={"cluster": scenario.cluster.model_copy(
            update={"oversubscription": args.oversubscription})})
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    e = Engine(scenario, load_trace(args.trace), make_policy(args.policy))
    for w in args.saas_gpu_w:
        a, r, worst = over_share(e, w)
        print(f"SaaS GPUs at {w:g} W: some aisle over {a:.1%} of the time, some row over "
              f"{r:.1%}, highest {worst:.3f} x its limit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
