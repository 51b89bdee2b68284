"""Plan execution: epoch fencing (a deposed leader's plans are refused, coordinator.ha.election),
then each action in order, stopping at the first failure."""

from __future__ import annotations

from typing import Any

from nodeagent.actuation.clocks import ClockControl
from nodeagent.actuation.journal import Journal
from nodeagent.actuation.mig import MigControl
from nodeagent.actuation.plan import (
    ActionOutcome,
    ApplyMigLayout,
    GpuAction,
    InstanceAction,
    InstanceActionRunner,
    LockClocks,
    NodeAction,
    NodePlan,
    NodePlanOutcome,
    ResetClocks,
    SetMigMode,
    SetPowerLimit,
    failed_outcome,
)
from nodeagent.actuation.power import PowerControl
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import DomainError, FailedPrecondition, InvalidArgument


class PlanExecutor:
    def __init__(
        self,
        journal: Journal,
        clock: Clock,
        log: Any,
        controls: tuple[PowerControl, ClockControl, MigControl],
        instance_runner: InstanceActionRunner | None = None,
    ) -> None:
        self._journal = journal
        self._clock = clock
        self._log = log
        self._power, self._clocks, self._mig = controls
        self.instance_runner = instance_runner  # settable: the engine manager comes later

    def apply_plan(self, plan: NodePlan) -> NodePlanOutcome:
        """Run a plan's actions in order, stopping at the first failure.

        Raises FailedPrecondition when the plan's epoch is older than the newest seen."""
        if plan.epoch < self._journal.epoch_seen:
            raise FailedPrecondition(
                f"plan epoch {plan.epoch} is older than the newest seen epoch "
                f"{self._journal.epoch_seen}",
                field="epoch",
            )
        self._journal.note_epoch(plan.epoch)
        results: list[ActionOutcome] = []
        for item in plan.actions:
            outcome = self._run_action(item)
            results.append(outcome)
            if not outcome.ok:
                self._log.warning("plan stopped", plan_id=plan.plan_id, action_id=item.action_id)
                return NodePlanOutcome(plan.plan_id, tuple(results), completed=False)
        self._log.info("plan applied", plan_id=plan.plan_id, epoch=plan.epoch, actions=len(results))
        return NodePlanOutcome(plan.plan_id, tuple(results), completed=True)

    def run(self, action: GpuAction | InstanceAction) -> bool:
        """Execute one action; raises DomainError on refusal."""
        match action:
            case SetPowerLimit(i, w):
                return self._power.set_power_limit(i, w)
            case LockClocks(i, lo, hi):
                return self._clocks.lock_clocks(i, lo, hi)
            case ResetClocks(i):
                return self._clocks.reset_clocks(i)
            case SetMigMode(i, enabled):
                return self._mig.set_mig_mode(i, enabled)
            case ApplyMigLayout(i, profiles, yaml_text, config) if yaml_text:
                return self._mig.apply_mig_parted(yaml_text, config)
            case ApplyMigLayout(i, profiles):
                return self._mig.apply_mig_layout(i, profiles)
            case InstanceAction():
                if self.instance_runner is None:
                    raise FailedPrecondition("no engine manager configured")
                return self.instance_runner.run_instance_action(action)
        raise InvalidArgument(f"action: unknown kind {type(action).__name__}", field="action")

    def _run_action(self, item: NodeAction) -> ActionOutcome:
        start_s = self._clock.monotonic()
        try:
            changed = self.run(item.action)
        except DomainError as err:
            return failed_outcome(item.action_id, err, self._since_s(start_s))
        return ActionOutcome(item.action_id, True, changed, "OK", "", self._since_s(start_s))

    def _since_s(self, start_s: float) -> float:
        return self._clock.monotonic() - start_s
