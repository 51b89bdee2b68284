"""Trace-driven, discrete-time cluster simulator (DESIGN §2 "simulator", issue 8).

Layers: scenario (validated input) -> cluster/gpus/service (numpy state and the same physics as
the sim backend) -> policies (baseline and the shapeshifter adapter) -> engine (the loop on the
coordinator's cadence) -> metrics/report (summary.json, CSV, Markdown, PNG).
"""
