"""Triton kernels for the multiresolution hash-grid encoding (tiny-cuda-nn semantics).

Same function as :class:`backend.encodings.hashgrid.TorchHashGrid` (the ground truth; see its
docstring and method.md 1.3, 8.2): per level ``p = fmaf(x, scale_l, 0.5)`` in float32,
``g = floor(p)`` taken to uint32 (negatives wrap), ``w = p - g``; the 2^d corners get the dense
index ``sum_k c_k res_l^k`` (uint32 wraparound) on the dense levels and the XOR-prime hash on
the hashed ones, both modulo the level size; features are d-linearly interpolated and written
level-major, ``(B, L * F)``.

Kernels (the defaults were the fastest measured on an H100; docs/kernels.md):

* forward: one program per (block of points, level) with the level as the *slow* program
  index, so the whole GPU works on one level's table at a time (it stays in L1); the output
  goes to a level-major scratch ``(L, B, F)`` that is transposed to ``(B, L * F)`` after
  (tiny-cuda-nn / torch-ngp's order). Below 2^16 points a block of points loops over the
  levels instead ("points"). Dense levels come first, so ``n_dense`` is a compile-time
  constant and each level body has one index formula.
* backward: one kernel per block of points loops over the levels, recomputes positions and
  indices, scatters ``w * dL/dout`` into the table gradient with relaxed fp32 atomics
  (``atom.add.v2.f32``; the two corners of an x-pair that land in rows 2k, 2k+1 share one
  ``atom.add.v4.f32``), and, only when the input needs a gradient, gathers the same rows'
  features and accumulates ``dL/dx_k = sum_l scale_l sum_c <feat_c, dL/dout_l> dw_c/dfrac_k``
  in registers. From 2^16 points the small dense levels (<= 4096 entries) scatter into 32
  private copies summed afterwards (fewer same-address atomics).

Integer semantics: the cell is converted float -> int64 -> uint32 (truncation: the
reference's ``& 0xFFFFFFFF``), all index arithmetic is uint32 with wraparound. The dense
modulo is a conditional subtraction when every point of the block lies inside the grid
(corner coordinates <= res, so the index is below 2 P_l); otherwise a true ``%``.

Position: ``tl.fma`` (one rounding, what tcnn's ``fmaf`` does). The reference rounds the
exact float64 product-plus-half to float32; those agree except where the float64 sum is
itself rounded (``x * scale < 1/64``) *and* lands on a float32 rounding tie, a case too
rare to meet in practice. ``pos_f64=True`` selects the reference's float64 emulation
bit for bit (used under ``TRITON_INTERPRET=1``, whose ``fma`` rounds twice).

Importing this module without a usable triton raises ImportError (``make_grid`` then falls
back to the reference). On a non-CUDA device (and not under the interpreter) or with a
non-float32 table the module runs the PyTorch reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import nn

try:  # lazily and safely: any failure here means "no triton backend"
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"triton is not usable here: {exc}") from exc

from ..config import GridConfig
from .hashgrid import PRIMES, _HashGridFunction, grid_layout, n_params

__all__ = ["TritonHashGrid", "KernelOptions", "DEFAULT_OPTIONS", "hashgrid_triton", "with_options"]

_MAX_DIMS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------

@triton.jit
def _position(x, scale, POS_F64: tl.constexpr):
    """fmaf(x, scale, 0.5) -> (frac, cell as uint32)."""
    if POS_F64:
        p = (x.to(tl.float64) * scale.to(tl.float64) + 0.5).to(tl.float32)
    else:
        p = tl.fma(x, scale, 0.5)
    cell = tl.floor(p)
    frac = p - cell
    g = cell.to(tl.int64).to(tl.uint32)
    return frac, g


@triton.jit
def _corner(c: tl.constexpr, D: tl.constexpr, HASHED: tl.constexpr, size, need_mod,
            w0, w1, w2, w3, a00, a01, a10, a11, a20, a21, a30, a31):
    """Weight, d weight / d frac_k (k < D) and index (mod the level size) of corner c.

    Corner bit k selects dimension k's (1 - frac, index term for c_k = g_k) or
    (frac, term for c_k = g_k + 1). Products run over k = 0, 1, ... as in the reference,
    and d/dfrac_k is the product over j != k signed by bit k (the reference's slope)."""
    if c & 1:
        f0 = w0
        idx = a01
        d0 = tl.full(w0.shape, 1.0, tl.float32)
    else:
        f0 = 1.0 - w0
        idx = a00
        d0 = tl.full(w0.shape, -1.0, tl.float32)
    wt = f0
    d1 = d0
    d2 = d0
    d3 = d0
    if D > 1:
        if (c >> 1) & 1:
            f1 = w1
            t1 = a11
            d1 = f0
        else:
            f1 = 1.0 - w1
            t1 = a10
            d1 = -f0
        if HASHED:
            idx = idx ^ t1
        else:
            idx = idx + t1
        d0 = d0 * f1
        wt = wt * f1
    if D > 2:
        if (c >> 2) & 1:
            f2 = w2
            t2 = a21
            d2 = wt
        else:
            f2 = 1.0 - w2
            t2 = a20
            d2 = -wt
        if HASHED:
            idx = idx ^ t2
        else:
            idx = idx + t2
        d0 = d0 * f2
        d1 = d1 * f2
        wt = wt * f2
    if D > 3:
        if (c >> 3) & 1:
            f3 = w3
            t3 = a31
            d3 = wt
        else:
            f3 = 1.0 - w3
            t3 = a30
            d3 = -wt
        if HASHED:
            idx = idx ^ t3
        else:
            idx = idx + t3
        d0 = d0 * f3
        d1 = d1 * f3
        d2 = d2 * f3
        wt = wt * f3
    # modulo the level size (uint32); hashed sizes are powers of two
    if HASHED:
        idx = idx & (size - 1)
    else:
        if need_mod:
            idx = idx % size
        else:  # every point of the block inside the grid: idx < 2 * size
            idx = tl.where(idx < size, idx, idx - size)
    return wt, d0, d1, d2, d3, idx


@triton.jit
def _level_setup(x0, x1, x2, x3, l, scale_ptr, res_ptr, size_ptr, offset_ptr,
                 D: tl.constexpr, HASHED: tl.constexpr, POS_F64: tl.constexpr):
    """Per-level fractions and per-dimension index terms (c_k = 0 and 1)."""
    scale = tl.load(scale_ptr + l)
    size = tl.load(size_ptr + l).to(tl.uint32)
    off = tl.load(offset_ptr + l)
    res = tl.load(res_ptr + l).to(tl.uint32)
    w0, g0 = _position(x0, scale, POS_F64)
    w1 = w0
    w2 = w0
    w3 = w0
    g1 = g0
    g2 = g0
    g3 = g0
    if D > 1:
        w1, g1 = _position(x1, scale, POS_F64)
    if D > 2:
        w2, g2 = _position(x2, scale, POS_F64)
    if D > 3:
        w3, g3 = _position(x3, scale, POS_F64)
    # per-dimension multipliers: dense strides res^k, or the hash primes
    if HASHED:
        s1 = tl.full([], 2654435761, tl.uint32)
        s2 = tl.full([], 805459861, tl.uint32)
        s3 = tl.full([], 3674653429, tl.uint32)
        need_mod = False
    else:
        s1 = res
        s2 = res * res
        s3 = s2 * res
        inside = g0 < res
        if D > 1:
            inside = inside & (g1 < res)
        if D > 2:
            inside = inside & (g2 < res)
        if D > 3:
            inside = inside & (g3 < res)
        need_mod = tl.max(tl.where(inside, 0, 1), axis=0) > 0
    a00 = g0
    a01 = g0 + 1
    a10 = a00
    a11 = a01
    a20 = a00
    a21 = a01
    a30 = a00
    a31 = a01
    if D > 1:
        a10 = g1 * s1
        a11 = a10 + s1
    if D > 2:
        a20 = g2 * s2
        a21 = a20 + s2
    if D > 3:
        a30 = g3 * s3
        a31 = a30 + s3
    return scale, size, off, need_mod, w0, w1, w2, w3, a00, a01, a10, a11, a20, a21, a30, a31


@triton.jit
def _fwd_level(x0, x1, x2, x3, l, table_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
               BLOCK: tl.constexpr, D: tl.constexpr, F: tl.constexpr, HASHED: tl.constexpr,
               POS_F64: tl.constexpr):
    scale, size, off, need_mod, w0, w1, w2, w3, a00, a01, a10, a11, a20, a21, a30, a31 = _level_setup(
        x0, x1, x2, x3, l, scale_ptr, res_ptr, size_ptr, offset_ptr, D, HASHED, POS_F64)
    fo = tl.arange(0, F)
    acc = tl.zeros([BLOCK, F], dtype=tl.float32)
    for c in tl.static_range(1 << D):
        wt, d0, d1, d2, d3, idx = _corner(c, D, HASHED, size, need_mod, w0, w1, w2, w3,
                                          a00, a01, a10, a11, a20, a21, a30, a31)
        row = idx.to(tl.int32) + off
        feat = tl.load(table_ptr + (row[:, None] * F + fo[None, :]))
        acc += wt[:, None] * feat
    return acc


@triton.jit
def _store_level(out_ptr, acc, offs, m2, l, B, L: tl.constexpr, F: tl.constexpr,
                 OUT_LM: tl.constexpr):
    fo = tl.arange(0, F)
    o64 = offs.to(tl.int64)
    if OUT_LM:  # (L, B, F) scratch
        ptrs = out_ptr + (l * F) * B.to(tl.int64) + (o64[:, None] * F + fo[None, :])
    else:  # (B, L * F)
        ptrs = out_ptr + (o64[:, None] * (L * F) + (l * F + fo[None, :]))
    tl.store(ptrs, acc, mask=m2)


@triton.jit
def _load_points(x_ptr, offs, pmask, D: tl.constexpr):
    x0 = tl.load(x_ptr + offs * D, mask=pmask, other=0.0)
    x1 = x0
    x2 = x0
    x3 = x0
    if D > 1:
        x1 = tl.load(x_ptr + offs * D + 1, mask=pmask, other=0.0)
    if D > 2:
        x2 = tl.load(x_ptr + offs * D + 2, mask=pmask, other=0.0)
    if D > 3:
        x3 = tl.load(x_ptr + offs * D + 3, mask=pmask, other=0.0)
    return x0, x1, x2, x3


@triton.jit
def _fwd_range(x0, x1, x2, x3, offs, m2, B, table_ptr, out_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
               LO: tl.constexpr, HI: tl.constexpr, UNROLL: tl.constexpr, HASHED: tl.constexpr,
               BLOCK: tl.constexpr, D: tl.constexpr, F: tl.constexpr, L: tl.constexpr,
               OUT_LM: tl.constexpr, POS_F64: tl.constexpr):
    """Levels LO..HI-1 of one block of points (all of one kind)."""
    if UNROLL:
        for l in tl.static_range(LO, HI):
            acc = _fwd_level(x0, x1, x2, x3, l, table_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                             BLOCK, D, F, HASHED, POS_F64)
            _store_level(out_ptr, acc, offs, m2, l, B, L, F, OUT_LM)
    else:
        for l in range(LO, HI):
            acc = _fwd_level(x0, x1, x2, x3, l, table_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                             BLOCK, D, F, HASHED, POS_F64)
            _store_level(out_ptr, acc, offs, m2, l, B, L, F, OUT_LM)


@triton.jit(do_not_specialize=["B", "n_blocks"])
def _hashgrid_fwd_kernel(x_ptr, table_ptr, out_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                         B, n_blocks,
                         D: tl.constexpr, F: tl.constexpr, L: tl.constexpr, N_DENSE: tl.constexpr,
                         BLOCK: tl.constexpr, MODE: tl.constexpr, OUT_LM: tl.constexpr,
                         UNROLL: tl.constexpr, POS_F64: tl.constexpr):
    # MODE 0: program = block of points, loop over levels
    # MODE 1: program = (block, level), level fastest; MODE 2: level slowest
    pid = tl.program_id(0)
    if MODE == 0:
        blk = pid
        lvl = 0
    elif MODE == 1:
        blk = pid // L
        lvl = pid % L
    else:
        blk = pid % n_blocks
        lvl = pid // n_blocks
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    pmask = offs < B
    fo = tl.arange(0, F)
    m2 = pmask[:, None] & (fo[None, :] < F)
    x0, x1, x2, x3 = _load_points(x_ptr, offs, pmask, D)
    if MODE == 0:
        _fwd_range(x0, x1, x2, x3, offs, m2, B, table_ptr, out_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                   0, N_DENSE, UNROLL, False, BLOCK, D, F, L, OUT_LM, POS_F64)
        _fwd_range(x0, x1, x2, x3, offs, m2, B, table_ptr, out_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                   N_DENSE, L, UNROLL, True, BLOCK, D, F, L, OUT_LM, POS_F64)
    else:
        if lvl < N_DENSE:
            acc = _fwd_level(x0, x1, x2, x3, lvl, table_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                             BLOCK, D, F, False, POS_F64)
        else:
            acc = _fwd_level(x0, x1, x2, x3, lvl, table_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                             BLOCK, D, F, True, POS_F64)
        _store_level(out_ptr, acc, offs, m2, lvl, B, L, F, OUT_LM)


@triton.jit
def _bwd_level(x0, x1, x2, x3, l, table_ptr, gtab_ptr, gout_ptr, offs, m2, B,
               scale_ptr, res_ptr, size_ptr, offset_ptr,
               BLOCK: tl.constexpr, D: tl.constexpr, F: tl.constexpr, L: tl.constexpr,
               HASHED: tl.constexpr, TABLE_GRAD: tl.constexpr, INPUT_GRAD: tl.constexpr,
               PAIR: tl.constexpr, POS_F64: tl.constexpr):
    scale, size, off, need_mod, w0, w1, w2, w3, a00, a01, a10, a11, a20, a21, a30, a31 = _level_setup(
        x0, x1, x2, x3, l, scale_ptr, res_ptr, size_ptr, offset_ptr, D, HASHED, POS_F64)
    fo = tl.arange(0, F)
    grow = gout_ptr + (offs.to(tl.int64)[:, None] * (L * F) + l * F)
    go = tl.load(grow + fo[None, :], mask=m2, other=0.0)
    pmask = offs < B
    if PAIR:
        # the two corners of an x-pair (bits 0 = 0, 1) land in one aligned 2F-float span when
        # the first row is even and the second follows it (prime 1 on dimension 0, and
        # dense stride 1): one 16-byte atomic for both then (F = 2)
        jo = tl.arange(0, 2 * F)
        go2 = tl.load(grow + (jo[None, :] % F), mask=pmask[:, None] & (jo[None, :] < 2 * F), other=0.0)
    s0 = tl.zeros([BLOCK], dtype=tl.float32)
    s1 = s0
    s2 = s0
    s3 = s0
    for p in tl.static_range(1 << (D - 1)):
        wa, da0, da1, da2, da3, ia = _corner(2 * p, D, HASHED, size, need_mod, w0, w1, w2, w3,
                                             a00, a01, a10, a11, a20, a21, a30, a31)
        wb, db0, db1, db2, db3, ib = _corner(2 * p + 1, D, HASHED, size, need_mod, w0, w1, w2, w3,
                                             a00, a01, a10, a11, a20, a21, a30, a31)
        ra = ia.to(tl.int32) + off
        rb = ib.to(tl.int32) + off
        ea = ra[:, None] * F + fo[None, :]
        eb = rb[:, None] * F + fo[None, :]
        if TABLE_GRAD:
            if PAIR:
                merged = ((ra & 1) == 0) & (rb == ra + 1)
                span = (ra >> 1) * (2 * F)
                vals = tl.where(jo[None, :] < F, wa[:, None], wb[:, None]) * go2
                tl.atomic_add(gtab_ptr + (span[:, None] + jo[None, :]), vals,
                              mask=(pmask & merged)[:, None] & (jo[None, :] < 2 * F), sem="relaxed")
                single = (pmask & (merged == 0))[:, None] & (fo[None, :] < F)
                tl.atomic_add(gtab_ptr + ea, wa[:, None] * go, mask=single, sem="relaxed")
                tl.atomic_add(gtab_ptr + eb, wb[:, None] * go, mask=single, sem="relaxed")
            else:
                tl.atomic_add(gtab_ptr + ea, wa[:, None] * go, mask=m2, sem="relaxed")
                tl.atomic_add(gtab_ptr + eb, wb[:, None] * go, mask=m2, sem="relaxed")
        if INPUT_GRAD:
            fa = tl.sum(tl.load(table_ptr + ea) * go, axis=1)
            fb = tl.sum(tl.load(table_ptr + eb) * go, axis=1)
            s0 += fa * da0
            s0 += fb * db0
            if D > 1:
                s1 += fa * da1
                s1 += fb * db1
            if D > 2:
                s2 += fa * da2
                s2 += fb * db2
            if D > 3:
                s3 += fa * da3
                s3 += fb * db3
    return s0 * scale, s1 * scale, s2 * scale, s3 * scale


@triton.jit
def _bwd_range(g0, g1, g2, g3, x0, x1, x2, x3, offs, m2, B, table_ptr, gtab_ptr, gout_ptr,
               scale_ptr, res_ptr, size_ptr, offset_ptr,
               LO: tl.constexpr, HI: tl.constexpr, UNROLL: tl.constexpr, HASHED: tl.constexpr,
               BLOCK: tl.constexpr, D: tl.constexpr, F: tl.constexpr, L: tl.constexpr,
               TABLE_GRAD: tl.constexpr, INPUT_GRAD: tl.constexpr, PAIR: tl.constexpr,
               POS_F64: tl.constexpr):
    """Levels LO..HI-1 of one block of points; returns the running input gradient."""
    if UNROLL:
        for l in tl.static_range(LO, HI):
            t0, t1, t2, t3 = _bwd_level(x0, x1, x2, x3, l, table_ptr, gtab_ptr, gout_ptr, offs, m2, B,
                                        scale_ptr, res_ptr, size_ptr, offset_ptr,
                                        BLOCK, D, F, L, HASHED, TABLE_GRAD, INPUT_GRAD, PAIR, POS_F64)
            g0 += t0
            g1 += t1
            g2 += t2
            g3 += t3
    else:
        for l in range(LO, HI):
            t0, t1, t2, t3 = _bwd_level(x0, x1, x2, x3, l, table_ptr, gtab_ptr, gout_ptr, offs, m2, B,
                                        scale_ptr, res_ptr, size_ptr, offset_ptr,
                                        BLOCK, D, F, L, HASHED, TABLE_GRAD, INPUT_GRAD, PAIR, POS_F64)
            g0 += t0
            g1 += t1
            g2 += t2
            g3 += t3
    return g0, g1, g2, g3


@triton.jit(do_not_specialize=["B", "n_blocks"])
def _hashgrid_bwd_kernel(x_ptr, table_ptr, gtab_ptr, gpriv_ptr, gout_ptr, gx_ptr,
                         scale_ptr, res_ptr, size_ptr, offset_ptr, B, n_blocks,
                         D: tl.constexpr, F: tl.constexpr, L: tl.constexpr, N_DENSE: tl.constexpr,
                         N_PRIV: tl.constexpr, E_PRIV: tl.constexpr, REPLICAS: tl.constexpr,
                         BLOCK: tl.constexpr, MODE: tl.constexpr, UNROLL: tl.constexpr,
                         TABLE_GRAD: tl.constexpr, INPUT_GRAD: tl.constexpr, PAIR: tl.constexpr,
                         POS_F64: tl.constexpr):
    # MODE 0: program = block of points, loop over levels, dx accumulated in registers;
    #         the first N_PRIV (small, dense) levels scatter into one of REPLICAS private
    #         copies of their E_PRIV table rows (fewer same-address atomics), summed after.
    # MODE 2: program = (block, level), level slowest; dx per level into a (L, B, D) scratch
    pid = tl.program_id(0)
    if MODE == 0:
        blk = pid
        lvl = 0
    else:
        blk = pid % n_blocks
        lvl = pid // n_blocks
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    pmask = offs < B
    fo = tl.arange(0, F)
    m2 = pmask[:, None] & (fo[None, :] < F)
    x0, x1, x2, x3 = _load_points(x_ptr, offs, pmask, D)
    if MODE == 0:
        g0 = tl.zeros([BLOCK], dtype=tl.float32)
        g1 = g0
        g2 = g0
        g3 = g0
        if N_PRIV > 0:
            priv = gpriv_ptr + (pid % REPLICAS) * (E_PRIV * F)
            g0, g1, g2, g3 = _bwd_range(g0, g1, g2, g3, x0, x1, x2, x3, offs, m2, B, table_ptr, priv, gout_ptr,
                                        scale_ptr, res_ptr, size_ptr, offset_ptr, 0, N_PRIV, UNROLL, False,
                                        BLOCK, D, F, L, TABLE_GRAD, INPUT_GRAD, PAIR, POS_F64)
        g0, g1, g2, g3 = _bwd_range(g0, g1, g2, g3, x0, x1, x2, x3, offs, m2, B, table_ptr, gtab_ptr, gout_ptr,
                                    scale_ptr, res_ptr, size_ptr, offset_ptr, N_PRIV, N_DENSE, UNROLL, False,
                                    BLOCK, D, F, L, TABLE_GRAD, INPUT_GRAD, PAIR, POS_F64)
        g0, g1, g2, g3 = _bwd_range(g0, g1, g2, g3, x0, x1, x2, x3, offs, m2, B, table_ptr, gtab_ptr, gout_ptr,
                                    scale_ptr, res_ptr, size_ptr, offset_ptr, N_DENSE, L, UNROLL, True,
                                    BLOCK, D, F, L, TABLE_GRAD, INPUT_GRAD, PAIR, POS_F64)
        if INPUT_GRAD:
            tl.store(gx_ptr + offs * D, g0, mask=pmask)
            if D > 1:
                tl.store(gx_ptr + offs * D + 1, g1, mask=pmask)
            if D > 2:
                tl.store(gx_ptr + offs * D + 2, g2, mask=pmask)
            if D > 3:
                tl.store(gx_ptr + offs * D + 3, g3, mask=pmask)
    else:
        if lvl < N_DENSE:
            t0, t1, t2, t3 = _bwd_level(x0, x1, x2, x3, lvl, table_ptr, gtab_ptr, gout_ptr, offs, m2, B,
                                        scale_ptr, res_ptr, size_ptr, offset_ptr,
                                        BLOCK, D, F, L, False, TABLE_GRAD, INPUT_GRAD, PAIR, POS_F64)
        else:
            t0, t1, t2, t3 = _bwd_level(x0, x1, x2, x3, lvl, table_ptr, gtab_ptr, gout_ptr, offs, m2, B,
                                        scale_ptr, res_ptr, size_ptr, offset_ptr,
                                        BLOCK, D, F, L, True, TABLE_GRAD, INPUT_GRAD, PAIR, POS_F64)
        if INPUT_GRAD:
            base = gx_ptr + lvl.to(tl.int64) * B * D
            tl.store(base + offs * D, t0, mask=pmask)
            if D > 1:
                tl.store(base + offs * D + 1, t1, mask=pmask)
            if D > 2:
                tl.store(base + offs * D + 2, t2, mask=pmask)
            if D > 3:
                tl.store(base + offs * D + 3, t3, mask=pmask)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelOptions:
    """Launch choices; the defaults are the fastest measured (docs/kernels.md)."""

    fwd_mode: str = "auto"  # "points" (loop over levels) | "level-fast" | "level-slow" | "level-slow-direct" | "auto"
    fwd_block: int = 512
    fwd_warps: int = 4
    fwd_unroll: bool = False
    bwd_mode: str = "points"  # "points" | "level-slow"
    bwd_block: int = 128
    bwd_warps: int = 4
    bwd_unroll: bool = False
    bwd_pair: bool = True  # one 2F-wide atomic for an x-pair of corners in adjacent rows
    bwd_replicas: int = 32  # >0: private gradient copies for the small dense levels ("points" mode)
    bwd_priv_max: int = 4096  # ... those with at most this many entries
    pos_f64: bool | None = None  # None: float64 emulation only under the interpreter


DEFAULT_OPTIONS = KernelOptions()
_FWD_MODES = {"points": 0, "level-fast": 1, "level-slow": 2, "level-slow-direct": 3}
AUTO_MIN_POINTS = 1 << 16  # "auto" and the gradient replicas: level-major / replicas from here on
_BWD_MODES = {"points": 0, "level-slow": 2}


class _Plan:
    """Per-level constants on one device plus the compile-time shape of the kernels."""

    def __init__(self, n_dims: int, cfg: GridConfig, device: torch.device) -> None:
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"TritonHashGrid supports 1..{_MAX_DIMS} input dims, got {n_dims}")
        F = cfg.n_features_per_level
        if F < 1 or F & (F - 1):
            raise ValueError(f"n_features_per_level must be a power of two, got {F}")
        layout = grid_layout(n_dims, cfg)
        self.n_dims, self.F, self.L = n_dims, F, len(layout)
        self.n_dense = sum(1 for lv in layout if not lv.hashed)
        assert all(lv.hashed for lv in layout[self.n_dense:])
        assert all(lv.size == 1 << cfg.log2_hashmap_size for lv in layout[self.n_dense:])
        self.n_entries = layout[-1].offset + layout[-1].size
        if self.n_entries * F >= 2 ** 31 or any(lv.size >= 2 ** 31 for lv in layout):
            raise ValueError("hash grid too large for 32-bit table offsets")
        self.level_offsets = [lv.offset for lv in layout] + [self.n_entries]
        self.level_sizes = [lv.size for lv in layout]
        self.device = device
        self.scale = torch.tensor([lv.scale for lv in layout], dtype=torch.float32, device=device)
        # res only matters on dense levels (res^d <= P < 2^31); clamp the others into int32
        self.res = torch.tensor([min(lv.resolution, 2 ** 31 - 1) for lv in layout], dtype=torch.int32,
                                device=device)
        self.size = torch.tensor([lv.size for lv in layout], dtype=torch.int32, device=device)
        self.offset = torch.tensor([lv.offset for lv in layout], dtype=torch.int32, device=device)

    def n_private(self, max_entries: int) -> int:
        """Leading dense levels of at most max_entries entries."""
        return _n_private_levels(self, max_entries)


_LAST_KERNELS: dict = {}  # the last compiled kernels launched (for resource reports)


def _n_private_levels(plan: "_Plan", max_entries: int) -> int:
    n = 0
    while n < plan.n_dense and plan.level_sizes[n] <= max_entries:
        n += 1
    return n


def _empty(shape, device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device)


def _pos_f64(opts: KernelOptions) -> bool:
    return _interpreting() if opts.pos_f64 is None else bool(opts.pos_f64)


def _forward(x: torch.Tensor, table: torch.Tensor, plan: _Plan, opts: KernelOptions) -> torch.Tensor:
    B = x.shape[0]
    L, F, D = plan.L, plan.F, plan.n_dims
    name = opts.fwd_mode
    if name == "auto":
        name = "level-slow" if B >= AUTO_MIN_POINTS else "points"
    mode = _FWD_MODES[name]
    out_lm = mode == 2
    mode = min(mode, 2)  # level-slow-direct: level-slow order, (B, L * F) output
    out = _empty((L, B, F) if out_lm else (B, L * F), x.device)
    if B == 0:
        return out.view(B, L * F) if not out_lm else out.permute(1, 0, 2).reshape(B, L * F)
    n_blocks = triton.cdiv(B, opts.fwd_block)
    grid = (n_blocks * (L if mode else 1),)
    _LAST_KERNELS["fwd"] = _hashgrid_fwd_kernel[grid](
        x, table, out, plan.scale, plan.res, plan.size, plan.offset, B, n_blocks,
        D=D, F=F, L=L, N_DENSE=plan.n_dense, BLOCK=opts.fwd_block, MODE=mode, OUT_LM=out_lm,
        UNROLL=opts.fwd_unroll, POS_F64=_pos_f64(opts), num_warps=opts.fwd_warps)
    if out_lm:
        out = out.permute(1, 0, 2).reshape(B, L * F)
    return out


def _backward(x: torch.Tensor, table: torch.Tensor, grad_out: torch.Tensor, plan: _Plan,
              opts: KernelOptions, need_x: bool, need_table: bool):
    B = x.shape[0]
    L, F, D = plan.L, plan.F, plan.n_dims
    grad_table = torch.zeros_like(table) if need_table else None
    mode = _BWD_MODES[opts.bwd_mode]
    if need_x:
        grad_x = _empty((L, B, D) if mode else (B, D), x.device)
    else:
        grad_x = None
    if B > 0 and (need_x or need_table):
        n_blocks = triton.cdiv(B, opts.bwd_block)
        grid = (n_blocks * (L if mode else 1),)
        use_priv = need_table and mode == 0 and opts.bwd_replicas > 0 and B >= AUTO_MIN_POINTS
        n_priv = plan.n_private(opts.bwd_priv_max) if use_priv else 0
        e_priv = plan.level_offsets[n_priv]
        gpriv = torch.zeros(opts.bwd_replicas, e_priv * F, dtype=torch.float32, device=x.device) if n_priv else table
        _LAST_KERNELS["bwd"] = _hashgrid_bwd_kernel[grid](
            x, table, grad_table if need_table else table, gpriv, grad_out, grad_x if need_x else x,
            plan.scale, plan.res, plan.size, plan.offset, B, n_blocks,
            D=D, F=F, L=L, N_DENSE=plan.n_dense, N_PRIV=n_priv, E_PRIV=e_priv,
            REPLICAS=max(1, opts.bwd_replicas), BLOCK=opts.bwd_block, MODE=mode,
            UNROLL=opts.bwd_unroll, TABLE_GRAD=need_table, INPUT_GRAD=need_x, PAIR=opts.bwd_pair,
            POS_F64=_pos_f64(opts), num_warps=opts.bwd_warps)
        if n_priv:
            grad_table[:e_priv * F] += gpriv.sum(0)
    if need_x and mode:
        grad_x = grad_x.sum(0)
    return grad_x, grad_table


class _TritonHashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, plan: _Plan, opts: KernelOptions):  # type: ignore[override]
        out = _forward(x, table, plan, opts)
        ctx.save_for_backward(x, table)
        ctx.plan, ctx.opts = plan, opts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, table = ctx.saved_tensors
        grad_out = grad_out.to(torch.float32).contiguous()
        grad_x, grad_table = _backward(x, table, grad_out, ctx.plan, ctx.opts,
                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_x, grad_table, None, None


def _kernels_usable(device: torch.device) -> bool:
    return device.type == "cuda" or _interpreting()


class TritonHashGrid(nn.Module):
    """Hash-grid encoding through Triton kernels; same interface, layout and init as TorchHashGrid."""

    backend = "triton"

    def __init__(self, n_dims: int, cfg: GridConfig, seed: int | None = None, *,
                 options: KernelOptions | None = None) -> None:
        super().__init__()
        self.n_dims = n_dims
        self.cfg = cfg
        self.n_output_dims = cfg.n_levels * cfg.n_features_per_level
        self.options = options or DEFAULT_OPTIONS
        gen = torch.Generator().manual_seed(1337 if seed is None else seed)
        init = torch.rand(n_params(n_dims, cfg), generator=gen) * 2e-4 - 1e-4  # tcnn: U[-1e-4, 1e-4]
        self.params = nn.Parameter(init)
        self._plan: _Plan | None = None
        self._ref = None  # reference layout for the fallback path
        _Plan(n_dims, cfg, torch.device("cpu"))  # validate the configuration now

    def plan(self) -> _Plan:
        if self._plan is None or self._plan.device != self.params.device:
            self._plan = _Plan(self.n_dims, self.cfg, self.params.device)
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()
        if x.dim() != 2 or x.shape[1] != self.n_dims:
            raise ValueError(f"expected input of shape (B, {self.n_dims}), got {tuple(x.shape)}")
        if not _kernels_usable(x.device) or self.params.dtype != torch.float32:
            from .hashgrid import _Layout
            if self._ref is None or self._ref.scale.device != self.params.device:
                self._ref = _Layout(self.n_dims, self.cfg, self.params.device)
            return _HashGridFunction.apply(x, self.params, self._ref)
        return _TritonHashGridFunction.apply(x, self.params, self.plan(), self.options)


def hashgrid_triton(x: torch.Tensor, table: torch.Tensor, n_dims: int, cfg: GridConfig,
                    options: KernelOptions | None = None) -> torch.Tensor:
    """Functional form (for benchmarks): encodes x (B, n_dims) with the flat table."""
    plan = _Plan(n_dims, cfg, table.device)
    return _TritonHashGridFunction.apply(x.to(torch.float32).contiguous(), table, plan,
                                         options or DEFAULT_OPTIONS)


def with_options(**kw) -> KernelOptions:
    return replace(DEFAULT_OPTIONS, **kw)


assert PRIMES[1:4] == (2654435761, 805459861, 3674653429)  # the constants in _level_setup
