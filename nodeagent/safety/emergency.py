"""The agent's side of emergency load shedding: coordinator caps and the pre-armed fallback.

The coordinator's caps for this node become the "emergency" power ceilings. Ahead of any
emergency it pre-arms the node with caps per severity (capacity fraction). During a declared
emergency the agent applies the pre-armed caps of the declared severity by itself, as the
"emergency_fallback" ceilings, when
  - the link to the coordinator is lost, or
  - it got the broadcast but not its own caps within the broadcast's fallback_after_s.
The fallback stays until the coordinator speaks again about the emergency (its caps, or the
all-clear): ceilings only ever take the minimum, so keeping both is never less safe.
Every ceiling write that fails is logged as an error, kept in last_error and retried on tick().
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from nodeagent.actuation.plan import ActionOutcome, NodePlanOutcome, failed_outcome
from nodeagent.safety.lease import CeilingSink
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import DomainError

EMERGENCY, FALLBACK = "emergency", "emergency_fallback"


@dataclass
class _Declared:
    emergency_id: str
    capacity_frac: float
    at_mono_s: float
    fallback_after_s: float
    caps_received: bool = False


class EmergencyGuard:
    def __init__(self, ceilings: CeilingSink, gpu_indices: list[int], clock: Clock,
                 log: Any) -> None:
        self._sink = ceilings
        self._gpus = list(gpu_indices)
        self._clock = clock
        self._log = log
        self._lock = threading.Lock()
        self._levels: dict[float, dict[int, float]] = {}
        self._declared: _Declared | None = None
        self._link_up = False
        self._fallback_level: float | None = None  # in effect
        self._epoch = 0
        self.last_error = ""

    @property
    def fallback_active(self) -> bool:
        return self._fallback_level is not None

    @property
    def exposed(self) -> bool:
        """An emergency is known here, but neither its caps nor the fallback are in effect
        (normal for up to fallback_after_s after the broadcast; a fault beyond that)."""
        with self._lock:
            d = self._declared
            return d is not None and not d.caps_received and self._fallback_level is None

    def prearm(self, msg: agent_pb2.EmergencyPrearm) -> NodePlanOutcome:
        with self._lock:
            if not self._epoch_ok(msg.epoch):
                return _refused(msg.prearm_id, "stale epoch")
            self._levels = {round(level.capacity_frac, 4): dict(level.gpu_power_ceiling_w)
                            for level in msg.levels}
            return _answer(msg.prearm_id, [])

    def directive(self, msg: agent_pb2.EmergencyDirective) -> NodePlanOutcome:
        """Apply (or lift) the coordinator's emergency caps; the answer lists each GPU write."""
        with self._lock:
            if not self._epoch_ok(msg.epoch):
                return _refused(msg.directive_id, "stale epoch")
            if not msg.active:
                self._declared = None
                results = self._write(dict.fromkeys(self._gpus), EMERGENCY)
                results += self._lift_fallback()
                return _answer(msg.directive_id, results)
            self._note_declared(msg)
            if not msg.has_caps:
                return _answer(msg.directive_id, [])
            caps: dict[int, float | None] = dict.fromkeys(self._gpus)
            caps.update(msg.gpu_power_ceiling_w)
            results = self._write(caps, EMERGENCY)
            if self._declared is not None:
                self._declared.caps_received = True
            if all(r.ok for r in results):  # own caps in effect: the fallback can go
                results += self._lift_fallback()
            return _answer(msg.directive_id, results)

    def note_epoch(self, epoch: int) -> None:
        """A coordinator of this epoch registered us: older epochs' messages are refused."""
        with self._lock:
            self._epoch = max(self._epoch, epoch)

    def link_up(self, up: bool) -> None:
        with self._lock:
            self._link_up = up
            if not up:
                self._maybe_fall_back()

    def tick(self) -> None:
        """Check the fallback deadline (and retry a failed write); call often, e.g. every 100 ms."""
        with self._lock:
            self._maybe_fall_back()

    # ---------------------------------------------------------------- internals

    def _epoch_ok(self, epoch: int) -> bool:
        if epoch < self._epoch:
            self._log.warning("stale emergency message refused", epoch=epoch,
                              epoch_seen=self._epoch)
            return False
        self._epoch = epoch
        return True

    def _note_declared(self, msg: agent_pb2.EmergencyDirective) -> None:
        d = self._declared
        if d is None or d.emergency_id != msg.emergency_id:
            self._declared = _Declared(msg.emergency_id, msg.capacity_frac,
                                       self._clock.monotonic(), msg.fallback_after_s)
            self._log.warning("emergency declared", emergency_id=msg.emergency_id,
                              capacity_frac=msg.capacity_frac)
        else:
            d.capacity_frac = msg.capacity_frac

    def _maybe_fall_back(self) -> None:
        d = self._declared
        if d is None:
            return
        overdue = (not d.caps_received
                   and self._clock.monotonic() - d.at_mono_s >= d.fallback_after_s)
        wanted = _level_for(self._levels, d.capacity_frac)
        if wanted is None or not (overdue or not self._link_up):
            return
        if self._fallback_level == wanted and not self.last_error:
            return
        results = self._write(dict(self._levels[wanted]), FALLBACK)
        if all(r.ok for r in results):
            self._fallback_level = wanted
            self._log.warning("pre-armed emergency caps applied", emergency_id=d.emergency_id,
                              level=wanted, link_up=self._link_up,
                              caps_w=self._levels[wanted])

    def _lift_fallback(self) -> list[ActionOutcome]:
        if self._fallback_level is None:
            return []
        results = self._write(dict.fromkeys(self._gpus), FALLBACK)
        if all(r.ok for r in results):
            self._fallback_level = None
        return results

    def _write(self, caps: dict[int, float | None], source: str) -> list[ActionOutcome]:
        """One ceiling write per GPU, so that one failing GPU stops no other; failures logged."""
        results: list[ActionOutcome] = []
        errors = []
        for index, cap_w in sorted(caps.items()):
            try:
                changed = self._sink.set_power_ceilings_w({index: cap_w}, source).get(index, False)
                results.append(ActionOutcome(f"gpu{index}", True, changed, "OK", "", 0.0))
            except DomainError as err:
                errors.append(f"gpu {index}: {err}")
                results.append(failed_outcome(f"gpu{index}", err))
        self.last_error = "; ".join(errors)
        if errors:
            self._log.error("emergency caps not applied; retrying", source=source,
                            error=self.last_error)
        return results


def _level_for(levels: dict[float, dict[int, float]], capacity_frac: float) -> float | None:
    """The mildest pre-armed level at or below the declared capacity, else the harshest."""
    if not levels:
        return None
    at_or_below = [s for s in levels if s <= capacity_frac + 1e-9]
    return max(at_or_below) if at_or_below else min(levels)


def _answer(request_id: str, results: list[ActionOutcome]) -> NodePlanOutcome:
    """The answer to a directive or pre-arm message (encoded by nodeagent.rpc.codec)."""
    return NodePlanOutcome(request_id, tuple(results), completed=all(r.ok for r in results))


def _refused(request_id: str, why: str) -> NodePlanOutcome:
    failed = ActionOutcome("", False, False, "FAILED_PRECONDITION", why, 0.0)
    return NodePlanOutcome(request_id, (failed,), completed=False)
