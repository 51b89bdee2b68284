"""What holds without the coordinator: leases, emergency caps, the thermal guard."""
