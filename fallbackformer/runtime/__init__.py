"""fallbackformer.runtime."""
