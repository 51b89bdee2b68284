"""Power-budget leases the coordinator grants: per-GPU caps, a relative TTL, the epoch.

In this issue a node's normal caps are each GPU's maximum settable limit: the lease says "no extra
restriction" while the coordinator is reachable; policies later grant tighter ones. The TTL is
relative (counted on the agent's own monotonic clock from receipt), so host clock skew cannot
shorten or extend it. A lease is renewed well before it runs out (every third of its TTL).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common.errors import out_of_range

TTL_RANGE_S = (0.5, 3600.0)


@dataclass(frozen=True)
class LeasePolicy:
    ttl_s: float = 10.0

    def __post_init__(self) -> None:
        low, high = TTL_RANGE_S
        if not low <= self.ttl_s <= high:
            raise out_of_range("lease_ttl_s", self.ttl_s, low, high, "s")

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 3

    def renewal_due(self, last_sent_mono_s: float | None, now_mono_s: float) -> bool:
        return last_sent_mono_s is None or now_mono_s - last_sent_mono_s >= self.renew_every_s


def normal_caps_w(gpus: Iterable[agent_pb2.Gpu]) -> dict[int, float]:
    """The caps a healthy node runs under: each GPU's maximum settable power limit."""
    return {g.index: g.power_limit_max_w for g in gpus if g.power_limit_max_w > 0}
