"""fallbackformer.export."""
