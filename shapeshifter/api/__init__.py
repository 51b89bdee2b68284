"""Generated protobuf and gRPC modules (scripts/gen_protos.sh)."""
