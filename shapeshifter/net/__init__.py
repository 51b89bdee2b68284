"""TLS transport, token authorization and redialling streams."""
