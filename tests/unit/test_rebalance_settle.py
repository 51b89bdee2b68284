"""Settling an action whose answer died with the coordinator: from the node's report only."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from coordinator.rebalance.effects import effect_shown
from shapeshifter.api.v1 import agent_pb2 as pb


def _rec(*instances: tuple[str, str], mig_pending: bool = False,
         mig_profiles: tuple[str, ...] = ()) -> Any:
    node = pb.Node()
    gpu = node.gpus.add(index=0, mig_pending_enabled=mig_pending)
    for profile in mig_profiles:
        gpu.mig_instances.add(profile=profile)
    for instance_id, state in instances:
        node.instances.add(state=state).spec.instance_id = instance_id
    return SimpleNamespace(report=node)


def _action(kind: str, **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "instance_id": "a", "gpu_indices": [0], "mig_profiles": [],
            "exec": {"mig_enabled": True}, **kw}


@pytest.mark.parametrize(("state", "shown"), [
    ("STARTING", True), ("READY", True), ("FAILED", False), ("STOPPED", False), ("", False)])
def test_start_counts_as_done_only_when_the_instance_runs(state: str, shown: bool) -> None:
    rec = _rec(("a", state)) if state else _rec()
    assert effect_shown(rec, _action("start_instance")) is shown


@pytest.mark.parametrize(("state", "shown"), [
    ("READY", False), ("DRAINING", False), ("STOPPED", True), ("", True)])
def test_stop_counts_as_done_only_when_the_instance_is_gone(state: str, shown: bool) -> None:
    rec = _rec(("a", state)) if state else _rec()
    assert effect_shown(rec, _action("stop_instance")) is shown


def test_mig_actions_compare_the_reported_gpu() -> None:
    assert effect_shown(_rec(mig_pending=True), _action("set_mig_mode"))
    assert not effect_shown(_rec(mig_pending=False), _action("set_mig_mode"))
    layout = _action("apply_mig_layout", mig_profiles=["3g.40gb", "4g.40gb"])
    assert effect_shown(_rec(mig_profiles=("4g.40gb", "3g.40gb")), layout)
    assert not effect_shown(_rec(mig_profiles=("7g.80gb",)), layout)
    assert not effect_shown(SimpleNamespace(report=None), layout)  # no report: not shown
