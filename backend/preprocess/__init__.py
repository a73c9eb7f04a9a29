"""Preprocessing: optical flow (DIS default, RAFT through torchvision), consistency masks and
their cache, and object masks (user sequences, Mask R-CNN detections tracked across frames).

torchvision and detectron2 are optional and imported only when a method needs them.
"""

from .flow import (
    AUTO,
    DIS_PRESETS,
    FLOW_METHODS,
    FlowMethodUnavailable,
    FlowSet,
    compute_flow,
    consistency_mask,
    dis_flow,
    make_flow_method,
    rescale_flow,
)
from .vision import VisionUnavailable, WeightsUnavailable

__all__ = [
    "AUTO",
    "DIS_PRESETS",
    "FLOW_METHODS",
    "FlowMethodUnavailable",
    "FlowSet",
    "VisionUnavailable",
    "WeightsUnavailable",
    "compute_flow",
    "consistency_mask",
    "dis_flow",
    "make_flow_method",
    "rescale_flow",
]
