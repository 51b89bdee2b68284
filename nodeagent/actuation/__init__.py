"""Plans applied to the GPUs and engines, and their journal."""
