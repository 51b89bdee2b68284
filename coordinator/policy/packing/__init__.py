"""Bin packing for the rebalance policy: the candidate configurations an endpoint may run
(candidates), each endpoint's sizing (sizing), the keep-or-change choice per endpoint (choice),
the power and airflow ledger of rows and aisles (ledger), the GPU bins instances are placed into
(packer), the actions of the placed changes (actions) and their make-before-break stages
(staging). Pure."""
