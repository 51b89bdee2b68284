"""GPU backends behind one Protocol (backend.py): NVML (nvml.py) and simulated (sim.py).

Kept light on purpose: importing this package does not import pynvml; import the backend
modules directly (``from nodeagent.device.sim import SimulatedBackend``).
"""
