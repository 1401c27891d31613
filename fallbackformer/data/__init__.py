"""fallbackformer.data."""
