"""shapectl simulate: run a built-in or file scenario through the trace-driven simulator."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shapeshifter.common.errors import DomainError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate a scenario on a request trace and write the evaluation",
        description="Run baseline and shapeshifter policies over a scenario; writes "
                    "DIR/summary.json, CSV, a Markdown summary and PNG plots.")
    p.add_argument("--scenario", required=True, metavar="NAME|FILE",
                   help="built-in (ablation, oversubscription, ups-failure) or a YAML file")
    p.add_argument("--trace", metavar="CSV",
                   help="Azure-schema trace (TIMESTAMP, ContextTokens, GeneratedTokens); "
                        "default: the shipped 20-minute sample of the conversation trace")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--servers", type=int, metavar="N", help="servers before oversubscription")
    p.add_argument("--hours", type=float, metavar="H", help="simulated duration in hours")
    p.add_argument("--seed", type=int, metavar="S", help="random seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    # Imported here so that other shapectl commands do not pay for numpy and matplotlib.
    from simulator.inputs.scenario import load_scenario, with_overrides
    from simulator.inputs.trace import default_trace_path, load_trace
    from simulator.runner import run_scenario

    try:
        scenario = with_overrides(load_scenario(args.scenario), servers=args.servers,
                                  hours=args.hours, seed=args.seed)
        trace_path = Path(args.trace) if args.trace else default_trace_path()
        trace = load_trace(trace_path)
        result = run_scenario(scenario, trace, str(trace_path), Path(args.out),
                              show_progress=not args.quiet and sys.stderr.isatty())
    except DomainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    brief = {name: {k: m[k] for k in ("peak_row_power_w", "max_gpu_temp_c", "capped_time_frac",
                                       "slo_attainment", "energy_j_per_token", "gpus_used")}
             for name, m in result["policies"].items()}
    print(json.dumps({"scenario": result["scenario"], "out": args.out, "policies": brief},
                     indent=1))
    return 0
