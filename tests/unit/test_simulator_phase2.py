"""Phase 2 in the simulator (issue 18): while a row is capped its endpoints gain instances in
the other row; once the caps clear the added capacity is given back in steps."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.control.policies import make_policy
from simulator.control.shaping import MAX_SCALE_IN_FRAC
from simulator.engine import Engine
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import default_trace_path, load_trace

FAILURE_AT_S, FAILURE_S = 360.0, 240.0


@pytest.fixture(scope="module")
def run() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time, SaaS instances per row per 15 s, row 0 capped) of a UPS failure on row 0 after
    the loop has consolidated a lightly loaded fleet (so the other row has free GPUs)."""
    s = Scenario.model_validate({
        "name": "phase2", "duration_s": 900, "cluster": {"servers": 16, "rows": 2, "aisles": 2},
        "workload": {"endpoints": 2, "peak_load_frac": 0.3},
        "opaque": {"tenants": 2, "period_s": 60},
        "failures": [{"kind": "ups", "at_s": FAILURE_AT_S, "target": 0, "capacity_frac": 0.7,
                      "duration_s": FAILURE_S}]})
    e = Engine(s, load_trace(default_trace_path()), make_policy("shapeshifter"))
    samples: list[tuple[float, list[int], bool]] = []
    step = e._transitions

    def spy(t_s: float) -> None:
        step(t_s)
        if t_s % 15 == 0:
            hosting = e.fleet.hosting()
            capped = bool((e.gpus.power_limit_w[e.gpu_row == 0] < e.cluster.gpu.power.max_w)
                          .any())
            samples.append((t_s, np.bincount(e.gpu_row[hosting], minlength=2).tolist(), capped))

    e._transitions = spy
    e.run()
    t = np.array([x[0] for x in samples])
    return t, np.array([x[1] for x in samples]), np.array([x[2] for x in samples])


def test_a_capped_rows_endpoints_gain_instances_elsewhere(run) -> None:
    _, per_row, capped = run
    assert capped.any(), "the failure caps row 0"
    first = int(np.argmax(capped))
    before = per_row[first - 1, 1]
    during = per_row[capped, 1].max()
    assert during > before  # row 1 took capacity while row 0 was capped


def test_caps_cleared_capacity_given_back_in_steps(run) -> None:
    _, per_row, capped = run
    last = len(capped) - 1 - int(np.argmax(capped[::-1]))
    after = per_row[last + 1:].sum(axis=1)
    peak = per_row[:last + 1].sum(axis=1).max()
    assert after[-1] < peak  # given back
    drops = -np.diff(after)
    # No cliff: at most the scale-in brake's share per rebalance interval (30 s = 2 samples).
    assert drops.max() <= np.ceil(MAX_SCALE_IN_FRAC * peak) + 1
    assert (drops > 0).sum() >= 2  # over several steps
