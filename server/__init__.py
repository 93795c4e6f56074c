"""The tensorps server: shared-memory store, striped locks, TF semantics, gRPC service, supervisor."""
