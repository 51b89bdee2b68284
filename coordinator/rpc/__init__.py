"""gRPC servicers (translation only) and the routes HTTP endpoint."""
