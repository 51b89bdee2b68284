"""shapectl: the operator CLI for shapeshifter."""
