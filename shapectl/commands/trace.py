"""`shapectl trace synth`: write a synthetic Azure-schema request trace
(simulator/inputs/synth.py)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from shapeshifter.common.errors import DomainError, InvalidArgument


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
    s.add_argument("--duration-s", type=float, metavar="S", help="60..172800 (default 3600)")
    s.add_argument("--rate-rps", type=float, metavar="R",
                   help="mean arrivals per second, 0.01..10000 (default 5)")
    s.add_argument("--mix", metavar="CLASS=SHARE,...",
                   help="shares of siso, silo, liso, lilo summing to 1 (unnamed: 0), e.g. "
                        "siso=0.2,silo=0.1,liso=0.6,lilo=0.1")
    s.add_argument("--burstiness", type=float, metavar="CV",
                   help="per-minute CV of the rate, 0..10 (0 = Poisson)")
    s.add_argument("--burst-period-s", type=float, metavar="S",
                   help="mean time a rate level holds, 10..86400 (default 300)")
    s.add_argument("--diurnal-amplitude", type=float, metavar="A", help="0..1 (default 0)")
    s.add_argument("--diurnal-period-s", type=float, metavar="S",
                   help="60..604800 (default 86400)")
    s.add_argument("--seed", type=int, metavar="N", help="default 0")
    s.add_argument("--start", metavar="TIME",
                   help="first timestamp's epoch, ISO 8601, UTC unless given "
                        "(default 2023-11-16 00:00:00)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from simulator.inputs import synth

    try:
        spec = synth.spec_from(
            args.preset, duration_s=args.duration_s, rate_rps=args.rate_rps,
            mix=synth.parse_mix(args.mix) if args.mix is not None else None,
            burstiness=args.burstiness, burst_period_s=args.burst_period_s,
            diurnal_amplitude=args.diurnal_amplitude, diurnal_period_s=args.diurnal_period_s,
            seed=args.seed, start=_start(args.start))
        summary = synth.write_csv(spec, args.out)
    except DomainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), **summary}) if args.json
          else _one_line(str(args.out), summary))
    return 0


def _start(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"start={text!r} is not an ISO 8601 time such as "
                              "'2023-11-16 00:00:00'", field="start") from None


def _one_line(out: str, summary: dict[str, Any]) -> str:
    shares = " ".join(f"{k}={v:.3f}" for k, v in summary["class_shares"].items())
    return (f"{out}: {summary['requests']} requests over {summary['duration_s']:g} s, "
            f"{summary['mean_rate_rps']:.3f} req/s, per-minute CV "
            f"{summary['per_minute_cv']:.3f} (Poisson {summary['poisson_per_minute_cv']:.3f}), "
            f"{shares}")
