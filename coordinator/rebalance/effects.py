"""What the nodes' reports show of a rebalance plan's actions: whether an action took effect
(verification, and settling the actions a dead coordinator left running), and what executing
one needs from them (a free MIG slice, a running instance's spec, a GPU's lowest clock)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from coordinator.policy.clocks import CLOCK_KINDS
from coordinator.rebalance.plandoc import clock_text
from coordinator.rebalance.snapshot import locked_clock_mhz
from coordinator.registry import NodeRecord
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors
from shapeshifter.hw.models import GPU_MODELS


def pending_effects(actions: Iterable[dict[str, Any]], record: Callable[[str], NodeRecord]
                    ) -> tuple[list[str], str]:
    """The actions whose effect the reports do not show yet (one line each), and the reason
    when one never will (a started instance FAILED or STOPPED: that action is marked failed).
    record: a node's registry record by node id."""
    pending = []
    for a in actions:
        if a["kind"] in CLOCK_KINDS:
            if not effect_shown(record(a["node_id"]), a):
                pending.append(f"{a['node_id']} GPU {a['gpu_indices'][0]} "
                               f"({clock_text(a)} not reported yet)")
            continue
        if a["kind"] not in ("start_instance", "stop_instance"):
            continue
        state = instance_state(record(a["node_id"]), a["instance_id"])
        where = f"{a['node_id']}/{a['instance_id']}"
        if a["kind"] == "start_instance":
            if state in ("FAILED", "STOPPED"):
                a["state"], a["error"] = "failed", f"instance is {state}"
                return pending, f"{where} is {state} after its start"
            if state != "READY":
                pending.append(f"{where} {state or 'absent'} (want READY)")
        elif state in ("STARTING", "READY", "DRAINING"):
            pending.append(f"{where} {state} (want stopped)")
    return pending, ""


def effect_shown(rec: NodeRecord, a: dict[str, Any]) -> bool:
    """Whether a node's report shows the effect of a plan action."""
    kind, report = a["kind"], rec.report
    if kind == "start_instance":
        return instance_state(rec, a["instance_id"]) in ("STARTING", "READY")
    if kind == "stop_instance":
        return instance_state(rec, a["instance_id"]) in ("", "STOPPED", "FAILED")
    gpu = next((g for g in report.gpus if g.index == a["gpu_indices"][0]), None) if report else None
    if gpu is None:
        return False
    if kind in CLOCK_KINDS:  # the agent reports the lock it holds (its journal) per GPU
        return locked_clock_mhz(gpu) == (a.get("sm_clock_mhz") or None)
    if kind == "set_mig_mode":
        return gpu.mig_pending_enabled == a["exec"]["mig_enabled"]  # pending: what was set
    return sorted(m.profile for m in gpu.mig_instances) == sorted(a["mig_profiles"])


def instance_state(rec: NodeRecord, instance_id: str) -> str:
    for inst in rec.report.instances if rec.report is not None else ():
        if inst.spec.instance_id == instance_id:
            return inst.state
    return ""


def lowest_clock_mhz(rec: NodeRecord, gpu_index: int, max_mhz: int) -> int:
    """The lower end of a clock lock: the GPU's lowest clock (reported, else its model's), so
    it still clocks down when idle; max_mhz when neither is known."""
    report = rec.report
    gpu = next((g for g in report.gpus if g.index == gpu_index), None) if report else None
    if gpu is None:
        return max_mhz
    model = GPU_MODELS.get(gpu.gpu_type)
    clocks = list(gpu.supported_sm_clocks_mhz) or (list(model.sm_clocks_mhz) if model else [])
    return min([c for c in clocks if c <= max_mhz], default=max_mhz)


def free_slice(rec: NodeRecord, gpu_index: int, profile: str) -> str:
    """A MIG device of that profile on the GPU that no instance uses (after a fresh layout)."""
    node = rec.report
    assert node is not None
    used = {d for i in node.instances if i.state != "STOPPED" for d in i.spec.devices}
    for g in node.gpus:
        if g.index == gpu_index:
            for m in g.mig_instances:
                if m.profile == profile and m.uuid and m.uuid not in used:
                    return m.uuid
    raise errors.FailedPrecondition(
        f"{rec.node_id} GPU {gpu_index} reports no free {profile} MIG device after its layout",
        field="mig_profile")


def running_spec(records: Iterable[NodeRecord], endpoint: str
                 ) -> agent_pb2.InstanceSpec | None:
    """The spec of a live instance of the endpoint (a new one copies its engine settings)."""
    for rec in records:
        for inst in rec.report.instances if rec.report is not None else ():
            if inst.spec.endpoint == endpoint and inst.state in ("READY", "STARTING"):
                return inst.spec
    return None
