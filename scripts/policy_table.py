"""Print the issue-17 table (ratios of shapeshifter to baseline) from simulate summary.json files.

Usage: python scripts/policy_table.py DIR/summary.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (summary key, target ratio, label); gpus: against the static fleet, mean over the run.
TARGETS = (("peak_row_power_w", 0.80, "peak row power"), ("max_gpu_temp_c", 0.85, "max GPU temp"),
           ("energy_j_per_token", 0.60, "J/token"))


def row(path: Path) -> str:
    doc = json.loads(path.read_text())
    pols = doc.get("policies", doc)
    base, ours = pols["baseline"], pols["shapeshifter"]
    cells = [path.parent.name]
    for key, target, _ in TARGETS:
        if base.get(key) and ours.get(key) is not None:
            r = ours[key] / base[key]
            cells.append(f"{r:.3f} ({'met' if r <= target else 'missed'})")
        else:
            cells.append("n/a")
    static = ours.get("gpus_static") or 0
    if static:
        peak, mean = ours["gpus_used"] / static, ours["gpus_used_mean"] / static
        cells.append(f"{peak:.2f} / {mean:.2f} ({'met' if mean <= 0.75 else 'missed'})")
    else:
        cells.append("n/a (no SaaS)")
    slo_b, slo_o = base["slo_attainment"], ours["slo_attainment"]
    ok = slo_o >= 0.99 and slo_o >= slo_b - 0.005
    cells.append(f"{slo_b:.4f} / {slo_o:.4f} ({'met' if ok else 'missed'})")
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    print("| run | peak row power (<= 0.80) | max GPU temp (<= 0.85) | J/token (<= 0.60) "
          "| GPUs peak / mean vs static (<= 0.75) | within SLO base / ours (>= 99%) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in paths:
        print(row(Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
