"""statecore.data."""
