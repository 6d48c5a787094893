"""Data: shard manifests, writing WebDataset shards, the DALI loader, the built-in cluttered digits."""
