#!/usr/bin/env bash
# Issue 17 evaluation: baseline vs shapeshifter over traces and cluster shapes it was not tuned
# on. Usage: scripts/evaluate-policies.sh [OUT] [HOURS]. Writes OUT/<trace>-<scenario>/ per run
# and OUT/table.md (the README's table). Synthetic traces come from `shapectl trace synth`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-eval-policies}
hours=${2:-1}
# shellcheck source=scripts/eval-common.sh
. scripts/eval-common.sh
runs=()
for s in saas50 saas100 saas0 shape-b; do runs+=("$(run conv "$conv" "$s")"); done
for t in prompt-heavy bursty; do runs+=("$(run "$t" "$out/$t.csv" saas50)"); done
"$py" scripts/policy_table.py "${runs[@]}" | tee "$out/table.md"
