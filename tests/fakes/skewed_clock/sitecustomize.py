"""Skews the agent's wall clock by SHAPESHIFTER_TEST_SKEW_S seconds (put this directory on
PYTHONPATH). Every Unix timestamp the agent sends comes from its injected SystemClock, which
this shifts; monotonic time is left alone (a host with a wrong wall clock, not a slow one).
time.time() itself is not patched: gRPC's C core keeps reading the real clock and would turn
a patched Python clock into hour-long poll deadlines, which no real host has.
Used by tests/integration/test_clock_skew.py only."""

import os

_skew_s = float(os.environ.get("SHAPESHIFTER_TEST_SKEW_S", "0"))
if _skew_s:
    import time

    from shapeshifter.common.clock import SystemClock

    SystemClock.time = lambda self: time.time() + _skew_s  # type: ignore[method-assign]
