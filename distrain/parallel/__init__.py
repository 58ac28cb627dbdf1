"""Everything that touches ranks and process groups lives here; the rest asks it."""

from distrain.parallel.setup import build_accelerator

__all__ = ["build_accelerator"]
