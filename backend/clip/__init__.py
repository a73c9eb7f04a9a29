"""Clip I/O: reading frames, seed layouts, videos and masks; writing images and videos."""

from .source import IMAGE_SUFFIXES, list_images, load_clip, natural_key, parse_frame_range, working_size
from .types import Clip
from .video import VIDEO_SUFFIXES
from .writers import read_image, write_image_sequence, write_json, write_png, write_png16_rgba, write_video

__all__ = [
    "Clip",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "list_images",
    "load_clip",
    "natural_key",
    "parse_frame_range",
    "read_image",
    "working_size",
    "write_image_sequence",
    "write_json",
    "write_png",
    "write_png16_rgba",
    "write_video",
]
