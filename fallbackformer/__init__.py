"""fallbackformer: models that answer on time."""
__version__ = "0.1.0"
