"""What a run is given: the scenario (validated YAML, built-ins in simulator/scenarios), the
Azure-schema request trace (a sample in simulator/data) and synthetic traces."""
