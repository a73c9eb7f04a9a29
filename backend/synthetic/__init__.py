"""The ground-truth demo clip and the yardsticks that measure a decomposition against it.

``make_synthetic_clip`` builds a deterministic shot (moving camera over a textured
background, textured objects that translate, rotate and scale) with exact per-pixel
texture coordinates; ``yardsticks`` holds edit drift, alpha IoU and PSNR.
"""

from .scene import SyntheticScene, load, make_synthetic_clip
from .yardsticks import (alpha_iou, mark_drift, paint_disc, psnr, psnr_per_frame, texel_to_uv,
                         uv_to_texel)

__all__ = ["SyntheticScene", "alpha_iou", "load", "make_synthetic_clip", "mark_drift",
           "paint_disc", "psnr", "psnr_per_frame", "texel_to_uv", "uv_to_texel"]
