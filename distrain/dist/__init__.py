"""Everything that touches ranks and process groups lives here; the rest asks it."""

from distrain.dist.setup import build_accelerator

__all__ = ["build_accelerator"]
