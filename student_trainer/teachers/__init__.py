"""Teacher clients: one protocol, an HTTP backend (replicas, retries) and an in-process backend."""
