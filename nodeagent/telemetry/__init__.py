"""Sampling, budgets and the Prometheus endpoint."""
