"""A small model registry: ``create_model(name, num_classes=..., in_channels=...)``."""

from .registry import create_model, list_models, register_model
from . import resnet, smallcnn  # noqa: F401  (registers the models)

__all__ = ["create_model", "list_models", "register_model"]
