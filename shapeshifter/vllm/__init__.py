"""What the daemons read from vLLM: its Prometheus metrics."""
