"""Studies: grokking, the fidelity table, the demo pipeline."""
