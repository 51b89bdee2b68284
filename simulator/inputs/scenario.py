"""Scenario files: what cluster, workload, failures and policies a simulation runs.

YAML, validated with pydantic (unknown keys refused); a bad file or flag raises InvalidArgument
naming the field, its allowed range and, for files, the line. Built-in scenarios ship as package
data (simulator/scenarios/NAME.yaml).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shapeshifter.common.errors import InvalidArgument, out_of_range
from shapeshifter.common.yamlfile import parse_yaml_model
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.topology import InletModel

BUILTIN_SCENARIOS = ("ablation", "oversubscription", "ups-failure")
POLICY_NAMES = ("baseline", "place", "route", "config", "shapeshifter-no-rebalance",
                "shapeshifter")
# CLI override ranges (inclusive): the same bounds the schema enforces.
SERVERS_RANGE = (4, 20000)
HOURS_RANGE = (1 / 3600, 48.0)
SEED_RANGE = (0, 2**31 - 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterSpec(_Strict):
    servers: int = Field(64, ge=SERVERS_RANGE[0], le=SERVERS_RANGE[1])  # before oversubscription
    gpu_type: str = "a100-80gb"
    gpus_per_server: int = Field(8, ge=1, le=16)
    rows: int = Field(4, ge=1, le=1000)
    aisles: int = Field(2, ge=1, le=1000)
    servers_per_rack: int = Field(4, ge=1, le=64)
    saas_fraction: float = Field(0.5, ge=0.0, le=1.0)  # share of servers serving LLM endpoints
    # Row feed = provisioned servers x nameplate server power x this (operators provision for the
    # measured peak, below nameplate; TAPAS §2).
    row_provision_frac: float = Field(0.8, gt=0.0, le=1.5)
    aisle_provision_frac: float = Field(0.9, gt=0.0, le=1.5)  # of the aisle's max airflow
    oversubscription: float = Field(0.0, ge=0.0, le=2.0)  # extra servers per row, fraction
    inlet: InletModel = Field(default_factory=InletModel)
    rack_inlet_spread_c: float = Field(2.0, ge=0.0, le=10.0)  # TAPAS: racks in a row differ <=2 C
    row_inlet_spread_c: float = Field(1.0, ge=0.0, le=10.0)

    @model_validator(mode="after")
    def _known_gpu(self) -> ClusterSpec:
        if self.gpu_type not in GPU_MODELS:
            raise ValueError(f"gpu_type {self.gpu_type!r} is not one of {sorted(GPU_MODELS)}")
        return self


class WorkloadSpec(_Strict):
    model: str = "meta-llama/Meta-Llama-3-8B"
    endpoints: int = Field(4, ge=1, le=1000)
    # Peak demand as a fraction of the static fleet's profiled capacity (baseline provisioning).
    peak_load_frac: float = Field(0.6, gt=0.0, le=2.0)
    slo_s: float = Field(20.0, gt=0.0, le=3600.0)  # end-to-end latency SLO per request
    # Endpoints whose quality floor allows an fp8 variant.
    fp8_endpoints_frac: float = Field(0.5, ge=0.0, le=1.0)
    queue_timeout_s: float = Field(120.0, gt=0.0, le=3600.0)  # waiting longer -> dropped
    endpoint_phase_s: float = Field(900.0, ge=0.0, le=86400.0)  # trace offset between endpoints
    # The profiles overstate what the engines really serve by this share (0.3: the real capacity
    # is 1/1.3 of the profiled one); the policies only see the profile and what they observe.
    capacity_error_frac: float = Field(0.0, ge=0.0, le=4.0)


class OpaqueSpec(_Strict):
    shape: Literal["diurnal", "bursty", "flat"] = "bursty"
    tenants: int = Field(4, ge=1, le=1000)  # GPUs of one tenant share a phase (synchronous)
    mean_activity: float = Field(0.55, ge=0.0, le=1.0)
    amplitude: float = Field(0.35, ge=0.0, le=1.0)
    period_s: float = Field(1200.0, gt=0.0, le=604800.0)
    # Per-GPU constant spread around the tenant's shape (uniform +-); 0 = identical GPUs.
    gpu_jitter: float = Field(0.05, ge=0.0, le=0.5)


class FailureSpec(_Strict):
    kind: Literal["ups", "ahu"]  # UPS -> a row's power capacity, air handler -> an aisle's airflow
    at_s: float = Field(ge=0.0)
    target: int = Field(0, ge=0)  # row (ups) or aisle (ahu) index
    capacity_frac: float | None = Field(None, gt=0.0, le=1.0)  # default 0.75 (ups) / 0.9 (ahu)
    duration_s: float | None = Field(None, gt=0.0)  # None: until the end

    @property
    def capacity(self) -> float:
        if self.capacity_frac is not None:
            return self.capacity_frac
        return 0.75 if self.kind == "ups" else 0.9


class CadenceSpec(_Strict):
    """How often the live coordinator acts (the simulator calls the policies on this cadence)."""

    report_s: float = Field(1.0, gt=0.0, le=60.0)  # agent reports; overloads checked on each
    route_s: float = Field(5.0, gt=0.0, le=3600.0)
    rebalance_s: float = Field(30.0, gt=0.0, le=86400.0)
    instance_start_s: float = Field(60.0, ge=0.0, le=3600.0)  # new instance until it serves
    release_hold_s: float = Field(30.0, ge=0.0, le=3600.0)  # under the limit this long -> uncap


class Scenario(_Strict):
    version: Literal[1] = 1
    name: str = Field(min_length=1)
    description: str = ""
    duration_s: float = Field(3600.0, ge=1.0, le=HOURS_RANGE[1] * 3600)
    step_s: float = Field(1.0, ge=0.1, le=60.0)
    seed: int = Field(0, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    opaque: OpaqueSpec = Field(default_factory=OpaqueSpec)
    cadence: CadenceSpec = Field(default_factory=CadenceSpec)
    failures: list[FailureSpec] = Field(default_factory=list)
    policies: list[str] = Field(default_factory=lambda: ["baseline", "shapeshifter"],
                                min_length=1)
    # Oversubscription sweep: one run per value (fraction of extra servers per row).
    sweep_oversubscription: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; allowed: {list(POLICY_NAMES)}")
        if "baseline" not in self.policies:
            raise ValueError("policies must include 'baseline' (the reference)")
        for i, o in enumerate(self.sweep_oversubscription):
            if not 0.0 <= o <= 2.0:
                raise ValueError(f"sweep_oversubscription[{i}]={o} is outside [0, 2]")
        for i, f in enumerate(self.failures):
            n = self.cluster.rows if f.kind == "ups" else self.cluster.aisles
            if f.target >= n:
                raise ValueError(f"failures[{i}].target={f.target} is outside [0, {n - 1}]")
        return self


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Parse and validate YAML; InvalidArgument names the source, line and field."""
    return parse_yaml_model(text, Scenario, source, "scenario")


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name, or a scenario file by path."""
    if name_or_path in BUILTIN_SCENARIOS:
        res = resources.files("simulator.scenarios").joinpath(f"{name_or_path}.yaml")
        return parse_scenario(res.read_text(encoding="utf-8"), f"built-in {name_or_path}")
    path = Path(name_or_path)
    if not path.is_file():
        raise InvalidArgument(f"scenario {name_or_path!r} is neither a built-in "
                              f"({', '.join(BUILTIN_SCENARIOS)}) nor a readable file",
                              field="scenario")
    return parse_scenario(path.read_text(encoding="utf-8"), str(path))


def with_overrides(s: Scenario, *, servers: int | None = None, hours: float | None = None,
                   seed: int | None = None) -> Scenario:
    """Apply the CLI's --servers/--hours/--seed, range-checked like the file fields."""
    update: dict[str, Any] = {}
    if servers is not None:
        _check_range("servers", servers, *SERVERS_RANGE)
        update["cluster"] = s.cluster.model_copy(update={"servers": servers})
    if hours is not None:
        _check_range("hours", hours, *HOURS_RANGE)
        update["duration_s"] = max(1.0, round(hours * 3600.0, 6))
    if seed is not None:
        _check_range("seed", seed, *SEED_RANGE)
        update["seed"] = seed
    merged = s.model_dump()
    for k, v in update.items():
        merged[k] = v.model_dump() if isinstance(v, BaseModel) else v
    return Scenario.model_validate(merged)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise out_of_range(name, value, low, high)

