"""The node's plan value types: what the actuator is asked to do and what came of it.

Distinct from the coordinator's policy plan (coordinator.policy.model.Plan): these are the
agent's own view of one node's actions, decoded from the wire by nodeagent.rpc.codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from shapeshifter.common.errors import DomainError, grpc_code


@dataclass(frozen=True)
class SetPowerLimit:
    gpu_index: int
    power_limit_w: float


@dataclass(frozen=True)
class LockClocks:
    gpu_index: int
    min_mhz: int
    max_mhz: int


@dataclass(frozen=True)
class ResetClocks:
    gpu_index: int


@dataclass(frozen=True)
class SetMigMode:
    gpu_index: int
    enabled: bool


@dataclass(frozen=True)
class ApplyMigLayout:
    """One GPU's profile list, or (when mig_parted_yaml is set) a mig-parted file and config."""

    gpu_index: int
    profiles: tuple[str, ...] = ()
    mig_parted_yaml: str = ""
    mig_parted_config: str = ""


@dataclass(frozen=True)
class InstanceAction:
    """An engine action; ``request`` is passed untouched to the instance action runner."""

    kind: Literal["start_instance", "stop_instance", "reconfigure_instance"]
    request: Any


GpuAction = SetPowerLimit | LockClocks | ResetClocks | SetMigMode | ApplyMigLayout


@dataclass(frozen=True)
class NodeAction:
    action_id: str
    action: GpuAction | InstanceAction
    reason: str = ""


@dataclass(frozen=True)
class NodePlan:
    plan_id: str
    epoch: int
    actions: tuple[NodeAction, ...]
    reason: str = ""


@dataclass(frozen=True)
class ActionOutcome:
    action_id: str
    ok: bool
    changed: bool
    code: str  # gRPC status code name, "OK" on success
    message: str
    duration_s: float


@dataclass(frozen=True)
class NodePlanOutcome:
    plan_id: str
    results: tuple[ActionOutcome, ...]
    completed: bool


def failed_outcome(action_id: str, err: DomainError, duration_s: float = 0.0) -> ActionOutcome:
    """An action the node refused, with the error's gRPC code name and message."""
    return ActionOutcome(action_id, False, False, grpc_code(err).name, str(err), duration_s)


class InstanceActionRunner(Protocol):
    """Implemented by the engine manager; returns True when something changed."""

    def run_instance_action(self, action: InstanceAction) -> bool: ...
