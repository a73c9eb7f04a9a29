"""Preprocessing: optical flow (DIS default, RAFT seam), consistency masks and their cache."""

from .flow import (
    DIS_PRESETS,
    FLOW_METHODS,
    FlowSet,
    compute_flow,
    consistency_mask,
    dis_flow,
    rescale_flow,
)

__all__ = [
    "DIS_PRESETS",
    "FLOW_METHODS",
    "FlowSet",
    "compute_flow",
    "consistency_mask",
    "dis_flow",
    "rescale_flow",
]
