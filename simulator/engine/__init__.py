"""The discrete-time loop (core.Engine) and its collaborators: setup (workload and layout),
instances (the fleet), requests (arrivals, demand, routing, service), limits (capping scopes);
the physical state is simulator.model.plant."""

from simulator.engine.core import Engine, simulate

__all__ = ["Engine", "simulate"]
