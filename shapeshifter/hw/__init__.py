"""GPU catalog, power/thermal physics, server model, MIG geometry and value types."""
