"""shapeshifter node agent: one per GPU server."""
