"""The policies the simulator compares (policies), the shapeshifter closed loop around the
coordinator's pure functions (shaping), what it observes (observe), and the adapters between the
simulator's arrays and coordinator.policy's types (snapshot)."""
