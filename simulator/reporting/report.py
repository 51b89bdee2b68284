"""Outputs: summary.json, CSV (per policy and time series), Markdown summary, PNG plots (Agg)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from simulator.reporting.metrics import Metrics

SUMMARY_KEYS = ("peak_row_power_w", "max_gpu_temp_c", "capped_time_frac", "slo_attainment",
                "energy_j_per_token", "gpus_used", "reconfigurations")
TABLE_KEYS = (*SUMMARY_KEYS, "p99_latency_s", "opaque_relative_perf", "slo_attainment_capped")
TARGETS = (
    "On the trace at >= 99% of requests within SLO: peak row power >= 20% below baseline; max GPU "
    "temperature >= 15% below; at 40% oversubscription < 1% of time under capping; >= 25% fewer "
    "GPUs than static allocation; energy per token >= 30% below baseline.")


def write_outputs(out: Path, result: dict[str, Any], runs: dict[str, Metrics]) -> list[Path]:
    """Write everything for one scenario; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "summary.json", out / "policies.csv", out / "summary.md",
             out / "row_power.csv"]
    files[0].write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    _policies_csv(files[1], result)
    files[2].write_text(markdown(result))
    _timeseries_csv(files[3], runs)
    files.append(_plot_row_power(out / "row_power.png", runs))
    files.append(_plot_bars(out / "ablation.png", result))
    if result.get("sweep"):
        files.append(out / "oversubscription.csv")
        _sweep_csv(files[-1], result["sweep"])
        files.append(_plot_sweep(out / "oversubscription.png", result["sweep"]))
    return files


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, dict | list)}


def _policies_csv(path: Path, result: dict[str, Any]) -> None:
    rows = [{"policy": name, **_flat(m)} for name, m in result["policies"].items()]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _timeseries_csv(path: Path, runs: dict[str, Metrics]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "t_s", "row", "row_power_w", "row_limit_w", "max_gpu_temp_c",
                    "gpus_hosting"])
        for name, m in runs.items():
            stride = max(1, len(m.t_s) // 720)  # at most ~720 points per row and policy
            for k in range(0, len(m.t_s), stride):
                for r in range(m.row_power_w.shape[1]):
                    w.writerow([name, f"{m.t_s[k]:g}", r, f"{m.row_power_w[k, r]:.1f}",
                                f"{m.row_limit_w[k, r]:.1f}", f"{m.max_temp_c[k]:.2f}",
                                int(m.gpus_hosting[k])])


def _sweep_csv(path: Path, sweep: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["oversubscription", "policy", *SUMMARY_KEYS])
        for point in sweep:
            for name, m in point["policies"].items():
                w.writerow([point["oversubscription"], name, *(m[k] for k in SUMMARY_KEYS)])


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Simulation: {result['scenario']}", "", result.get("description", ""), "",
             f"Servers {result['servers']}, {result['duration_s']:g} s, seed {result['seed']}, "
             f"trace `{result['trace']}`.", "", "| policy | " + " | ".join(TABLE_KEYS) + " |",
             "|" + " --- |" * (len(TABLE_KEYS) + 1)]
    for name, m in result["policies"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in TABLE_KEYS) + " |")
    base = result["policies"].get("baseline")
    if base:
        lines += ["", "Change vs baseline (negative = lower):", ""]
        for name, m in result["policies"].items():
            if name == "baseline":
                continue
            parts = [f"{k} {_rel(m.get(k), base.get(k))}" for k in
                     ("peak_row_power_w", "max_gpu_temp_c", "energy_j_per_token", "gpus_used")]
            lines.append(f"- {name}: " + ", ".join(parts))
    for point in result.get("sweep", []):
        lines.append(f"- oversubscription {point['oversubscription']:.0%}: " + ", ".join(
            f"{n} capped {m['capped_time_frac']:.2%} SLO {m['slo_attainment']:.2%}"
            for n, m in point["policies"].items()))
    lines += ["", "Policy implementations:", ""]
    for name, src in result.get("policy_sources", {}).items():
        lines.append(f"- {name}: " + "; ".join(f"{k}: {v}" for k, v in src.items()))
    lines += ["", f"Targets (issue 8): {TARGETS}", ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rel(v: Any, b: Any) -> str:
    if not isinstance(v, int | float) or not isinstance(b, int | float) or b == 0:
        return "-"
    return f"{(v - b) / b:+.1%}"


def _plot_row_power(path: Path, runs: dict[str, Metrics]) -> Path:
    names = list(runs)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.2 * len(names)), sharex=True,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        m = runs[name]
        t_min = m.t_s / 60.0
        for r in range(m.row_power_w.shape[1]):
            ax.plot(t_min, m.row_power_w[:, r] / 1e3, lw=0.6)
        ax.plot(t_min, m.row_limit_w.min(axis=1) / 1e3, "k--", lw=1.0, label="lowest row limit")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("row kW")
    axes[-1, 0].set_xlabel("time (min)")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_bars(path: Path, result: dict[str, Any]) -> Path:
    """TAPAS Fig. 20 style: max temperature and peak row power per policy, normalized."""
    pols = result["policies"]
    names = list(pols)
    limit_w = result["row_limit_w"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = (("max_gpu_temp_c", "max GPU temp / slowdown", result["gpu_slowdown_c"]),
              ("peak_row_power_w", "peak row power / row limit", limit_w),
              ("energy_j_per_token", "energy per token (J)", 1.0))
    for ax, (key, title, norm) in zip(axes, panels, strict=True):
        vals = [(pols[n].get(key) or 0.0) / norm for n in names]
        ax.bar(range(len(names)), vals, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sweep(path: Path, sweep: list[dict[str, Any]]) -> Path:
    """TAPAS Fig. 21 style: time under capping vs oversubscription."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = [p["oversubscription"] * 100 for p in sweep]
    for name in sweep[0]["policies"]:
        ax.plot(xs, [100 * p["policies"][name]["capped_time_frac"] for p in sweep], "o-",
                label=name)
    ax.set_xlabel("extra servers per row (%)")
    ax.set_ylabel("time under capping (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
