"""Applying edited atlases to a decomposed shot from its baked maps."""

from .apply import EditRenderer, edit_delta, load_bake, render_edit

__all__ = ["EditRenderer", "edit_delta", "load_bake", "render_edit"]
