"""One fused GPU pass per frame for edit re-rendering (delta mode), in Triton.

For every pixel: ``out = frame + sum_i o_i * alpha_i * R_i * D_i(uv_i)`` where ``D_i`` is layer i's
premultiplied edit delta image (S_i x S_i x 3, each layer its own size) and ``o_i`` its opacity at
this frame (the edit's lifetime; 1 when not given), sampled bilinearly with the atlas convention of
``backend.export.atlas`` (``grid_sample(align_corners=False, padding_mode='border')``), then
clamped and quantised to 8 bits (``floor(x * 255 + 0.5)``, as the PNG writer does). Inputs are
read once and the output written once: the pass is bound by memory traffic (about 16 bytes
per pixel and edited layer, plus the frame in and out).

``composite_delta_torch`` is the same computation with PyTorch operations: the fallback on
CPU and the reference the kernel is tested against.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from ..export.atlas import sample_atlas

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no triton here
    triton = None


def composite_delta_torch(frame_u8: torch.Tensor, uv: torch.Tensor, alpha: torch.Tensor,
                          residual: torch.Tensor, deltas,
                          opacity: torch.Tensor | None = None) -> torch.Tensor:
    """frame (H,W,3) uint8, uv (N,H,W,2), alpha (N,H,W), residual (N,H,W,3), deltas: N images
    (S_i,S_i,3) (a list, or one (N,S,S,3) tensor), opacity (N,) or None (all 1) -> uint8."""
    out = frame_u8.to(torch.float32) / 255.0
    for i in range(len(deltas)):
        a = alpha[i].float() if opacity is None else alpha[i].float() * opacity[i].float()
        out = out + a[..., None] * residual[i].float() * sample_atlas(deltas[i], uv[i].float())
    return torch.floor(out.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)


if triton is not None:
    @triton.jit
    def _composite_kernel(frame, uv, alpha, res, delta, sizes, starts, opacity, out, n_pix,
                          N: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        p = pid * BLOCK + tl.arange(0, BLOCK)
        m = p < n_pix
        r = tl.load(frame + p * 3 + 0, mask=m, other=0).to(tl.float32) / 255.0
        g = tl.load(frame + p * 3 + 1, mask=m, other=0).to(tl.float32) / 255.0
        b = tl.load(frame + p * 3 + 2, mask=m, other=0).to(tl.float32) / 255.0
        for i in tl.static_range(N):
            S = tl.load(sizes + i)  # layer i's atlas size; its delta starts at element starts[i]
            smax = (S - 1).to(tl.float32)
            half = S.to(tl.float32) * 0.5
            base = i * n_pix + p
            u = tl.load(uv + base * 2 + 0, mask=m, other=0.0).to(tl.float32)
            v = tl.load(uv + base * 2 + 1, mask=m, other=0.0).to(tl.float32)
            a = tl.load(alpha + base, mask=m, other=0.0).to(tl.float32) * tl.load(opacity + i)
            rr = tl.load(res + base * 3 + 0, mask=m, other=0.0).to(tl.float32)
            rg = tl.load(res + base * 3 + 1, mask=m, other=0.0).to(tl.float32)
            rb = tl.load(res + base * 3 + 2, mask=m, other=0.0).to(tl.float32)
            # continuous texel coordinates, clamped to the border (grid_sample 'border')
            cx = tl.minimum(tl.maximum((u + 1.0) * half - 0.5, 0.0), smax)
            cy = tl.minimum(tl.maximum((v + 1.0) * half - 0.5, 0.0), smax)
            x0f = tl.floor(cx)
            y0f = tl.floor(cy)
            wx = cx - x0f
            wy = cy - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            x1 = tl.minimum(x0 + 1, S - 1)
            y1 = tl.minimum(y0 + 1, S - 1)
            d = delta + tl.load(starts + i)
            i00 = (y0 * S + x0) * 3
            i01 = (y0 * S + x1) * 3
            i10 = (y1 * S + x0) * 3
            i11 = (y1 * S + x1) * 3
            w00 = (1.0 - wx) * (1.0 - wy)
            w01 = wx * (1.0 - wy)
            w10 = (1.0 - wx) * wy
            w11 = wx * wy
            dr = (tl.load(d + i00, mask=m, other=0.0) * w00 + tl.load(d + i01, mask=m, other=0.0) * w01
                  + tl.load(d + i10, mask=m, other=0.0) * w10 + tl.load(d + i11, mask=m, other=0.0) * w11)
            dg = (tl.load(d + i00 + 1, mask=m, other=0.0) * w00 + tl.load(d + i01 + 1, mask=m, other=0.0) * w01
                  + tl.load(d + i10 + 1, mask=m, other=0.0) * w10 + tl.load(d + i11 + 1, mask=m, other=0.0) * w11)
            db = (tl.load(d + i00 + 2, mask=m, other=0.0) * w00 + tl.load(d + i01 + 2, mask=m, other=0.0) * w01
                  + tl.load(d + i10 + 2, mask=m, other=0.0) * w10 + tl.load(d + i11 + 2, mask=m, other=0.0) * w11)
            r += a * rr * dr
            g += a * rg * dg
            b += a * rb * db
        r = tl.floor(tl.minimum(tl.maximum(r, 0.0), 1.0) * 255.0 + 0.5)
        g = tl.floor(tl.minimum(tl.maximum(g, 0.0), 1.0) * 255.0 + 0.5)
        b = tl.floor(tl.minimum(tl.maximum(b, 0.0), 1.0) * 255.0 + 0.5)
        tl.store(out + p * 3 + 0, r.to(tl.uint8), mask=m)
        tl.store(out + p * 3 + 1, g.to(tl.uint8), mask=m)
        tl.store(out + p * 3 + 2, b.to(tl.uint8), mask=m)


def composite_delta(frame_u8: torch.Tensor, uv: torch.Tensor, alpha: torch.Tensor, residual: torch.Tensor,
                    deltas, out: torch.Tensor | None = None, block: int = 512,
                    opacity: torch.Tensor | None = None) -> torch.Tensor:
    """The fused pass on CUDA (Triton); the PyTorch composite elsewhere. Same arguments as
    :func:`composite_delta_torch`; ``out`` (H,W,3) uint8 may be given to avoid an allocation."""
    kernel_ok = frame_u8.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not kernel_ok:
        return composite_delta_torch(frame_u8, uv, alpha, residual, deltas, opacity)
    H, W, _ = frame_u8.shape
    N = len(deltas)
    dev = frame_u8.device
    flat = torch.cat([d.to(device=dev, dtype=torch.float32).reshape(-1) for d in deltas])
    sizes = torch.tensor([int(d.shape[0]) for d in deltas], dtype=torch.int32, device=dev)
    starts = torch.tensor([0] + [int(d.numel()) for d in deltas][:-1], dtype=torch.int64).cumsum(0).to(dev)
    if out is None:
        out = torch.empty_like(frame_u8)
    o = (torch.ones(N, device=frame_u8.device) if opacity is None
         else opacity.to(device=frame_u8.device, dtype=torch.float32).contiguous())
    n = H * W
    _composite_kernel[(triton.cdiv(n, block),)](
        frame_u8.contiguous(), uv.contiguous(), alpha.contiguous(), residual.contiguous(),
        flat, sizes, starts, o, out, n, N=N, BLOCK=block, num_warps=4)
    return out


def upsample_maps(uv: torch.Tensor, alpha: torch.Tensor, residual: torch.Tensor, size: tuple[int, int]):
    """Baked maps (N,h,w,...) to another frame size with bilinear, pixel-centre interpolation."""
    stack = torch.cat([uv.float(), alpha.float()[..., None], residual.float()], -1).permute(0, 3, 1, 2)
    stack = F.interpolate(stack, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return stack[..., :2].contiguous(), stack[..., 2].contiguous(), stack[..., 3:].contiguous()
