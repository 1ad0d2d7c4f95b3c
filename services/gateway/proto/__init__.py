"""The Open Inference Protocol's gRPC service: the proto and its generated modules."""
