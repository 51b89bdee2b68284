"""`shapectl simulate` writes summary.json (the outside interface), CSV and PNG files."""

from __future__ import annotations

import json
from pathlib import Path

from shapectl.cli import main

SCENARIO = """\
version: 1
name: tiny
duration_s: 60
cluster: {servers: 8, rows: 2, aisles: 2}
workload: {endpoints: 2}
failures:
  - {kind: ups, at_s: 20, target: 0}
policies: [baseline, shapeshifter]
"""
KEYS = {"peak_row_power_w", "max_gpu_temp_c", "capped_time_frac", "slo_attainment",
        "energy_j_per_token", "gpus_used", "reconfigurations"}


def _trace(path: Path) -> Path:
    """A hand-written trace with the Azure schema (not the shipped one)."""
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(300):
        lines.append(f"2024-01-01 00:{i // 60:02d}:{i % 60:02d}.5000000,{100 + i},{20 + i % 50}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_writes_summary_csv_and_plots(tmp_path: Path, capsys) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "out"
    rc = main(["simulate", "--scenario", str(scenario), "--trace", str(_trace(tmp_path / "t.csv")),
               "--out", str(out), "--servers", "8", "--hours", "0.02", "--seed", "3", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "tiny"
    assert set(summary["policies"]) == {"baseline", "shapeshifter"}
    for m in summary["policies"].values():
        assert set(m) >= KEYS
        assert 0.0 <= m["slo_attainment"] <= 1.0
    assert summary["duration_s"] == 72.0
    assert summary["policies"]["baseline"]["emergencies"][0]["kind"] == "ups"
    for name in ("policies.csv", "row_power.csv", "summary.md", "row_power.png", "ablation.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "row_power.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "baseline" in (out / "policies.csv").read_text().splitlines()[1]


def test_simulate_refuses_bad_flags_naming_them(tmp_path: Path, capsys) -> None:
    rc = main(["simulate", "--scenario", "ablation", "--out", str(tmp_path), "--servers", "2"])
    assert rc == 2
    assert "servers=2 is outside the allowed range" in capsys.readouterr().err
    rc = main(["simulate", "--scenario", "no-such", "--out", str(tmp_path)])
    assert rc == 2
    assert "neither a built-in" in capsys.readouterr().err
    rc = main(["simulate", "--scenario", "ablation", "--out", str(tmp_path), "--trace",
               str(tmp_path / "missing.csv")])
    assert rc == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()
