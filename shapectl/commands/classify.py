"""`shapectl classify`: query-class shares and demand (requests/s per class, OASIS §3) of a trace
(`--trace CSV`, Azure schema) or of a live vLLM endpoint's recent requests (`--url URL`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.profiles.classes import (
    CLASSES,
    DEFAULT_TAU_TOKENS,
    class_counts,
    read_azure_trace,
)
from coordinator.profiles.live import observe
from coordinator.profiles.schema import QueryClass
from shapeshifter.common.errors import DomainError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("classify", help="query-class mix of a trace or a live endpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, metavar="CSV",
                        help="TIMESTAMP, ContextTokens, GeneratedTokens")
    source.add_argument("--url", help="vLLM base URL: its /metrics is scraped twice")
    p.add_argument("--window-s", type=float, default=10.0, metavar="S",
                   help="--url: the observation window")
    p.add_argument("--tau", type=int, default=DEFAULT_TAU_TOKENS, help="class threshold (tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> int:
    try:
        result = _from_trace(args) if args.trace else _from_url(args)
    except DomainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    table = Table(title=f"query classes (tau={args.tau} tokens, {result['requests']:.0f} requests, "
                        f"{result['window_s']:.1f} s)")
    for column in ("class", "share %", "requests/s"):
        table.add_column(column)
    for qc in CLASSES:
        table.add_row(qc.value, f"{100 * result['shares'][qc.value]:.1f}",
                      f"{result['demand_rps'][qc.value]:.3f}")
    Console().print(table)
    if result.get("assumption"):
        print(f"assumes {result['assumption']}")
    return 0


def _from_trace(args: argparse.Namespace) -> dict[str, Any]:
    requests = read_azure_trace(args.trace)
    counts = class_counts(requests, args.tau)
    span_s = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
    window_s = max(span_s, 1.0)
    return {"source": str(args.trace), "requests": len(requests), "window_s": window_s,
            "shares": {qc.value: n / len(requests) for qc, n in counts.items()},
            "demand_rps": {qc.value: n / window_s for qc, n in counts.items()},
            "assumption": ""}


def _from_url(args: argparse.Namespace) -> dict[str, Any]:
    live = observe(args.url, args.window_s, args.tau, monotonic=time.monotonic, sleep=time.sleep)
    return {"source": args.url, "requests": live.requests, "window_s": live.window_s,
            "shares": _by_name(live.shares), "demand_rps": _by_name(live.demand_rps),
            "short_prompt_frac": live.short_prompt_frac,
            "short_output_frac": live.short_output_frac, "tau_exact": live.tau_exact,
            "assumption": live.assumption}


def _by_name(values: dict[QueryClass, float]) -> dict[str, float]:
    return {qc.value: v for qc, v in values.items()}
