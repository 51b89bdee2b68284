"""The stored form of a rebalance plan (a JSON document: PlanStatus's fields plus each action's
`exec` knobs) and its one-line-per-action diff."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coordinator.policy import model as pm
from coordinator.policy.clocks import CLOCK_KINDS


def plan_doc(plan: pm.Plan, plan_id: str, epoch: int, now_unix_s: float, trigger: str
             ) -> dict[str, Any]:
    """The stored form of a plan: PlanStatus's JSON fields plus each action's `exec` knobs."""
    return {
        "plan_id": plan_id, "epoch": epoch, "created_at_unix_s": now_unix_s,
        "updated_at_unix_s": now_unix_s, "state": "proposed", "reason": plan.reason,
        "error": "", "trigger": trigger, "gpus_before": plan.gpus_used_before,
        "gpus_after": plan.gpus_used_after, "power_before_w": round(plan.power_before_w, 1),
        "power_after_w": round(plan.power_after_w, 1), "warnings": list(plan.warnings),
        "outcomes": [vars(o).copy() for o in plan.outcomes],
        "stages": [{"reason": s.reason, "state": "pending",
                    "row_power_after_w": {k: round(v, 1) for k, v in s.row_power_after_w.items()},
                    "actions": [_action_doc(a) for a in s.actions]} for s in plan.stages],
    }


def _action_doc(a: pm.PlanAction) -> dict[str, Any]:
    c = a.config
    clock = {"sm_clock_mhz": a.sm_clock_mhz or 0}
    # A clock action's "config" says what it sets (plan show, plan diff).
    shown = clock_text(clock) if a.kind in CLOCK_KINDS else ""
    config = c.describe() if c is not None else shown
    return {
        "kind": a.kind, "node_id": a.node_id, "reason": a.reason, "endpoint": a.endpoint,
        "instance_id": a.instance_id, "config": config,
        "gpu_indices": list(a.gpu_indices), "mig_profiles": list(a.mig_profiles),
        "capacity_rps": round(a.capacity_rps, 3), "state": "pending", "error": "", **clock,
        "exec": {"model": c.model if c else "", "tensor_parallel": c.tensor_parallel if c else 0,
                 "quantization": c.quantization if c else "", "gpu_type": c.gpu_type if c else "",
                 "mig_uuid": a.mig_uuid, "mig_enabled": a.mig_enabled},
    }


def diff_lines(doc: Mapping[str, Any]) -> list[str]:
    """One line per action: + start, - stop, ~ MIG or clock change; with where, what and
    why (a clock action's what: "SM clock locked at <= N MHz" or "SM clock unlocked")."""
    sign = {"start_instance": "+", "stop_instance": "-"}
    out = []
    for i, stage in enumerate(doc["stages"], 1):
        for a in stage["actions"]:
            gpus = ",".join(map(str, a["gpu_indices"]))
            what = a["config"] or " ".join(a["mig_profiles"]) or a["kind"]
            out.append(f"{sign.get(a['kind'], '~')} [stage {i}] {a['node_id']}/"
                       f"{a['instance_id'] or a['kind']} {what} (GPUs {gpus}): {a['reason']}")
    return out


def clock_text(a: Mapping[str, Any]) -> str:
    mhz = a.get("sm_clock_mhz") or 0
    return f"SM clock locked at <= {mhz} MHz" if mhz else "SM clock unlocked"
