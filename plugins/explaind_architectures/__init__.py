"""First-party explaind plugin: architectures (uses only the public API of explaind)."""
