"""Trace-driven, discrete-time cluster simulator (DESIGN §2 "simulator", issue 8).

Subpackages, each importing only those above it:
  inputs     what a run is given: the validated scenario, the request trace, synthetic traces;
  model      the cluster and its physics and service: layout, GPU arrays, the plant's power and
             airflow, opaque load shapes, the LLM service model, what the policies see (View);
  control    the policies (baseline and the shapeshifter adapter), their closed loop, what they
             observe, and the adapters to the coordinator's pure policy functions;
  reporting  what a run measures (Metrics) and its outputs (summary.json, CSV, Markdown, PNG);
  engine     the loop on the coordinator's cadence, with its collaborators.
`runner.run_scenario` runs every policy of a scenario and writes the outputs.
"""
