"""Run a scenario: every policy (and every oversubscription point), with a progress bar."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from simulator.control.policies import policy_sources
from simulator.engine import simulate
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import Trace
from simulator.reporting.metrics import Metrics
from simulator.reporting.report import write_outputs


def run_scenario(scenario: Scenario, trace: Trace, trace_name: str, out: Path,
                 show_progress: bool = True) -> dict[str, Any]:
    """Simulate, write the outputs into `out`, return the summary dict (summary.json)."""
    points = scenario.sweep_oversubscription or [scenario.cluster.oversubscription]
    jobs = [(o, p) for o in points for p in scenario.policies]
    runs: dict[tuple[float, str], Metrics] = {}
    wall: dict[str, float] = {}
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as bar:
        for o, name in jobs:
            s = scenario.model_copy(update={"cluster": scenario.cluster.model_copy(
                update={"oversubscription": o})})
            task = bar.add_task(f"{scenario.name} +{o:.0%} {name}", total=1.0)
            start = time.perf_counter()
            runs[(o, name)] = simulate(s, trace, name,
                                       on_step=lambda k, n, t=task: bar.update(t, completed=k / n))
            wall[f"{name}@{o:g}"] = round(time.perf_counter() - start, 2)
    main_o = 0.0 if 0.0 in points else points[0]
    main = {name: runs[(main_o, name)] for name in scenario.policies}
    first = next(iter(main.values()))
    result: dict[str, Any] = {
        "scenario": scenario.name, "description": scenario.description,
        "servers": first.cluster.n_servers, "duration_s": scenario.duration_s,
        "seed": scenario.seed, "trace": trace_name, "oversubscription": main_o,
        "row_limit_w": float(first.cluster.row_limit_w.max()),
        "gpu_slowdown_c": first.cluster.gpu.thermal.slowdown_c,
        "policies": {name: m.summary() for name, m in main.items()},
        "policy_sources": {name: policy_sources(name) for name in scenario.policies},
        "wall_s": wall,
    }
    if scenario.sweep_oversubscription:
        result["sweep"] = [{"oversubscription": o,
                            "policies": {n: runs[(o, n)].summary() for n in scenario.policies}}
                           for o in points]
    write_outputs(out, result, main)
    return result
