"""fallbackformer.models."""
