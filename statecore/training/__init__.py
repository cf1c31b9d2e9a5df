"""statecore.training."""
