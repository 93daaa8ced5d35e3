"""The gRPC side: per-stream protocol state machines and their wiring to grpc.aio."""
