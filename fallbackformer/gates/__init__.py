"""fallbackformer.gates."""
