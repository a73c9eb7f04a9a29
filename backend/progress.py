"""Progress reports and cancellation shared by the engine, the CLI and the service."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, asdict
from typing import Any, Callable, Optional

from .errors import Cancelled

# The phases a job goes through are listed once, in neural_atlas.core.protocol.PHASES.


@dataclass
class Progress:
    phase: str
    fraction: float = 0.0  # 0..1 within the whole job (all phases)
    iteration: int = 0
    iterations: int = 0
    eta_s: Optional[float] = None
    psnr: Optional[float] = None  # running PSNR of the training batch, dB
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[Progress], None]


def null_progress(_: Progress) -> None:
    return None


class CancelToken:
    """Thread-safe cancellation flag polled by the engine between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        # what a cancel does at the current stage, for the message a signal handler prints
        # (training: "saving a checkpoint"; the pipeline and the demo update it as they go)
        self.note = "saving a checkpoint"
        # called on every poll (cheap, throttled by its owner): the CLI's SignalGuard re-arms
        # Ctrl-C/SIGTERM here when a native library replaced their C-level handlers
        self.on_poll: Optional[Callable[[], object]] = None

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if self.on_poll is not None:
            self.on_poll()
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled(self.reason or "cancelled")
