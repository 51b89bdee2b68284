"""Hierarchical coordinators: parent, leaves, their policy and wiring."""
