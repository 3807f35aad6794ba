"""First-party explaind plugin: pruning (uses only the public API of explaind)."""
