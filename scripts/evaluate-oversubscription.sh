#!/usr/bin/env bash
# Issue 18 evaluation: oversubscription sweeps (0, 20, 40% more servers on the same feeds),
# baseline vs shapeshifter, on workloads and a cluster shape the policies were not tuned on.
# Usage: scripts/evaluate-oversubscription.sh [OUT] [HOURS]. Writes OUT/<run>/ per sweep and
# OUT/table.md (capped time, within SLO, SLO over capped windows, opaque relative performance).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-eval-oversubscription}
hours=${2:-1}
# shellcheck source=scripts/eval-common.sh
. scripts/eval-common.sh
runs=("$(run conv "$conv" oversub-shape-b)")
for t in prompt-heavy bursty; do runs+=("$(run "$t" "$out/$t.csv" oversub-saas50)"); done
"$py" scripts/oversubscription_table.py "${runs[@]}" | tee "$out/table.md"
