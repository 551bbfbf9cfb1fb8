"""Checkpoint I/O: Hub resolution, shard index, lazy one-tensor-at-a-time reads, streaming writes."""
