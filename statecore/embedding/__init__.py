"""statecore.embedding."""
