"""The coordinator -> agent codec: every protobuf the coordinator sends an agent is built here
(registration answers, leases, plans and their actions, emergency directives and pre-armed
levels), from the coordinator's own values. Callers hand over domain values and get messages;
nothing else in the coordinator constructs agent-bound protobufs."""

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


# ---------------------------------------------------------------- emergency messages
# (directives, lifts, pre-armed levels, shedding actions: coordinator.emergency)


# ---------------------------------------------------------------- rebalance plans
# (a policy plan's actions: coordinator.rebalance)
