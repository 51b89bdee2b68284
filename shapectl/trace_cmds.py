"""`shapectl trace synth`: write a synthetic Azure-schema request trace (simulator/synth.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nodeagent.errors import DomainError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="request traces for the simulator")
    sub = p.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("synth", help="write a synthetic Azure-schema trace CSV",
                       description="Markov-modulated Poisson arrivals with a chosen rate, class "
                                   "mix and burstiness; presets conversation, prompt-heavy, "
                                   "bursty (explicit flags override the preset's fields).")
    s.add_argument("--out", required=True, type=Path, metavar="CSV")
    s.add_argument("--preset", default="conversation", metavar="NAME",
                   help="conversation | prompt-heavy | bursty (default: %(default)s)")
    s.add_argument("--duration-s", type=float, metavar="S")
    s.add_argument("--rate-rps", type=float, metavar="R", help="mean arrivals per second")
    s.add_argument("--mix", metavar="CLASS=SHARE,...", help="e.g. siso=0.2,liso=0.7,lilo=0.1")
    s.add_argument("--burstiness", type=float, metavar="CV",
                   help="CV of the rate level (0 = Poisson)")
    s.add_argument("--burst-period-s", type=float, metavar="S", help="mean time a level holds")
    s.add_argument("--diurnal-amplitude", type=float, metavar="A")
    s.add_argument("--diurnal-period-s", type=float, metavar="S")
    s.add_argument("--seed", type=int, metavar="N")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from simulator import synth

    try:
        spec = synth.spec_from(
            args.preset, duration_s=args.duration_s, rate_rps=args.rate_rps,
            mix=synth.parse_mix(args.mix) if args.mix else None, burstiness=args.burstiness,
            burst_period_s=args.burst_period_s, diurnal_amplitude=args.diurnal_amplitude,
            diurnal_period_s=args.diurnal_period_s, seed=args.seed)
        summary = synth.write_csv(spec, args.out)
    except DomainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"out": str(args.out), **summary}))
    else:
        shares = " ".join(f"{k[6:]}={v:.2f}" for k, v in summary.items() if k.startswith("share"))
        print(f"{args.out}: {int(summary['requests'])} requests, "
              f"{summary['mean_rate_rps']:.2f} req/s, per-minute CV "
              f"{summary['per_minute_cv']:.2f}, {shares}")
    return 0
