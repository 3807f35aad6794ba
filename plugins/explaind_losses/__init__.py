"""First-party explaind plugin: losses (uses only the public API of explaind)."""
