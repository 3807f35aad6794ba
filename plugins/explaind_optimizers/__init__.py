"""First-party explaind plugin: optimizers (uses only the public API of explaind)."""
