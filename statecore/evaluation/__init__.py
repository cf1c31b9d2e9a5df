"""statecore.evaluation."""
