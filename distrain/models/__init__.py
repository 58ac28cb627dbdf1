"""Model factory, config check and summary; norm layers; stochastic depth."""

from distrain.models.factory import (
    check_model,
    check_model_name,
    create_meta_model,
    create_model,
    model_names,
    model_summary,
)
from distrain.models.norms import NORM_LAYERS, check_norm_runtime

__all__ = ["NORM_LAYERS", "check_model", "check_model_name", "check_norm_runtime", "create_meta_model", "create_model",
           "model_names", "model_summary"]
