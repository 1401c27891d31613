"""fallbackformer.evaluation."""
