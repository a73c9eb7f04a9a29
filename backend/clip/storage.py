"""Compact storage for long and large clips: integer pixels, memory-mapped scratch arrays,
and a float view that converts only what is read.

A 300-frame 1080p clip is 7.5 GB as float32 RGB but 1.9 GB as uint8, and its masks are
2.5 GB per object as float32 but 0.6 GB as bool. ``load_clip`` therefore keeps frames in
the integer type of their source (uint8 for 8-bit files and videos, uint16 for 16-bit
files, float32 only for float images) and masks as bool, and puts arrays above a size
threshold into memory-mapped scratch files instead of anonymous RAM. ``FloatView`` gives
the engine's usual float32 [0, 1] picture of such an array one slice at a time.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import weakref
from pathlib import Path
from typing import Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

#: Arrays larger than this (bytes) are memory-mapped by default (see :func:`allocate`).
DEFAULT_MMAP_THRESHOLD = 512 * 1024 * 1024

#: How many leading-axis entries reductions and conversions process at once.
_CHUNK_BYTES = 64 * 1024 * 1024

#: Storage dtypes and the divisor that maps them to [0, 1].
_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(bool): 1.0,
           np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0}


def unit_scale(dtype) -> float:
    """The divisor that maps values of a storage dtype to [0, 1] (uint8 255, uint16 65535, else 1)."""
    d = np.dtype(dtype)
    if d not in _SCALES:
        raise TypeError(f"unsupported pixel storage type {d}; use uint8, uint16, bool, float16 or float32")
    return _SCALES[d]


def allocate(shape: tuple[int, ...], dtype, *, scratch_dir: Optional[PathLike] = None,
             mmap_threshold: Optional[int] = DEFAULT_MMAP_THRESHOLD) -> np.ndarray:
    """A zero-initialised array, memory-mapped from a scratch file when it is large.

    ``mmap_threshold`` bytes or more (``0``: always; ``None``: never) go to an unnamed
    file in ``scratch_dir`` (default: the system temporary folder, ``TMPDIR``): the file
    is created and unlinked at once on POSIX, so nothing is left behind even after a
    crash and the disk space returns when the array is freed. Its pages are file-backed:
    the kernel can write them out and drop them under memory pressure, which anonymous
    RAM cannot do without swap.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if mmap_threshold is None or nbytes < int(mmap_threshold) or nbytes == 0:
        return np.zeros(shape, dtype)
    folder = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".neural-atlas-scratch-{os.getpid()}-{secrets.token_hex(6)}.bin"
    arr = np.memmap(path, dtype=dtype, mode="w+", shape=tuple(shape))
    try:
        path.unlink()  # POSIX: the mapping stays valid; the space is freed with it
    except OSError:  # Windows cannot unlink an open file: remove it when the array dies
        weakref.finalize(arr, _remove_quietly, str(path))
    return arr


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def is_memory_mapped(arr) -> bool:
    """True when ``arr`` (or the array it views) is backed by a memory-mapped file."""
    base = arr
    while base is not None:
        if isinstance(base, (np.memmap,)) or type(base).__name__ == "mmap":
            return True
        base = getattr(base, "base", None)
    return False


class FloatView:
    """A read-only float32 [0, 1] view of a compact ``(N, ...)`` array.

    Indexing converts only the selected part (``view[i]`` is one float32 frame), so a
    memory-mapped uint8 clip is never expanded whole. ``np.asarray(view)`` still gives the
    full float32 array for code that wants it (and pays its memory). ``data`` is the
    underlying storage, ``scale`` the divisor (255 for uint8, 65535 for uint16, 1 otherwise).
    """

    __array_priority__ = 10.0  # numpy defers binary operators to our __array__ conversion

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.scale = unit_scale(data.dtype)

    # -- array-like metadata
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Bytes the float32 array would take (the storage takes ``data.nbytes``)."""
        return 4 * self.size

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        kind = "memory-mapped " if is_memory_mapped(self.data) else ""
        return f"FloatView({self.shape}, float32 from {kind}{self.data.dtype})"

    # -- conversion
    def _convert(self, part) -> np.ndarray:
        part = np.asarray(part)
        if part.dtype == np.float32:
            return np.array(part, copy=True)
        out = part.astype(np.float32)
        if self.scale != 1.0:
            out /= np.float32(self.scale)
        return out

    def __getitem__(self, key):
        out = self._convert(self.data[key])
        return out[()] if out.ndim == 0 else out

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.float32)
        for a, b in self._chunks():
            out[a:b] = self[a:b]
        return out if dtype is None else out.astype(dtype, copy=False)

    def _chunks(self):
        n = len(self)
        per = max(1, _CHUNK_BYTES // max(1, 4 * self.size // max(1, n)))
        for a in range(0, n, per):
            yield a, min(n, a + per)

    # -- reductions that never hold the whole float array
    def min(self) -> np.float32:
        return np.float32(min(self.data[a:b].min() for a, b in self._chunks()) / self.scale)

    def max(self) -> np.float32:
        return np.float32(max(self.data[a:b].max() for a, b in self._chunks()) / self.scale)

    def any(self) -> bool:
        return any(bool(self.data[a:b].any()) for a, b in self._chunks())

    def sum(self) -> float:
        return float(sum(float(self.data[a:b].sum(dtype=np.float64)) for a, b in self._chunks())
                     / self.scale)

    def mean(self) -> float:
        return self.sum() / max(1, self.size)


def as_float_view(data: Optional[np.ndarray]):
    """``data`` itself when it is float32 already, else a :class:`FloatView` of it (None stays None)."""
    if data is None:
        return None
    if isinstance(data, FloatView):
        return data
    if data.dtype == np.float32:
        return data
    return FloatView(data)
