"""Errors, clock, logging, sd_notify, the atomic writer and the YAML loader."""
