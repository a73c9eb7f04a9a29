"""RAFT optical flow through torchvision (``raft_large``, ``raft_small``).

:class:`RaftFlow` is a flow method in the sense of ``flow.FlowFn``: it takes uint8 RGB
pairs ``(B, H, W, 3)`` and returns ``(B, H, W, 2)`` float32 flows (dx, dy) in pixels.
It pads each batch to the model's multiple (8 px; at least 128 px so that RAFT's
four-level correlation pyramid has cells to pool) by replicating the border, evenly
on both sides, and crops the padding off the result: flows always have the input's
size (the seed kept the padded size). Pairs run in batches on the GPU when there is
one, under bfloat16/float16 autocast there if asked.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .vision import (
    WeightsSpec,
    import_torchvision,
    load_state_dict,
    pick_device,
    resolve_weights,
)

#: RAFT's size multiple (its feature maps are 1/8 of the input) and the smallest padded side.
MULTIPLE = 8
MIN_SIDE = 128

VARIANTS = ("raft_large", "raft_small")


def pad_amounts(height: int, width: int, multiple: int = MULTIPLE,
                min_side: int = MIN_SIDE) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that makes both sides multiples of ``multiple``
    and at least ``min_side``, split evenly (the extra pixel, if any, at the bottom/right)."""
    def split(n: int) -> tuple[int, int]:
        target = max(-(-n // multiple) * multiple, -(-min_side // multiple) * multiple)
        extra = target - n
        return extra // 2, extra - extra // 2
    top, bottom = split(height)
    left, right = split(width)
    return top, bottom, left, right


def pad_images(x, multiple: int = MULTIPLE, min_side: int = MIN_SIDE):
    """Replicate-pad a ``(B, C, H, W)`` tensor; returns ``(padded, (top, bottom, left, right))``."""
    import torch.nn.functional as F

    pads = pad_amounts(x.shape[-2], x.shape[-1], multiple, min_side)
    top, bottom, left, right = pads
    if not any(pads):
        return x, pads
    return F.pad(x, (left, right, top, bottom), mode="replicate"), pads


def unpad(flow, pads: tuple[int, int, int, int]):
    """Crop ``pad_images``'s padding off a ``(B, 2, H', W')`` flow (values need no change:
    padding shifts both images alike, so displacements are the same in either frame)."""
    top, bottom, left, right = pads
    h, w = flow.shape[-2], flow.shape[-1]
    return flow[..., top:h - bottom, left:w - right]


class RaftFlow:
    """RAFT from torchvision as a flow method.

    variant
        ``"raft_large"`` (5.3M parameters, the quality option) or ``"raft_small"`` (1M).
    weights
        ``"default"`` (torchvision's C_T_SKHT_V2 / C_T_V2 weights from its cache folder),
        a path to a state dict, or ``None`` for random weights (tests, speed only);
        see :func:`backend.preprocess.vision.resolve_weights`.
    device
        ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
    iters
        Refinement iterations (torchvision's default 12; the seed used 20).
    batch_size
        Pairs per forward pass; default from the correlation volume's size
        (about 3 GiB of it per batch on CUDA, 1 GiB on CPU).
    amp
        Autocast to bfloat16 on CUDA (the seed used mixed precision too).
    """

    def __init__(self, variant: str = "raft_large", weights: WeightsSpec = "default",
                 device: Optional[str] = None, iters: int = 12,
                 batch_size: Optional[int] = None, amp: bool = False) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown RAFT variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        tv = import_torchvision()
        of = tv.models.optical_flow
        enum = of.Raft_Large_Weights if variant == "raft_large" else of.Raft_Small_Weights
        self.weights_path = resolve_weights(weights, enum.DEFAULT.url, f"RAFT ({variant})",
                                            "--flow-weights")
        model = getattr(of, variant)(weights=None, progress=False)
        if self.weights_path is not None:
            state = load_state_dict(self.weights_path, f"RAFT ({variant})")
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                from .vision import WeightsUnavailable
                raise WeightsUnavailable(f"{self.weights_path} does not hold {variant} weights: "
                                         f"{str(e).splitlines()[0]}") from None
        self._setup(variant, model, device, iters, batch_size, amp)

    def _setup(self, variant: str, model, device: Optional[str], iters: int,
               batch_size: Optional[int], amp: bool) -> None:
        import torch

        self.variant = variant
        self.device = pick_device(device)
        self.model = model.eval().to(self.device)
        self.iters = int(iters)
        self.batch_size = batch_size
        self.amp = bool(amp) and self.device.type == "cuda"
        self._torch = torch

    @classmethod
    def from_model(cls, model, device: Optional[str] = "cpu", iters: int = 12,
                   batch_size: Optional[int] = None, amp: bool = False) -> "RaftFlow":
        """Wrap an already built RAFT-like module (``model(img1, img2, num_flow_updates=n)``
        returning a list of ``(B, 2, H, W)`` flows); no torchvision import, no weights lookup."""
        self = cls.__new__(cls)
        self.weights_path = None
        self._setup(type(model).__name__, model, device, iters, batch_size, amp)
        return self

    @property
    def tag(self) -> str:
        """What decides the flows (for the cache): variant, weights file, iterations."""
        w = "random" if self.weights_path is None else self.weights_path.name
        return f"{self.variant}/{w}/iters{self.iters}"

    def pairs_per_batch(self, height: int, width: int) -> int:
        if self.batch_size:
            return int(self.batch_size)
        top, bottom, left, right = pad_amounts(height, width)
        cells = ((height + top + bottom) // 8) * ((width + left + right) // 8)
        corr_bytes = 4 * cells * cells * 1.33  # all-pairs volume plus its pyramid
        budget = (3 << 30) if self.device.type == "cuda" else (1 << 30)
        return int(max(1, min(16, budget // corr_bytes)))

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        torch = self._torch
        n, h, w = src.shape[:3]
        out = np.empty((n, h, w, 2), np.float32)
        step = self.pairs_per_batch(h, w)
        with torch.inference_mode():
            for a in range(0, n, step):
                b = min(n, a + step)
                i1 = self._prepare(src[a:b])
                i2 = self._prepare(dst[a:b])
                i1, pads = pad_images(i1)
                i2, _ = pad_images(i2)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    flows = self.model(i1, i2, num_flow_updates=self.iters)
                flow = unpad(flows[-1].float(), pads)
                out[a:b] = flow.permute(0, 2, 3, 1).cpu().numpy()
        return out

    def _prepare(self, rgb8: np.ndarray):
        """uint8 RGB (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] on the device (RAFT's input)."""
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(rgb8)).to(self.device, non_blocking=True)
        return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
