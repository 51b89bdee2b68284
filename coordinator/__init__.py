"""shapeshifter coordinator: topology, state, policies, admin API."""
