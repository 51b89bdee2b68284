"""Bin packing for the rebalance policy: the candidate configurations an endpoint may run
(candidates), the power and airflow ledger of rows and aisles (ledger), the GPU bins instances
are placed into (packer) and the make-before-break stages of a plan (staging). Pure."""
