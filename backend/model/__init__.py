"""Networks and the layered model (method.md section 1)."""

from .geometry import Geometry
from .networks import LayeredModel, Render, hierarchical_alpha

__all__ = ["Geometry", "LayeredModel", "Render", "hierarchical_alpha"]
