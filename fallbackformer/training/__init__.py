"""fallbackformer.training."""
