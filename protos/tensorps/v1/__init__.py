"""Generated protocol of tensorps.v1 (see tensorps.proto); regenerate with `make protos`."""
