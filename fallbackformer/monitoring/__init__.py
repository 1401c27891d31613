"""fallbackformer.monitoring."""
