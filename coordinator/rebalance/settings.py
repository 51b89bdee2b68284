"""The rebalance loop's settings and their daemon flags (--rebalance-*, --demand-*,
--profiles, --routes-listen), validated; the profile rows the loop plans with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.policy import model as pm
from coordinator.policy.configure import ConfigureConfig
from coordinator.profiles.schema import ProfileRow
from coordinator.profiles.store import load_profiles
from shapeshifter.common import errors

MODES = ("off", "propose", "auto")


@dataclass(frozen=True)
class RebalanceSettings:
    mode: str = "propose"
    interval_s: float = 60.0
    demand_sample_s: float = 5.0
    demand_smoothing_s: float = 300.0
    verify_timeout_s: float = 600.0
    verify_poll_s: float = 0.25
    policy: pm.RebalanceConfig = field(default_factory=pm.RebalanceConfig)
    configure: ConfigureConfig = field(default_factory=ConfigureConfig)  # the clock stage


_FLOAT_OPTIONS = (  # flag, settings field, low, high
    ("--rebalance-interval-s", "interval_s", 1.0, 86400.0),
    ("--rebalance-verify-timeout-s", "verify_timeout_s", 1.0, 7200.0),
    ("--demand-sample-s", "demand_sample_s", 0.1, 3600.0),
    ("--demand-smoothing-s", "demand_smoothing_s", 0.0, 86400.0),
)


def add_rebalance_args(p: Any) -> None:
    d, c = RebalanceSettings(), pm.RebalanceConfig()
    p.add_argument("--rebalance-mode", choices=MODES, default=d.mode,
                   help="off | propose (plans kept for approval) | auto (applied at once)")
    for flag, name, low, high in _FLOAT_OPTIONS:
        p.add_argument(flag, dest=f"rebalance_{name}", type=float, default=getattr(d, name),
                       metavar="S", help=f"[{low:g}, {high:g}]")
    p.add_argument("--rebalance-headroom-frac", type=float, default=c.headroom_frac,
                   metavar="F", help="provision demand x (1 + F)")
    p.add_argument("--rebalance-hysteresis-s", type=float, default=c.hysteresis_s, metavar="S",
                   help="don't reshape an endpoint changed this recently")
    p.add_argument("--rebalance-max-restarts", type=int, default=c.max_restarts_per_round,
                   metavar="N", help="instance starts + stops per plan")
    p.add_argument("--profiles", action="append", default=[], metavar="CSV",
                   help="profile rows merged over the shipped defaults (repeatable)")
    p.add_argument("--routes-listen", default="", metavar="ADDR",
                   help="HTTP HOST:PORT serving GET /routes/ENDPOINT as JSON ('' disables)")


def rebalance_settings_from_args(args: Any) -> RebalanceSettings:
    """Validated settings; DomainError names the flag's field and its allowed range."""
    values: dict[str, Any] = {"mode": args.rebalance_mode}
    for _, name, low, high in _FLOAT_OPTIONS:
        v = getattr(args, f"rebalance_{name}")
        if not low <= v <= high:
            raise errors.out_of_range(f"rebalance_{name}", v, low, high, "s")
        values[name] = v
    policy = pm.RebalanceConfig(headroom_frac=args.rebalance_headroom_frac,
                                hysteresis_s=args.rebalance_hysteresis_s,
                                max_restarts_per_round=args.rebalance_max_restarts).validate()
    return RebalanceSettings(**values, policy=policy)


def load_profile_rows(paths: list[str]) -> list[ProfileRow]:
    """Shipped defaults merged with --profiles files; InvalidArgument names an unreadable one."""
    try:
        return load_profiles(paths)
    except OSError as err:
        raise errors.InvalidArgument(f"profiles: cannot read {err.filename}: {err.strerror}",
                                     field="profiles") from None
