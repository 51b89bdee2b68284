"""Profile commands: `shapectl profiles list [--json]`, `shapectl profile --url ...` (a sweep)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.profiles.classes import DEFAULT_TAU_TOKENS, class_tokens
from coordinator.profiles.profiler import OpenAIEndpoint, StepResult, SweepConfig, sweep
from coordinator.profiles.schema import FULL_GPU, ProfileRow, QueryClass
from coordinator.profiles.store import load_profiles, upsert_csv
from shapeshifter.common.errors import DomainError
from shapeshifter.common.logging import LEVELS, configure_logging

MIB, GB = 2**20, 1e9  # memory_gb in the profile schema is decimal GB


def register(subparsers: Any) -> None:
    profiles = subparsers.add_parser("profiles", help="hardware cost tables").add_subparsers(
        dest="profiles_command", metavar="ACTION", required=True)
    p = profiles.add_parser("list", help="rows loaded: shipped defaults plus --file CSVs")
    p.add_argument("--file", action="append", default=[], metavar="CSV",
                   help="a profile CSV to load after the defaults (repeatable)")
    p.add_argument("--no-defaults", action="store_true", help="leave the shipped defaults out")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.set_defaults(func=cmd_profiles_list)

    p = subparsers.add_parser("profile", help="measure an OpenAI-compatible endpoint (a sweep)")
    p.add_argument("--url", required=True, help="endpoint base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--query-class", required=True,
                   choices=[c.value for c in QueryClass if c is not QueryClass.MIXED])
    p.add_argument("--slo-p95", type=float, required=True, metavar="SECONDS",
                   help="P95 end-to-end latency SLO")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="profile CSV to add the measured rows to (written atomically)")
    p.add_argument("--tau", type=int, default=DEFAULT_TAU_TOKENS, help="query class threshold")
    p.add_argument("--prompt-tokens", type=int, help="override the class's prompt length")
    p.add_argument("--output-tokens", type=int, help="override the class's output length")
    p.add_argument("--agent", dest="profile_agent", metavar="ADDR",
                   help="node agent to read GPU power from (and lock clocks through)")
    p.add_argument("--gpu", type=int, default=0, help="GPU index on the agent")
    p.add_argument("--clocks", type=_clock_list, default=(), metavar="MHZ,MHZ,...",
                   help="sweep these locked SM clocks through the agent (real GPUs only)")
    p.add_argument("--allow-sim", action="store_true",
                   help="allow --clocks on an agent with the simulated backend")
    p.add_argument("--gpu-type", help="row key (default: the agent's GPU type, else 'unknown')")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--quantization", default="none")
    p.add_argument("--mig-profile", default=FULL_GPU)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--min-requests", type=int, default=20, help="requests per step, at least")
    p.add_argument("--request-timeout", type=float, default=300.0, metavar="S")
    p.add_argument("--json", action="store_true", help="print the new rows as JSON")
    p.add_argument("--log-level", default="warning", choices=LEVELS,
                   help="structured logs (on stderr)")
    p.set_defaults(func=cmd_profile)


def _clock_list(text: str) -> tuple[int, ...]:
    try:
        clocks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MHz,MHz,... integers") from None
    if not clocks:
        raise argparse.ArgumentTypeError("no clocks given")
    return clocks


def cmd_profiles_list(args: argparse.Namespace) -> int:
    try:
        rows = load_profiles(args.file, include_defaults=not args.no_defaults)
    except (DomainError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=None))
        return 0
    table = Table(title=f"{len(rows)} profile rows")
    shown = ("gpu_type", "model", "tensor_parallel", "quantization", "mig_profile",
             "sm_clock_mhz", "query_class", "msrr_rps", "slo_p95_s", "throughput_tok_s",
             "avg_power_w", "source")
    for col in shown:
        table.add_column(col)
    for r in rows:
        rec = r.to_record()
        table.add_row(*(rec[c] for c in shown))
    Console().print(table)
    return 0


class AgentPower:
    """Adapts shapectl's AgentTarget to the profiler's GpuAgent protocol."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def _gpu(self, gpu: int) -> Any:
        for g in self._target.node().gpus:
            if g.index == gpu:
                return g
        raise DomainError(f"the agent has no GPU {gpu}", field="gpu")

    def gpu_type(self, gpu: int) -> str:
        return self._gpu(gpu).gpu_type or "unknown"

    def is_simulated(self) -> bool:
        return str(self._target.node().backend) == "sim"

    def power_w(self, gpu: int) -> float:
        return float(self._gpu(gpu).power_draw_w)

    def memory_used_gb(self, gpu: int) -> float:
        return float(self._gpu(gpu).memory_used_mib) * MIB / GB

    def lock_clocks(self, gpu: int, sm_clock_mhz: int) -> None:
        self._check(self._target.lock_clocks(gpu, sm_clock_mhz, sm_clock_mhz), "lock_clocks")

    def reset_clocks(self, gpu: int) -> None:
        self._check(self._target.reset_clocks(gpu), "reset_clocks")

    @staticmethod
    def _check(result: Any, what: str) -> None:
        if not result.ok:
            raise DomainError(f"{what} refused by the agent: {result.code}: {result.message}")


def cmd_profile(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    console = Console(stderr=True)
    agent_addr = args.profile_agent or getattr(args, "agent", None)
    agent: AgentPower | None = None
    target = None
    try:
        if agent_addr:
            from shapectl.targets import AgentTarget

            target = AgentTarget(agent_addr, getattr(args, "timeout", 10.0),
                                 security=getattr(args, "security", None))
            agent = AgentPower(target)
        qc = QueryClass(args.query_class)
        prompt_tokens, output_tokens = class_tokens(qc, args.tau)
        gpu_type = args.gpu_type or (agent.gpu_type(args.gpu) if agent else "unknown")
        cfg = SweepConfig(
            model=args.model, query_class=qc, slo_p95_s=args.slo_p95,
            prompt_tokens=args.prompt_tokens or prompt_tokens,
            output_tokens=args.output_tokens or output_tokens, gpu_type=gpu_type,
            tensor_parallel=args.tensor_parallel, quantization=args.quantization,
            mig_profile=args.mig_profile, gpu=args.gpu, clocks_mhz=tuple(args.clocks),
            allow_sim=args.allow_sim, max_concurrency=args.max_concurrency,
            min_requests_per_step=args.min_requests, url=args.url)
        endpoint = OpenAIEndpoint(args.url, args.model, timeout_s=args.request_timeout)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=False) as progress:
            task = progress.add_task("starting", total=None)

            def on_step(clock_mhz: int | None, step: StepResult) -> None:
                where = f"{clock_mhz} MHz " if clock_mhz else ""
                progress.console.print(
                    f"{where}c={step.concurrency:<4} p95 {step.p95_latency_s:8.3f} s  "
                    f"p99 {step.p99_latency_s:8.3f} s  {step.throughput_rps:8.3f} req/s  "
                    f"{step.throughput_tok_s:9.1f} tok/s  errors {step.errors}"
                    + (f"  {step.avg_power_w:.1f} W" if step.avg_power_w is not None else ""))

            def on_row(row: ProfileRow) -> None:
                upsert_csv(args.out, [row])  # atomic: a Ctrl-C later keeps this row

            def on_request() -> None:
                progress.update(task, advance=1, description=f"{qc} requests")

            result = sweep(cfg, endpoint, agent=agent, on_row=on_row, on_step=on_step,
                           on_request=on_request)
    except DomainError as err:
        console.print(f"error: {err}")
        return 2
    except KeyboardInterrupt:  # outside a step (e.g. while connecting): nothing half-written
        console.print(f"interrupted: rows written so far are in {args.out}")
        return 130
    finally:
        if target is not None:
            target.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in result.rows]))
    for row in result.rows:
        console.print(f"{row.query_class} {row.sm_clock_mhz or 'default'} MHz: MSRR "
                      f"{row.msrr_rps} req/s at P95 <= {row.slo_p95_s} s -> {args.out}")
    if result.interrupted:
        console.print("interrupted: kept the rows measured so far")
        return 130
    return 0

