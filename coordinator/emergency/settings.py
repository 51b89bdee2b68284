"""The emergency controller's settings, what may be declared on (scopes, kinds), and the
coordinator daemon's --emergency-* flags that set them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.policy.capping import shed as policy
from shapeshifter.common import errors

SCOPES = ("row", "aisle", "site")
KINDS = ("power", "cooling")


@dataclass(frozen=True)
class EmergencySettings:
    margin_frac: float = 0.05
    severities: tuple[float, ...] = policy.DEFAULT_SEVERITIES
    tick_s: float = 0.1
    ack_timeout_s: float = 5.0
    reissue_after_s: float = 1.0  # no acknowledgement (or a wrong limit reported) this long
    fallback_after_s: float = 1.0  # agents: broadcast but no own caps -> pre-armed caps
    phase2_after_s: float = 10.0  # under the limit this long -> locked clocks; 0 = never
    clear_steps: int = 3
    clear_step_s: float = 2.0
    clear_jitter_frac: float = 0.5  # each step waits clear_step_s * (1 + U(0, this))
    hysteresis_frac: float = 0.05
    prearm_interval_s: float = 10.0
    # A row over its limit (an aisle over its airflow) this long is acted on without a human:
    # three reports at the default 1 s interval, so one noisy sample does not declare. 0 = off.
    detect_after_s: float = 3.0
    detect_hot_headroom_c: float = 3.0  # a GPU this close to slowdown makes its node "hot"
    detect_hot_nodes_frac: float = 0.5  # this share of an aisle's nodes hot: a cooling signal
    reconfigure_after_s: float = 300.0  # still active this long -> rebalance plan; 0 = never
    # Active, every node acknowledged, and the scope over its emergency limit again this long
    # (the load rose on GPUs the caps left alone) -> tighter caps. 0 = never.
    retighten_after_s: float = 3.0


# ---------------------------------------------------------------- daemon options

_OPTIONS = (  # flag suffix, settings field, low, high
    ("margin-frac", "margin_frac", 0.0, 0.5),
    ("fallback-after-s", "fallback_after_s", 0.1, 60.0),
    ("reissue-after-s", "reissue_after_s", 0.1, 60.0),
    ("phase2-after-s", "phase2_after_s", 0.0, 3600.0),
    ("clear-step-s", "clear_step_s", 0.0, 3600.0),
    ("prearm-interval-s", "prearm_interval_s", 0.5, 3600.0),
    ("detect-after-s", "detect_after_s", 0.0, 3600.0),
    ("detect-hot-headroom-c", "detect_hot_headroom_c", 0.0, 30.0),
    ("detect-hot-nodes-frac", "detect_hot_nodes_frac", 0.01, 1.0),
    ("reconfigure-after-s", "reconfigure_after_s", 0.0, 86400.0),
    ("retighten-after-s", "retighten_after_s", 0.0, 3600.0),
)
_HELP = {
    "detect_after_s": "seconds a row (aisle) must stay over its power (airflow) limit, or an "
                      "aisle's nodes hot, before the coordinator declares an emergency itself "
                      "(source auto, capacity 1.0); 0 = no automatic detection",
    "retighten_after_s": "seconds an active emergency's scope may stay over its limit again "
                         "before its caps are cut further; 0 = never",
}


def add_emergency_args(p: Any) -> None:
    defaults = EmergencySettings()
    for flag, name, low, high in _OPTIONS:
        p.add_argument(f"--emergency-{flag}", dest=f"emergency_{name}", type=float,
                       default=getattr(defaults, name), metavar="X",
                       help=f"{_HELP.get(name, 'emergency ' + name.replace('_', ' '))} "
                            f"[{low:g}, {high:g}] (default {getattr(defaults, name):g})")


def emergency_settings_from_args(args: Any) -> EmergencySettings:
    values = {}
    for _, name, low, high in _OPTIONS:
        v = getattr(args, f"emergency_{name}")
        if not low <= v <= high:
            raise errors.out_of_range(f"emergency_{name}", v, low, high)
        values[name] = v
    return EmergencySettings(**values)
