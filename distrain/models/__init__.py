"""Model factory."""

from distrain.models.factory import create_model, model_names

__all__ = ["create_model", "model_names"]
