"""statecore.inference."""
