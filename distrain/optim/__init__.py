"""Optimizers, parameter groups and the LR schedule."""

from distrain.optim.factory import create_optimizer, param_groups
from distrain.optim.schedule import lr_at

__all__ = ["create_optimizer", "lr_at", "param_groups"]
