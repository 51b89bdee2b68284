"""Profile schema and CSV store: valid files load; bad ones fail naming the line and field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coordinator.profiles.schema import COLUMNS, ProfileError, ProfileRow, QueryClass, Source
from coordinator.profiles.store import (
    load_csv,
    load_profiles,
    merge,
    parse_csv,
    to_csv,
    upsert_csv,
    write_csv,
)

HEADER = ",".join(COLUMNS)


def _row(**over: object) -> ProfileRow:
    base = ProfileRow(gpu_type="a100-80gb", model="m/x", tensor_parallel=1, quantization="none",
                      mig_profile="full", sm_clock_mhz=1410, power_limit_w=None,
                      query_class=QueryClass.LISO, msrr_rps=4.5, slo_p95_s=20.0,
                      avg_power_w=230.0, memory_gb=30.0, max_concurrency=80,
                      source=Source.MEASURED, provenance="test")
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def _csv_with(**cells: str) -> str:
    rec = _row().to_record()
    rec.update(cells)
    return HEADER + "\n" + ",".join(rec[c] for c in COLUMNS) + "\n"


def test_valid_file_round_trips(tmp_path: Path) -> None:
    rows = [_row(), _row(sm_clock_mhz=855, avg_power_w=145.2, msrr_rps=4.1),
            _row(sm_clock_mhz=None, power_limit_w=250.0, query_class=QueryClass.SILO)]
    path = tmp_path / "p.csv"
    write_csv(path, rows)
    assert load_csv(path) == rows


@pytest.mark.parametrize(
    ("cells", "field", "fragment"),
    [
        ({"avg_power_w": "239 W"}, "avg_power_w", "no unit suffix"),
        ({"avg_power_w": "-5"}, "avg_power_w", "out of range"),
        ({"sm_clock_mhz": "1.4GHz"}, "sm_clock_mhz", "not an integer"),
        ({"msrr_rps": "nan"}, "msrr_rps", "not finite"),
        ({"query_class": "MISO"}, "query_class", "SISO"),
        ({"source": "guessed"}, "source", "measured"),
        ({"quantization": "fp7"}, "quantization", "fp8"),
        ({"mig_profile": "half"}, "mig_profile", "1g.10gb"),
        ({"gpu_type": "A100 80GB"}, "gpu_type", "a100-80gb"),
        ({"power_limit_w": "300"}, "power_limit_w", "not both"),
        ({"slo_p95_s": ""}, "slo_p95_s", "required"),
        ({"provenance": ""}, "provenance", "required"),
    ],
)
def test_bad_values_name_line_and_field(cells: dict[str, str], field: str, fragment: str) -> None:
    with pytest.raises(ProfileError) as exc:
        parse_csv(_csv_with(**cells), "f.csv")
    assert exc.value.field == field
    assert exc.value.line == 2
    assert "f.csv, line 2" in str(exc.value) and fragment in str(exc.value)


def test_missing_and_unknown_columns_fail_on_the_header() -> None:
    text = to_csv([_row()])
    missing = text.replace(",memory_gb", "", 1)  # drop the header cell only
    with pytest.raises(ProfileError, match="missing column") as exc:
        parse_csv(missing)
    assert exc.value.line == 1 and exc.value.field == "memory_gb"
    unknown = text.replace("avg_power_w", "avg_power_kw", 1)
    with pytest.raises(ProfileError, match="unknown column") as exc:
        parse_csv(unknown)
    assert exc.value.field == "avg_power_kw"


def test_duplicate_key_names_both_lines() -> None:
    text = to_csv([_row(), _row(sm_clock_mhz=855), _row(msrr_rps=9.0)])
    with pytest.raises(ProfileError, match=r"first on line 2") as exc:
        parse_csv(text)
    assert exc.value.line == 4


def test_ragged_row_is_refused() -> None:
    with pytest.raises(ProfileError, match="cells") as exc:
        parse_csv(HEADER + "\na100-80gb,m\n")
    assert exc.value.line == 2


def test_write_is_atomic_and_refuses_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    write_csv(path, [_row()])
    before = path.read_text()
    with pytest.raises(ProfileError, match="duplicate"):
        write_csv(path, [_row(), _row()])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv"]  # no temporary left behind


def test_upsert_appends_and_replaces_same_key(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "p.csv"
    upsert_csv(path, [_row()])
    upsert_csv(path, [_row(sm_clock_mhz=855)])
    upsert_csv(path, [_row(msrr_rps=5.0)])
    rows = load_csv(path)
    assert [(r.sm_clock_mhz, r.msrr_rps) for r in rows] == [(1410, 5.0), (855, 4.5)]


def test_merge_prefers_measured_then_later_files() -> None:
    published = _row(source=Source.PUBLISHED, msrr_rps=1.0)
    measured = _row(source=Source.MEASURED, msrr_rps=2.0)
    derived = _row(source=Source.DERIVED, msrr_rps=3.0)
    assert merge([published], [measured]) == [measured]
    assert merge([measured], [derived]) == [measured]
    assert merge([derived], [published]) == [published]
    newer = _row(msrr_rps=7.0)
    assert merge([measured], [newer]) == [newer]


def test_load_profiles_includes_defaults_and_user_rows(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    write_csv(path, [_row(model="org/mine")])
    rows = load_profiles([path])
    assert any(r.model == "org/mine" for r in rows)
    assert any(r.source is Source.PUBLISHED for r in rows)
    assert load_profiles([path], include_defaults=False) == [_row(model="org/mine")]
