"""nn.Modules only: MultiExitNet, reference primaries and students, and the model registry."""

from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.models.registry import create_model, list_models, register_model

__all__ = ["MultiExitNet", "create_model", "list_models", "register_model"]
