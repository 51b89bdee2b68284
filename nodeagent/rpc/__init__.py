"""gRPC: the NodeAgent servicer and the coordinator link."""
