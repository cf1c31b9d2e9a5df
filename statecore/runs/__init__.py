"""statecore.runs."""
