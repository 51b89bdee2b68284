"""Hostile-input fuzzing (issue 9): N hypothesis cases per entry point against every NodeAgent and
Coordinator RPC (servicers in-process over a sim agent; admin calls reach it through the
coordinator), the AgentLink registration and report ingest, the agent config and the topology.

    python bench/fuzz.py --cases 10000 [--only SetPowerLimit,config]

A crash is an exception other than the servicer's abort, an INTERNAL/UNKNOWN status, or a
refused call that changed the GPUs, the journal or the node registry. Per entry point it prints
the outcome counts; the last line is: cases=N crashes=C entry_points=E seconds=S
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common.logging import configure_logging
from tests import hostile


def entry_points(agent: hostile.AgentHarness, coord: hostile.CoordinatorHarness
                 ) -> dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], hostile.Verdict]]]:
    points: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], hostile.Verdict]]] = {}
    for name, cls in hostile.agent_methods().items():
        points[f"agent.{name}"] = (hostile.proto(cls), lambda r, n=name: agent.call(n, r))
    for name, cls in hostile.coordinator_methods().items():
        points[f"coordinator.{name}"] = (hostile.proto(cls), lambda r, n=name: coord.call(n, r))
    link = st.tuples(hostile.proto(lpb.Register), hostile.proto(lpb.NodeReport))
    points["link.RegisterAndReport"] = (link, lambda pair: coord.register(*pair))
    points["config"] = (hostile.config_trees(), hostile.check_config)
    points["topology"] = (hostile.topology_trees(), hostile.check_topology_tree)
    points["topology_text"] = (hostile.TOPOLOGY_TEXTS, hostile.check_topology_text)
    return points


def run_point(strategy: st.SearchStrategy[Any], check: Callable[[Any], hostile.Verdict],
              cases: int) -> tuple[collections.Counter[str], list[str]]:
    counts: collections.Counter[str] = collections.Counter()
    crashes: list[str] = []

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(value: Any) -> None:
        verdict = check(value)
        counts[verdict.outcome] += 1
        if verdict.crashed and len(crashes) < 3:
            crashes.append(verdict.detail[:400])

    body()
    return counts, crashes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000, help="hypothesis cases per entry point")
    p.add_argument("--only", default="", help="comma-separated substrings of entry point names")
    args = p.parse_args()
    configure_logging("error")  # the refusals are the point; their log lines are noise here
    start_s = time.perf_counter()
    total = crashes_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        agent = hostile.make_agent(Path(tmp) / "agent")
        coord = hostile.make_coordinator(Path(tmp) / "coordinator")
        points = entry_points(agent, coord)
        wanted = [w for w in args.only.split(",") if w]
        selected = {k: v for k, v in points.items() if not wanted or any(w in k for w in wanted)}
        try:
            for name, (strategy, check) in selected.items():
                t0 = time.perf_counter()
                counts, crashes = run_point(strategy, check, args.cases)
                n = sum(counts.values())
                total += n
                crashes_total += counts["crash"]
                summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                print(f"{name}: cases={n} {summary} ({time.perf_counter() - t0:.1f}s)",
                      flush=True)
                for detail in crashes:
                    print(f"  CRASH {detail}", flush=True)
        finally:
            coord.close()
            agent.close()
    print(f"cases={total} crashes={crashes_total} entry_points={len(selected)} "
          f"seconds={time.perf_counter() - start_s:.0f}")
    return 1 if crashes_total else 0


if __name__ == "__main__":
    sys.exit(main())
