"""Multiresolution hash-grid encoding with tiny-cuda-nn's exact semantics (PyTorch reference).

tiny-cuda-nn ``HashGrid`` (``grid.h``), reproduced here (method.md 1.3 and 8.2):

* level ``l`` has ``scale_l = exp2(l * log2(per_level_scale)) * base_resolution - 1`` (float32)
  and ``res_l = ceil(scale_l) + 1`` vertices per axis;
* the level holds ``P_l = min(next_multiple_of_8(res_l ** d), 2 ** log2_hashmap_size)`` entries
  of ``n_features_per_level`` floats; tables are concatenated level after level;
* an input ``x`` in [0, 1]^d is placed at ``p = x * scale_l + 0.5``; ``g = floor(p)`` (as uint32,
  so negatives wrap), ``w = p - g``;
* a corner ``c`` has the dense index ``sum_k c_k * res_l ** k`` while ``res_l ** d <= P_l``,
  otherwise the XOR-prime hash ``xor_k c_k * pi_k`` (uint32 arithmetic,
  pi = 1, 2654435761, 805459861); either is taken modulo ``P_l``;
* features are d-linearly interpolated over the 2^d corners, and the output is level-major
  (``[l0f0, l0f1, l1f0, ...]``).

The reference is a custom autograd function: forward and backward compute the gradients
with respect to the table (a scatter-add) and the input coordinates (the analytic derivative
of the d-linear weights) without building autograd graphs per corner. It is the CPU path and
the ground truth for the Triton kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import GridConfig

PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class LevelLayout:
    scale: float  # float32 value, as tcnn computes it
    resolution: int
    size: int  # entries in the level (P_l)
    offset: int  # first entry of the level in the concatenated table
    hashed: bool


def grid_layout(n_dims: int, cfg: GridConfig) -> list[LevelLayout]:
    """Per-level scale, resolution, size, offset and kind, computed as tiny-cuda-nn does."""
    log2_pls = np.float32(np.log2(np.float32(cfg.per_level_scale)))
    hashmap = 1 << cfg.log2_hashmap_size
    levels, offset = [], 0
    for level in range(cfg.n_levels):
        scale = np.float32(np.exp2(np.float32(level) * log2_pls) * np.float32(cfg.base_resolution)
                           - np.float32(1.0))
        res = int(math.ceil(float(scale))) + 1
        dense = res ** n_dims
        size = min(dense, (1 << 31) - 1)
        size = (size + 7) // 8 * 8
        size = min(size, hashmap)
        levels.append(LevelLayout(float(scale), res, size, offset, size < dense))
        offset += size
    return levels


def n_params(n_dims: int, cfg: GridConfig) -> int:
    layout = grid_layout(n_dims, cfg)
    return (layout[-1].offset + layout[-1].size) * cfg.n_features_per_level


class _Layout:
    """Tensors describing a layout on one device."""

    def __init__(self, n_dims: int, cfg: GridConfig, device: torch.device) -> None:
        layout = grid_layout(n_dims, cfg)
        self.n_dims = n_dims
        self.n_levels = len(layout)
        self.n_features = cfg.n_features_per_level
        self.n_corners = 1 << n_dims
        self.n_entries = layout[-1].offset + layout[-1].size
        # resolutions grow with the level, so dense levels come first, hashed ones after
        self.n_dense = sum(1 for lv in layout if not lv.hashed)
        assert all(lv.hashed for lv in layout[self.n_dense:])
        # a hashed level holds the whole table, a power of two: its modulo is a mask
        assert all(lv.size & (lv.size - 1) == 0 for lv in layout[self.n_dense:])
        self.scale = torch.tensor([lv.scale for lv in layout], dtype=torch.float32, device=device)
        self.scale64 = self.scale.to(torch.float64)
        self.size = torch.tensor([lv.size for lv in layout], dtype=torch.int64, device=device)
        self.offset = torch.tensor([lv.offset for lv in layout], dtype=torch.int64, device=device)
        # dense strides res^k of the dense levels, (Ld, d)
        self.stride = torch.tensor([[lv.resolution ** k for k in range(n_dims)]
                                    for lv in layout[:self.n_dense]], dtype=torch.int64, device=device)
        self.primes = torch.tensor(PRIMES[:n_dims], dtype=torch.int64, device=device)


def _outer(parts: list[torch.Tensor], op) -> torch.Tensor:
    """Combine per-dimension (B, L, 2) tensors over all 2^d corners -> (B, L, 2^d).

    Corner c uses entry ((c >> k) & 1) of dimension k (dimension 0 is the lowest bit).
    """
    out = parts[0]
    for k in range(1, len(parts)):
        out = op(parts[k][..., :, None], out[..., None, :]).flatten(-2)
    return out


def _corner_rows(x: torch.Tensor, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows (B, L, C) of every corner and the fractional positions (B, L, d)."""
    # tcnn computes fmaf(scale, x, 0.5) in float32: one rounding. The product of two float32
    # values is exact in float64, so rounding the float64 result once reproduces it.
    pos = (x.to(torch.float64)[:, None, :] * lay.scale64[None, :, None] + 0.5).to(torch.float32)
    cell = torch.floor(pos)
    frac = pos - cell
    g = cell.to(torch.int64)  # (B, L, d); corner k-th coordinate is g_k + bit_k
    nd = lay.n_dense
    parts = []
    if nd:
        # dense: sum_k (g_k + b_k) * res^k with uint32 wraparound, then mod P_l
        gs = g[:, :nd] * lay.stride
        per_dim = [torch.stack((gs[..., k], gs[..., k] + lay.stride[:, k]), -1) for k in range(lay.n_dims)]
        dense = (_outer(per_dim, torch.add) & _U32) % lay.size[:nd, None]
        parts.append(dense)
    if nd < lay.n_levels:
        # hashed: xor_k ((g_k + b_k) * pi_k) in uint32 arithmetic, then mod P_l
        gh = g[:, nd:]
        per_dim = [torch.stack(((gh[..., k] * lay.primes[k]) & _U32, ((gh[..., k] + 1) * lay.primes[k]) & _U32), -1)
                   for k in range(lay.n_dims)]
        hashed = _outer(per_dim, torch.bitwise_xor) & (lay.size[nd:, None] - 1)  # hashed sizes are 2^k
        parts.append(hashed)
    idx = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return idx + lay.offset[None, :, None], frac


def _weight_factors(frac: torch.Tensor, lay: _Layout) -> list[torch.Tensor]:
    """Per-dimension linear weights (B, L, 2): (1 - frac_k, frac_k)."""
    return [torch.stack((1.0 - frac[..., k], frac[..., k]), -1) for k in range(lay.n_dims)]


def _corner_weights(frac: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """d-linear weights (B, L, C): prod_k (frac_k if corner bit else 1 - frac_k)."""
    return _outer(_weight_factors(frac, lay), torch.mul)


#: one element of a native type for a table row of n_features values (bytes -> dtype)
_ROW_TYPES = {4: torch.float32, 8: torch.float64, 16: torch.complex128}


def _gather(table: torch.Tensor, rows: torch.Tensor, n_features: int) -> torch.Tensor:
    """``table.view(-1, F)[rows]`` (shape ``rows.shape + (F,)``), bit for bit.

    Where a row's F values fill one element of a native type (2 float32 features: 8 bytes), the
    table is gathered as a 1-D tensor of those: one index per row instead of two-dimensional
    advanced indexing, about 3x faster on a CPU (the CPU step's largest kernel)."""
    wide = _ROW_TYPES.get(n_features * table.element_size())
    if (n_features > 1 and wide is not None and table.is_contiguous()
            and table.storage_offset() * table.element_size() % (n_features * table.element_size()) == 0):
        return table.view(wide)[rows].view(table.dtype).view(*rows.shape, n_features)
    return table.view(-1, n_features)[rows]


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, lay: _Layout) -> torch.Tensor:  # type: ignore[override]
        rows, frac = _corner_rows(x, lay)
        w = _corner_weights(frac, lay)
        feats = _gather(table, rows, lay.n_features)  # (B, L, C, F)
        out = torch.einsum("blc,blcf->blf", w, feats)
        ctx.save_for_backward(x, table, rows, frac)
        ctx.lay = lay
        return out.reshape(x.shape[0], lay.n_levels * lay.n_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, table, rows, frac = ctx.saved_tensors
        lay: _Layout = ctx.lay
        B = x.shape[0]
        g = grad_out.reshape(B, lay.n_levels, lay.n_features).to(torch.float32)
        grad_x = grad_table = None
        if ctx.needs_input_grad[1]:
            w = _corner_weights(frac, lay)
            contrib = (w[..., None] * g[:, :, None, :]).reshape(-1, lay.n_features)
            grad_table = torch.zeros(lay.n_entries, lay.n_features, dtype=table.dtype, device=table.device)
            grad_table.index_add_(0, rows.reshape(-1), contrib.to(table.dtype))
            grad_table = grad_table.view(-1)
        if ctx.needs_input_grad[0]:
            feats = _gather(table, rows, lay.n_features).to(torch.float32)  # (B, L, C, F)
            gf = torch.einsum("blcf,blf->blc", feats, g)  # dL/d(weight of corner c)
            grad_x = _frac_gradient(gf, _weight_factors(frac, lay), lay).to(x.dtype)
        return grad_x, grad_table, None


def _frac_gradient(gf: torch.Tensor, factors: list[torch.Tensor], lay: _Layout) -> torch.Tensor:
    """dL/dx (B, d) from dL/d(corner weight) ``gf`` (B, L, C) and the per-dimension factors.

    The weight of corner c is prod_j f_j(bit_j(c)) with f_j = (1 - frac_j, frac_j), so its
    derivative along frac_k swaps f_k for (-1, +1): dL/dfrac_k is the difference of ``gf``'s two
    halves along bit k, contracted with the other dimensions' factors. Corner bits as axes (the
    last axis is bit 0) make both a slice and a small product."""
    B, L, d = gf.shape[0], gf.shape[1], lay.n_dims
    cube = gf.reshape(B, L, *([2] * d))
    cols = []
    for k in range(d):
        axis = 2 + (d - 1 - k)
        t = cube.select(axis, 1) - cube.select(axis, 0)  # (B, L, 2, ...) over the other bits
        for j in range(d):  # contract the remaining bits from the lowest (the last axis) up
            if j != k:
                t = (t * factors[j].view(B, L, *([1] * (t.dim() - 3)), 2)).sum(-1)
        cols.append((t * lay.scale).sum(-1))
    return torch.stack(cols, dim=-1)


class TorchHashGrid(nn.Module):
    """Hash-grid encoding in plain PyTorch; inputs in [0, 1]^d, output (B, n_levels * F)."""

    backend = "torch"

    def __init__(self, n_dims: int, cfg: GridConfig, seed: int | None = None) -> None:
        super().__init__()
        self.n_dims = n_dims
        self.cfg = cfg
        self.n_output_dims = cfg.n_levels * cfg.n_features_per_level
        gen = torch.Generator().manual_seed(1337 if seed is None else seed)
        init = torch.rand(n_params(n_dims, cfg), generator=gen) * 2e-4 - 1e-4  # tcnn: U[-1e-4, 1e-4]
        self.params = nn.Parameter(init)
        self._lay: _Layout | None = None

    def layout(self) -> _Layout:
        if self._lay is None or self._lay.scale.device != self.params.device:
            self._lay = _Layout(self.n_dims, self.cfg, self.params.device)
        return self._lay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()
        return _HashGridFunction.apply(x, self.params, self.layout())


def hashgrid_forward_reference(x: torch.Tensor, table: torch.Tensor, n_dims: int, cfg: GridConfig) -> torch.Tensor:
    """Functional form of the reference forward (autograd through gather), for tests and kernels."""
    lay = _Layout(n_dims, cfg, x.device)
    rows, frac = _corner_rows(x.to(torch.float32), lay)
    w = _corner_weights(frac, lay).to(table.dtype)
    feats = table.view(-1, lay.n_features)[rows]
    return (w[..., None] * feats).sum(2).reshape(x.shape[0], -1)
