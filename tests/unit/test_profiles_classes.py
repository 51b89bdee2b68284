"""Query classes, the Azure conversation trace's class shares, demand and eq. 5 provisioning."""

from __future__ import annotations

import csv

import pytest

from coordinator.profiles.classes import (
    MigOption,
    TraceRequest,
    class_shares,
    class_tokens,
    classify,
    demand_rps,
    gpus_required,
    mig_options_for,
    provision,
    read_azure_trace,
)
from coordinator.profiles.schema import QueryClass
from shapeshifter.common.errors import InvalidArgument
from tests.conftest import SHARED_DIR

TRACE = SHARED_DIR / "data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"


def test_classify_boundaries_and_tau() -> None:
    assert classify(500, 500) is QueryClass.SISO  # "≤ τ" is small
    assert classify(500, 501) is QueryClass.SILO
    assert classify(501, 500) is QueryClass.LISO
    assert classify(501, 501) is QueryClass.LILO
    assert classify(300, 50, tau_tokens=200) is QueryClass.LISO
    with pytest.raises(InvalidArgument, match="prompt_tokens"):
        classify(-1, 3)


def test_class_tokens_are_the_oasis_lengths() -> None:
    assert class_tokens("LISO") == (1000, 50)
    assert class_tokens("SILO") == (50, 1000)
    for qc in ("SISO", "SILO", "LISO", "LILO"):
        assert classify(*class_tokens(qc)) is QueryClass(qc)
        assert classify(*class_tokens(qc, 40), tau_tokens=40) is QueryClass(qc)


@pytest.mark.skipif(not TRACE.exists(), reason="Azure trace not present")
@pytest.mark.parametrize("tau", [500, 250])
def test_azure_trace_shares_match_an_independent_count(tau: int) -> None:
    counts = {"SISO": 0, "SILO": 0, "LISO": 0, "LILO": 0}
    total = 0
    with TRACE.open(newline="") as f:
        for rec in csv.reader(f):
            if rec[0] == "TIMESTAMP":
                continue
            big_in, big_out = int(rec[1]) > tau, int(rec[2]) > tau
            counts[("LI" if big_in else "SI") + ("LO" if big_out else "SO")] += 1
            total += 1
    requests = read_azure_trace(TRACE)
    shares = class_shares(requests, tau)
    assert total == len(requests) > 19000  # the README says 19,365; the file holds 19,366
    for name, n in counts.items():
        assert shares[QueryClass(name)] == pytest.approx(n / total, abs=1e-12)
    assert sum(shares.values()) == pytest.approx(1.0)


@pytest.mark.skipif(not TRACE.exists(), reason="Azure trace not present")
def test_azure_trace_demand_over_its_hour() -> None:
    reqs = read_azure_trace(TRACE)
    start = min(r.arrival_s for r in reqs)
    demand = demand_rps(reqs, start, 3600.0)
    assert sum(demand.values()) == pytest.approx(len(reqs) / 3600.0)


def test_demand_counts_arrivals_in_the_window_only() -> None:
    reqs = [TraceRequest(0.0, 10, 10), TraceRequest(5.0, 900, 10), TraceRequest(9.99, 10, 10),
            TraceRequest(10.0, 10, 10)]
    d = demand_rps(reqs, 0.0, 10.0)
    assert d[QueryClass.SISO] == pytest.approx(0.2)
    assert d[QueryClass.LISO] == pytest.approx(0.1)
    assert d[QueryClass.LILO] == 0.0
    with pytest.raises(InvalidArgument, match="window_s"):
        demand_rps(reqs, 0.0, 0.0)


def test_eq5_provisioning_mig_below_one_gpu_ceil_above() -> None:
    options = mig_options_for("a100-80gb")
    assert gpus_required(2.27, 4.54) == pytest.approx(0.5)
    assert provision(0.4, 4.54, options).mig_profile == "1g.10gb"  # 0.088 GPU ≤ 1/7
    assert provision(1.0, 4.54, options).mig_profile == "2g.20gb"  # 0.22 GPU ≤ 2/7
    assert provision(2.27, 4.54, options).mig_profile == "4g.40gb"  # 0.5 GPU > 3/7
    p = provision(7.7, 4.54, options)
    assert (p.full_gpus, p.mig_profile) == (2, None)  # 1.70 GPUs -> ⌈1.70⌉
    assert provision(4.54, 4.54, options).full_gpus == 1  # exactly 1 -> one full GPU
    assert provision(0.0, 4.54, options).full_gpus == 0
    assert provision(0.5, 4.54, []).full_gpus == 1  # no MIG -> a whole GPU
    assert provision(0.1, 1.0, [MigOption("1g.20gb", 1, 2), MigOption("1g.10gb", 1, 1)]
                     ).mig_profile == "1g.10gb"
    with pytest.raises(InvalidArgument, match="msrr_rps"):
        gpus_required(1.0, 0.0)
