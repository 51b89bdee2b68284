#!/usr/bin/env bash
# Regenerate the simulator evaluation (issue 8) into a folder: ablation (TAPAS Fig. 20),
# oversubscription sweep (Fig. 21), UPS failure. Usage: scripts/evaluate.sh [OUT] [SERVERS] [HOURS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-eval}
servers=${2:-64}
hours=${3:-1}
trace=${TRACE:-../shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv}
[ -f "$trace" ] || trace=simulator/data/AzureLLMInferenceTrace_conv_sample.csv
py=${PYTHON:-.venv/bin/python}
for scenario in ablation oversubscription ups-failure; do
    "$py" -m shapectl.cli simulate --scenario "$scenario" --trace "$trace" \
        --out "$out/$scenario" --servers "$servers" --hours "$hours" --seed 0
done
echo "evaluation written to $out/ (summary.md, summary.json, CSV and PNG per scenario)"
