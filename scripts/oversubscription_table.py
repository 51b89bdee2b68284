"""Print the issue-18 table from oversubscription sweeps' summary.json files: per run and
oversubscription point, baseline -> shapeshifter capped time (TAPAS: any row or aisle), share
of requests within SLO, SLO over the capped windows and opaque relative performance.

Usage: python scripts/oversubscription_table.py DIR/summary.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = (("capped_time_frac", "capped"), ("slo_attainment", "within SLO"),
        ("slo_attainment_capped", "SLO while capped"), ("opaque_relative_perf", "opaque perf"))


def cell(base: dict, ours: dict, key: str) -> str:
    def fmt(v: float | None) -> str:
        if v is None:
            return "n/a"
        return f"{v:.2f}" if key == "opaque_relative_perf" else f"{100 * v:.1f}%"
    return f"{fmt(base.get(key))} → {fmt(ours.get(key))}"


def rows(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    out = []
    for point in doc.get("sweep", []):
        pols = point["policies"]
        cells = [path.parent.name, f"+{point['oversubscription']:.0%}"]
        cells += [cell(pols["baseline"], pols["shapeshifter"], k) for k, _ in KEYS]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("| run | servers | " + " | ".join(label for _, label in KEYS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in KEYS) + " |")
    for arg in argv:
        for line in rows(Path(arg)):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
