"""Pure policies: (ClusterSnapshot, Profiles, Limits, Config) -> Plan, no I/O, no clock reads.

The loop (coordinator), the tests and the simulator call the same functions (DESIGN §5).
"""
