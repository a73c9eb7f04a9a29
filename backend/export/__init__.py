"""Atlases, videos, baked maps and the report of a decomposition."""

from .atlas import render_atlas, sample_atlas, splat_max, texel_centres
from .outputs import export_all, write_report

__all__ = ["export_all", "write_report", "render_atlas", "sample_atlas", "splat_max", "texel_centres"]
