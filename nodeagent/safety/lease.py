"""The agent's power-lease state machine: standalone -> leased <-> failsafe.

The coordinator grants leases (per-GPU caps, a TTL relative to receipt). While a lease runs, its
caps are the GPUs' "lease" safety ceilings. When it expires on the agent's own monotonic clock
(the coordinator is unreachable), the configured fail-safe caps become the "failsafe" ceilings and
the lease ceilings are lifted; a fresh lease reverses that. An agent that never had a lease is
"standalone". A failed ceiling write is logged as an error and retried on the next tick; the
state reported is the one whose caps are actually in effect.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from nodeagent.telemetry.sampler import LeaseView, SafetyView
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import DomainError

STANDALONE, LEASED, FAILSAFE = "standalone", "leased", "failsafe"


class CeilingSink(Protocol):
    def set_power_ceilings_w(
        self, ceilings: dict[int, float | None], source: str
    ) -> dict[int, bool]: ...


@dataclass(frozen=True)
class _Granted:
    """What the agent keeps of a granted lease (read from the message on receipt)."""

    lease_id: str
    epoch: int
    ttl_s: float
    gpu_power_limit_w: dict[int, float]


class LeaseKeeper:
    def __init__(
        self, ceilings: CeilingSink, failsafe_caps_w: dict[int, float], clock: Clock, log: Any
    ) -> None:
        self._sink = ceilings
        self._failsafe_caps_w = dict(failsafe_caps_w)
        self._clock = clock
        self._log = log
        self._lock = threading.Lock()
        self._lease: _Granted | None = None
        self._expires_mono_s = 0.0
        self._epoch = 0
        self._applied: tuple[str, str] = (STANDALONE, "")  # (state, lease_id) in effect
        self.last_error = ""

    def note_epoch(self, epoch: int) -> None:
        """A coordinator of this epoch registered us: older epochs' leases are refused."""
        with self._lock:
            self._epoch = max(self._epoch, epoch)

    @property
    def state(self) -> str:
        return self._applied[0]

    def grant(self, lease: agent_pb2.Lease) -> bool:
        """Accept a lease (or renewal); False when it comes from an older epoch than seen."""
        with self._lock:
            if lease.epoch < self._epoch:
                self._log.warning(
                    "stale lease refused",
                    lease_id=lease.lease_id,
                    epoch=lease.epoch,
                    epoch_seen=self._epoch,
                )
                return False
            self._epoch = lease.epoch
            self._lease = _Granted(
                lease.lease_id, lease.epoch, lease.ttl_s, dict(lease.gpu_power_limit_w)
            )
            self._expires_mono_s = self._clock.monotonic() + lease.ttl_s
            self._reconcile()
            return True

    def tick(self) -> None:
        """Check expiry (and retry a failed write); call often, e.g. every 100 ms."""
        with self._lock:
            self._reconcile()

    def view(self) -> SafetyView:
        with self._lock:
            lease = self._lease
            if lease is None:
                return SafetyView(self.state, None)
            remaining_s = max(0.0, self._expires_mono_s - self._clock.monotonic())
            return SafetyView(
                self.state,
                LeaseView(
                    lease.lease_id,
                    lease.epoch,
                    lease.ttl_s,
                    dict(lease.gpu_power_limit_w),
                    remaining_s,
                ),
            )

    def _wanted(self) -> tuple[str, str]:
        if self._lease is None:
            return (STANDALONE, "")
        if self._clock.monotonic() < self._expires_mono_s:
            return (LEASED, self._lease.lease_id)
        return (FAILSAFE, "")

    def _reconcile(self) -> None:
        wanted = self._wanted()
        if wanted == self._applied:
            return
        try:
            if wanted[0] == LEASED:
                self._apply_lease()
            elif wanted[0] == FAILSAFE:
                self._apply_failsafe()
        except DomainError as err:
            self.last_error = str(err)
            self._log.error("safety caps not applied; retrying", wanted=wanted[0], error=str(err))
            return
        self.last_error = ""
        previous, self._applied = self._applied[0], wanted
        if wanted[0] == FAILSAFE:
            self._log.warning("lease expired: fail-safe caps applied", caps_w=self._failsafe_caps_w)
        elif previous != LEASED:
            self._log.info(
                "lease active: lease caps applied",
                lease_id=wanted[1],
                was=previous,
                caps_w=dict(self._lease.gpu_power_limit_w) if self._lease else {},
            )

    def _apply_lease(self) -> None:
        lease = self._lease
        if lease is None:
            return
        caps: dict[int, float | None] = dict(lease.gpu_power_limit_w)
        self._sink.set_power_ceilings_w(caps, source="lease")
        self._sink.set_power_ceilings_w(dict.fromkeys(self._failsafe_caps_w), source="failsafe")

    def _apply_failsafe(self) -> None:
        # Fail-safe first, then lift the expired lease: never a moment without a cap.
        self._sink.set_power_ceilings_w(dict(self._failsafe_caps_w), source="failsafe")
        if self._lease is not None:
            lifted = dict.fromkeys(self._lease.gpu_power_limit_w)
            self._sink.set_power_ceilings_w(lifted, source="lease")
