# Shared by scripts/evaluate-policies.sh and scripts/evaluate-oversubscription.sh (sourced):
# the conversation trace (or the shipped sample), two synthetic traces from `shapectl trace
# synth`, and `run NAME TRACE SCENARIO` -> OUT/NAME-SCENARIO/summary.json.
# Expects: out, hours (set by the caller).
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
