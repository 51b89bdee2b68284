#!/usr/bin/env bash
# Issue 17 evaluation: baseline vs shapeshifter over traces and cluster shapes it was not tuned
# on. Usage: scripts/evaluate-policies.sh [OUT] [HOURS]. Writes OUT/<trace>-<scenario>/ per run
# and OUT/table.md (the README's table). Synthetic traces come from `shapectl trace synth`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-eval-policies}
hours=${2:-1}
py=${PYTHON:-.venv/bin/python}
conv=../shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv
[ -f "$conv" ] || conv=simulator/data/AzureLLMInferenceTrace_conv_sample.csv
mkdir -p "$out"
"$py" -m shapectl.cli trace synth --preset prompt-heavy --duration-s 7200 --rate-rps 5 \
    --seed 1 --out "$out/prompt-heavy.csv" >/dev/null
"$py" -m shapectl.cli trace synth --preset bursty --duration-s 7200 --rate-rps 5 \
    --seed 2 --out "$out/bursty.csv" >/dev/null
run() {  # trace-name trace-file scenario
    "$py" -m shapectl.cli simulate --scenario "simulator/eval/$3.yaml" --trace "$2" \
        --out "$out/$1-$3" --hours "$hours" --seed 0 --quiet >/dev/null
    echo "$out/$1-$3/summary.json"
}
runs=()
for s in saas50 saas100 saas0 shape-b; do runs+=("$(run conv "$conv" "$s")"); done
for t in prompt-heavy bursty; do runs+=("$(run "$t" "$out/$t.csv" saas50)"); done
"$py" scripts/policy_table.py "${runs[@]}" | tee "$out/table.md"
