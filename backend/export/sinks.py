"""Background writers for the export: a frame's files are encoded and written on worker threads
while the device evaluates the next frame, and each video stream is encoded as its frames come.

At 1080p one exported frame is six PNGs (~0.2 s each to encode on one core), six video frames
and ~66 MB of baked maps: written in the loop's thread that is seconds per frame, on a GPU that
evaluates the frame in milliseconds. ``FrameWriters`` runs such jobs on a thread pool (OpenCV's
PNG encoder, file writes and large NumPy copies release the GIL) with at most ``depth`` frames
in flight, so memory stays bounded; ``VideoSink`` feeds one encoder from a queue in frame order.
Errors from a worker surface at the next ``submit`` or at ``close``; ``abort`` drops the rest
and leaves no partial video under its final name.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from ..clip import write_png, write_video

_END = object()
_ABORT = object()


def default_workers() -> int:
    """Worker threads for the export: the cores this process may run on, 2 to 8. More do not help:
    on the H200 host (16 cores) 16 threads exported 1080p 0.94x as fast as 8 (docs/benchmarks.md,
    "Export phases and writer threads")."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


def store_job(dst: np.ndarray, src: np.ndarray) -> Callable[[], None]:
    """A job copying ``src`` into ``dst`` (a slice of a memory-mapped baked map)."""
    def job() -> None:
        dst[...] = src
    return job


def png_job(path: Path, image: np.ndarray) -> Callable[[], object]:
    """A job writing ``image`` (uint8 is written as is) as a PNG at ``path``."""
    return lambda: write_png(path, image)


class FrameWriters:
    """A thread pool for per-frame write jobs with at most ``depth`` frames of jobs in flight."""

    def __init__(self, workers: Optional[int] = None, depth: int = 2) -> None:
        self.workers = int(workers or default_workers())
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="export")
        self._pending: deque[list[Future]] = deque()
        self._depth = max(1, depth)

    def submit(self, jobs: list[Callable[[], object]]) -> None:
        """Queue one frame's jobs; waits for the oldest frame when ``depth`` are in flight."""
        self._pending.append([self._pool.submit(job) for job in jobs])
        while len(self._pending) > self._depth:
            _wait(self._pending.popleft())

    def close(self) -> None:
        """Wait for every job; re-raise the first error."""
        try:
            while self._pending:
                _wait(self._pending.popleft())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Drop the jobs not yet started and wait for the running ones, ignoring their errors."""
        for jobs in self._pending:
            for job in jobs:
                job.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _wait(jobs: list[Future]) -> None:
    for job in jobs:
        job.result()


class _Aborted(Exception):
    pass


class VideoSink:
    """Encode one video stream on its own thread from frames handed over in order.

    ``put`` takes uint8 (or float in [0, 1]) RGB frames; ``close`` finishes the file and returns
    the path :func:`backend.clip.write_video` wrote. A failed encoder raises at the next ``put``
    or at ``close``.
    """

    def __init__(self, path: Path, fps: float, backlog: int = 4) -> None:
        self.path = Path(path)
        self._q: queue.Queue = queue.Queue(maxsize=backlog)
        self._written: Optional[Path] = None
        self._error: Optional[BaseException] = None
        self._ended = False  # the encoder has taken the end (or abort) marker
        self._thread = threading.Thread(target=self._run, args=(fps,), daemon=True,
                                        name=f"video-{self.path.stem}")
        self._thread.start()

    def _frames(self) -> Iterator[np.ndarray]:
        while True:
            item = self._q.get()
            if item is _END or item is _ABORT:
                self._ended = True
                if item is _ABORT:
                    raise _Aborted()
                return
            yield item

    def _run(self, fps: float) -> None:
        try:
            self._written = write_video(self.path, self._frames(), fps)
        except _Aborted:
            pass
        except BaseException as e:  # handed to the producer at its next put/close
            self._error = e
            while not self._ended:  # keep taking frames so the producer never blocks
                item = self._q.get()
                self._ended = item is _END or item is _ABORT

    def put(self, frame: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(frame)

    def close(self) -> Path:
        self._q.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._written is not None
        return self._written

    def abort(self) -> None:
        if self._thread.is_alive():
            self._q.put(_ABORT)
            self._thread.join()
