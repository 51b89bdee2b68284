"""Pure emergency policies: the shed across tiers and Phase 2."""
