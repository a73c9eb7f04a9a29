"""Clip I/O: reading frames, seed layouts, videos and masks; writing images and videos."""

from .types import Clip

__all__ = ["Clip"]
