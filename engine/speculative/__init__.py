"""Machinery shared by the speculative decoders: verification, KV-cache rollback, the chain round loop."""
