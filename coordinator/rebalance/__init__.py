"""The rebalancing loop and the snapshots it plans from."""
