"""The coordinator -> agent codec: registration answers, leases, the plan envelope and the ids
of everything sent to an agent. Not yet all of it (issue 16 is open for this): the emergency
controller still builds its directives, pre-arms and actions, and the rebalance loop its
actions, themselves; they take their plans and ids from here."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from shapeshifter.api.v1 import agent_pb2, link_pb2


def new_id() -> str:
    """A fresh plan, action, directive or prearm id."""
    return uuid.uuid4().hex


def registered(node_id: str, epoch: int, topology_known: bool,
               message: str = "") -> link_pb2.Registered:
    return link_pb2.Registered(node_id=node_id, epoch=epoch, topology_known=topology_known,
                               message=message)


def lease(node_id: str, epoch: int, grant: int, ttl_s: float,
          caps_w: dict[int, float]) -> agent_pb2.Lease:
    """A lease; ``grant`` numbers the grants to this node within one epoch."""
    return agent_pb2.Lease(lease_id=f"{node_id}/e{epoch}/g{grant}", epoch=epoch, ttl_s=ttl_s,
                           gpu_power_limit_w=caps_w)


def plan(actions: Sequence[agent_pb2.Action], epoch: int, reason: str,
         plan_id: str = "") -> agent_pb2.Plan:
    return agent_pb2.Plan(plan_id=plan_id or new_id(), epoch=epoch, actions=list(actions),
                          reason=reason)
