"""Clock interpolation and Pareto fronts on small hand-made tables with known answers."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.profiles.lookup import interpolate_clock, pareto_front, pareto_fronts, select
from coordinator.profiles.schema import ProfileRow, QueryClass, Source
from shapeshifter.common.errors import InvalidArgument, NotFound


def _row(**over: object) -> ProfileRow:
    base = ProfileRow(gpu_type="a100-80gb", model="m/a", tensor_parallel=1, quantization="none",
                      mig_profile="full", sm_clock_mhz=None, power_limit_w=None,
                      query_class=QueryClass.LISO, slo_p95_s=20.0, source=Source.MEASURED,
                      provenance="hand-made")
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def test_interpolation_between_two_clock_points() -> None:
    rows = [_row(sm_clock_mhz=900, msrr_rps=4.0, avg_power_w=150.0, memory_gb=30.0),
            _row(sm_clock_mhz=1300, msrr_rps=5.0, avg_power_w=250.0, memory_gb=30.0)]
    mid = interpolate_clock(rows, 1000)
    assert mid.msrr_rps == pytest.approx(4.25)
    assert mid.avg_power_w == pytest.approx(175.0)
    assert mid.memory_gb == pytest.approx(30.0)
    assert mid.source is Source.DERIVED and "900 MHz" in mid.provenance
    assert mid.throughput_tok_s is None  # unknown on both sides stays unknown
    assert interpolate_clock(rows, 1300) is rows[1]  # a measured point is returned as is


def test_interpolation_picks_the_nearest_bracket_and_refuses_extrapolation() -> None:
    rows = [_row(sm_clock_mhz=f, avg_power_w=p) for f, p in
            ((855, 145.2), (1035, 153.6), (1320, 239.4))]
    assert interpolate_clock(rows, 1200).avg_power_w == pytest.approx(
        153.6 + (1200 - 1035) / (1320 - 1035) * (239.4 - 153.6))
    with pytest.raises(InvalidArgument, match=r"\[855, 1320\]"):
        interpolate_clock(rows, 1410)
    with pytest.raises(NotFound):
        interpolate_clock([_row()], 1000)
    with pytest.raises(InvalidArgument, match="configurations"):
        interpolate_clock([*rows, _row(sm_clock_mhz=900, model="m/b")], 1000)


def test_pareto_front_known_answer() -> None:
    a = _row(sm_clock_mhz=1410, msrr_rps=5.0, avg_power_w=250.0, memory_gb=40.0)
    b = _row(sm_clock_mhz=1035, msrr_rps=4.5, avg_power_w=150.0, memory_gb=40.0)
    c = _row(sm_clock_mhz=1200, msrr_rps=4.4, avg_power_w=200.0, memory_gb=40.0)  # b beats it
    d = _row(mig_profile="3g.40gb", msrr_rps=2.0, avg_power_w=150.0, memory_gb=20.0)
    e = _row(sm_clock_mhz=855, msrr_rps=4.5, avg_power_w=150.0, memory_gb=50.0)  # b beats it
    f = _row(quantization="fp8", msrr_rps=9.0)  # unknown costs count as worst: still on front
    g = _row(quantization="awq")  # no MSRR: not a candidate
    assert pareto_front([a, b, c, d, e, f, g]) == [f, a, b, d]


def test_pareto_fronts_group_by_model_gpu_and_class() -> None:
    x = _row(msrr_rps=1.0, avg_power_w=100.0)
    y = _row(msrr_rps=1.0, avg_power_w=90.0, query_class=QueryClass.SILO)
    z = _row(msrr_rps=1.0, avg_power_w=80.0, gpu_type="h100-80gb")
    fronts = pareto_fronts([x, y, z])
    assert fronts == {("m/a", "a100-80gb", QueryClass.LISO): [x],
                      ("m/a", "a100-80gb", QueryClass.SILO): [y],
                      ("m/a", "h100-80gb", QueryClass.LISO): [z]}


def test_select_filters_one_configuration_ordered_by_clock() -> None:
    rows = [_row(sm_clock_mhz=1300), _row(sm_clock_mhz=900), _row(model="m/b"),
            _row(query_class=QueryClass.SILO)]
    got = select(rows, gpu_type="a100-80gb", model="m/a", query_class="LISO")
    assert [r.sm_clock_mhz for r in got] == [900, 1300]
