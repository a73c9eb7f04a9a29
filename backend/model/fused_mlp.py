"""Fully fused Triton kernels for the small Linear-ReLU MLPs (the 64-wide texture, residual and
alpha networks; tiny-cuda-nn's "fully fused MLP" idea, written in Triton).

Network: ``y = W_o relu(... relu(W_1 relu(W_0 x + b_0) + b_1) ...) + b_o`` with ``n_mid``
hidden-to-hidden layers (``layers - 2``; 0, 1 or 2, i.e. 2-4 Linear layers), width a power of
two from 16 to 64, input and output at most 64 wide. The output activation (tanh, softplus)
stays outside, in PyTorch: the same expression as the reference on (B, 3) values.

* forward: one program per block of points; every activation lives in registers, only
  ``y`` is written.
* backward: persistent programs (a few per SM) loop over blocks of points, recompute the
  forward in registers (a dot product per layer; cheaper than storing and re-reading the
  activations), then run the chain rule backwards: ``dW_l += d_l^T h_{l-1}`` and
  ``db_l += sum d_l`` accumulate in registers across the program's blocks, the ReLU masks
  are ``h > 0`` of the recomputed activations, and ``dL/dx = d_0 W_0`` is written only when
  the input needs it (the hash grid behind the network does). Each program writes one
  partial weight gradient; the partials are summed by PyTorch (deterministic, no atomics).

Matrix products are ``tl.dot`` in TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set
(what the PyTorch path does then: the ``fast`` preset) and in IEEE fp32 otherwise, fp32
accumulation either way. TF32 operands are rounded to the nearest TF32 value first
(``KernelOptions.tf32_mode = "tf32rn"``, :func:`_rna`), as cuBLAS does: the tensor cores
truncate an fp32 operand, a bias that made the unrounded kernels ~1.6x further from float64
than PyTorch's TF32 path and cost 2 dB at 1080p (docs/benchmarks.md, "Run fused-6").
Numerics against the PyTorch reference: tests/engine/test_fused_mlp.py.

Wider networks (the 4 x 256 mapping) do not fit a program's registers: :func:`chain_mlp` keeps
cuBLAS for the matrix products and fuses everything around them. Forward: each hidden layer is
one ``_addmm_activation`` (cuBLASLt's bias + ReLU epilogue: no separate bias or ReLU pass); the
hidden activations are kept for the backward. Backward: one Triton kernel per hidden layer
reads the incoming gradient and the activation once, writes ``d = g * (h > 0)`` and that block's
bias-gradient column sums (the ReLU backward and the bias reduction in one pass); for the last
hidden layer the incoming gradient ``g = dL/dy W_o`` (2 outputs) is formed in the same kernel
from ``dL/dy``, so the (B, 256) ``g`` is never written. Weight and input gradients are cuBLAS
products of ``d``.

Importing this module without a usable triton raises ImportError.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except Exception as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"triton is not usable here: {exc}") from exc

__all__ = ["fused_mlp", "chain_mlp", "supports", "MAX_WIDTH", "interpreting", "KernelOptions", "set_options",
           "FALLBACK"]

MAX_WIDTH = 64  # registers: a block's activations and the program's weight gradients
MAX_MID = 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def supports(in_dim: int, width: int, out_dim: int, n_mid: int) -> bool:
    """Whether the fused kernels take this shape (otherwise the caller uses another backend)."""
    return (16 <= width <= MAX_WIDTH and width & (width - 1) == 0 and 1 <= in_dim <= 64
            and 1 <= out_dim <= 64 and 0 <= n_mid <= MAX_MID)


@triton.jit
def _rna(x):
    """fp32 -> the nearest TF32 value (ties away from zero, as cuBLAS's cvt.rna): the tensor cores
    read a TF32 operand's top 19 bits, so an unrounded fp32 operand is truncated, a bias that
    accumulates over K (tf32_mode "tf32rn")."""
    i = x.to(tl.uint32, bitcast=True)
    return ((i + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, RN: tl.constexpr):
    if RN:
        a = _rna(a)
        b = _rna(b)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _linear(h, W, Bv, cin, cout, K: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr, RN: tl.constexpr):
    """h (BLOCK, KP) @ W^T + b for a torch weight W (N, K): the transposed tile is loaded masked."""
    wt = tl.load(W + cout[None, :] * K + cin[:, None], mask=(cin[:, None] < K) & (cout[None, :] < N), other=0.0)
    b = tl.load(Bv + cout, mask=cout < N, other=0.0)
    return _dot(h, wt, None, PREC, RN) + b[None, :]


@triton.jit
def _weight(W, rows, cols, R: tl.constexpr, C: tl.constexpr):
    """A torch weight (R, C) as an (RP, CP) tile, zero-padded."""
    return tl.load(W + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0)


@triton.jit
def _mlp_fwd_kernel(X, W0, B0, WM, BMID, WO, BO, Y, n, sx,
                    K0: tl.constexpr, K0P: tl.constexpr, WID: tl.constexpr, NO: tl.constexpr,
                    NOP: tl.constexpr, NMID: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
                    RN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    ck = tl.arange(0, K0P)
    cw = tl.arange(0, WID)
    co = tl.arange(0, NOP)
    x = tl.load(X + rows[:, None].to(tl.int64) * sx + ck[None, :], mask=rmask[:, None] & (ck[None, :] < K0), other=0.0)
    h = tl.maximum(_linear(x, W0, B0, ck, cw, K0, WID, PREC, RN), 0.0)
    for l in tl.static_range(NMID):
        h = tl.maximum(_linear(h, WM + l * WID * WID, BMID + l * WID, cw, cw, WID, WID, PREC, RN), 0.0)
    y = _linear(h, WO, BO, cw, co, WID, NO, PREC, RN)
    tl.store(Y + rows[:, None].to(tl.int64) * NO + co[None, :], y, mask=rmask[:, None] & (co[None, :] < NO))


@triton.jit
def _mlp_bwd_kernel(X, W0, B0, WM, BMID, WO, BO, GY, GX, n, sx, n_blocks,
                    PW0, PB0, PWM, PBM, PWO, PBO,
                    K0: tl.constexpr, K0P: tl.constexpr, WID: tl.constexpr, NO: tl.constexpr,
                    NOP: tl.constexpr, NMID: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
                    RN: tl.constexpr, NEED_DX: tl.constexpr, HOIST: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ck = tl.arange(0, K0P)
    cw = tl.arange(0, WID)
    co = tl.arange(0, NOP)
    if HOIST:
        # the weights once per program (registers / shared memory), not once per block of points:
        # nothing of them is re-loaded or multi-buffered by the loop's software pipelining
        w0 = _weight(W0, cw, ck, WID, K0)
        b0 = tl.load(B0 + cw)
        if NMID >= 1:
            wm0 = _weight(WM, cw, cw, WID, WID)
            bm0 = tl.load(BMID + cw)
        if NMID >= 2:
            wm1 = _weight(WM + WID * WID, cw, cw, WID, WID)
            bm1 = tl.load(BMID + WID + cw)
        wo = _weight(WO, co, cw, NO, WID)
    acc_w0 = tl.zeros((WID, K0P), tl.float32)
    acc_b0 = tl.zeros((WID,), tl.float32)
    acc_w1 = tl.zeros((WID, WID), tl.float32)
    acc_b1 = tl.zeros((WID,), tl.float32)
    acc_w2 = tl.zeros((WID, WID), tl.float32)
    acc_b2 = tl.zeros((WID,), tl.float32)
    acc_wo = tl.zeros((NOP, WID), tl.float32)
    acc_bo = tl.zeros((NOP,), tl.float32)
    for blk in range(pid, n_blocks, nprog):
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * sx + ck[None, :], mask=rmask[:, None] & (ck[None, :] < K0), other=0.0)
        # forward, recomputed in registers
        if HOIST:
            h0 = tl.maximum(_dot(x, tl.trans(w0), None, PREC, RN) + b0[None, :], 0.0)
        else:
            h0 = tl.maximum(_linear(x, W0, B0, ck, cw, K0, WID, PREC, RN), 0.0)
        hl = h0
        if NMID >= 1:
            if HOIST:
                h1 = tl.maximum(_dot(h0, tl.trans(wm0), None, PREC, RN) + bm0[None, :], 0.0)
            else:
                h1 = tl.maximum(_linear(h0, WM, BMID, cw, cw, WID, WID, PREC, RN), 0.0)
            hl = h1
        if NMID >= 2:
            if HOIST:
                h2 = tl.maximum(_dot(h1, tl.trans(wm1), None, PREC, RN) + bm1[None, :], 0.0)
            else:
                h2 = tl.maximum(_linear(h1, WM + WID * WID, BMID + WID, cw, cw, WID, WID, PREC, RN), 0.0)
            hl = h2
        # backward
        g = tl.load(GY + r64 * NO + co[None, :], mask=rmask[:, None] & (co[None, :] < NO), other=0.0)
        acc_wo = _dot(tl.trans(g), hl, acc_wo, PREC, RN)
        acc_bo += tl.sum(g, axis=0)
        if HOIST:
            d = _dot(g, wo, None, PREC, RN)
        else:
            d = _dot(g, _weight(WO, co, cw, NO, WID), None, PREC, RN)
        d = tl.where(hl > 0.0, d, 0.0)
        if NMID >= 2:
            acc_w2 = _dot(tl.trans(d), h1, acc_w2, PREC, RN)
            acc_b2 += tl.sum(d, axis=0)
            if HOIST:
                d = _dot(d, wm1, None, PREC, RN)
            else:
                d = _dot(d, _weight(WM + WID * WID, cw, cw, WID, WID), None, PREC, RN)
            d = tl.where(h1 > 0.0, d, 0.0)
        if NMID >= 1:
            acc_w1 = _dot(tl.trans(d), h0, acc_w1, PREC, RN)
            acc_b1 += tl.sum(d, axis=0)
            if HOIST:
                d = _dot(d, wm0, None, PREC, RN)
            else:
                d = _dot(d, _weight(WM, cw, cw, WID, WID), None, PREC, RN)
            d = tl.where(h0 > 0.0, d, 0.0)
        acc_w0 = _dot(tl.trans(d), x, acc_w0, PREC, RN)
        acc_b0 += tl.sum(d, axis=0)
        if NEED_DX:
            if HOIST:
                dx = _dot(d, w0, None, PREC, RN)
            else:
                dx = _dot(d, _weight(W0, cw, ck, WID, K0), None, PREC, RN)
            tl.store(GX + r64 * K0 + ck[None, :], dx, mask=rmask[:, None] & (ck[None, :] < K0))
    # this program's partial gradients
    p64 = pid.to(tl.int64)
    tl.store(PW0 + p64 * WID * K0 + cw[:, None] * K0 + ck[None, :], acc_w0, mask=ck[None, :] < K0)
    tl.store(PB0 + p64 * WID + cw, acc_b0)
    if NMID >= 1:
        tl.store(PWM + p64 * NMID * WID * WID + cw[:, None] * WID + cw[None, :], acc_w1)
        tl.store(PBM + p64 * NMID * WID + cw, acc_b1)
    if NMID >= 2:
        tl.store(PWM + p64 * NMID * WID * WID + WID * WID + cw[:, None] * WID + cw[None, :], acc_w2)
        tl.store(PBM + p64 * NMID * WID + WID + cw, acc_b2)
    tl.store(PWO + p64 * NO * WID + co[:, None] * WID + cw[None, :], acc_wo, mask=co[:, None] < NO)
    tl.store(PBO + p64 * NO + co, acc_bo, mask=co < NO)


# ------------------------------------------------------------------------------ launch
@dataclass(frozen=True)
class KernelOptions:
    """Launch shapes (scripts/bench/mlp_kernels.py --sweep measures alternatives).

    Shared memory of the backward for the 32 -> 64 x 4 -> 3 network, compiled for sm_90 with
    Triton 3.6 (scripts/bench/kernel_facts.py; Hopper allows 227 KB = 232,448 B per block): block
    64, default 3-stage pipelining 323,584 B (what failed on the H200); block 32 default stages
    208,896; block 32 one stage 36,864; block 16 one stage 30,720; weights hoisted 104-152 KB.
    The 3-stage loop multi-buffers the per-block loads of the weight tiles (~90 KB a stage)."""

    fwd_block: int = 128
    fwd_warps: int = 4
    fwd_stages: int = 0  # 0: Triton's default
    bwd_block: int = 16  # 255 registers and no spills at 16 (32: 1 KB of spills per thread)
    bwd_warps: int = 4
    bwd_programs_per_sm: int = 4  # large: one block per program (no persistent loop)
    bwd_stages: int = 1  # no software pipelining: 30 KB of shared memory instead of 200-320 KB
    bwd_hoist: bool = False  # weights loaded once per program instead of once per block
    # the products' precision where TF32 is allowed (torch.backends.cuda.matmul.allow_tf32):
    # "tf32rn" (each operand rounded to the nearest TF32 value first, as cuBLAS does: the
    # PyTorch TF32 path's accuracy against float64, 2.56e-2 worst where "tf32" gave 4.22e-2, for
    # 3-4 % of these kernels' time; docs/benchmarks.md, "Run fused-6"), "tf32" (the operands
    # truncated by the tensor cores) or "tf32x3" (three TF32 products per product: near fp32's
    # accuracy). Without TF32 the products are IEEE fp32 either way.
    tf32_mode: str = "tf32rn"


def _env_options() -> KernelOptions:
    """``NEURAL_ATLAS_FUSED_OPTIONS='{"bwd_block": 32, ...}'`` (benchmarks: a sweep's winner)."""
    raw = os.environ.get("NEURAL_ATLAS_FUSED_OPTIONS", "").strip()
    if not raw:
        return KernelOptions()
    import json
    return _checked(replace(KernelOptions(), **json.loads(raw)))


def _checked(o: KernelOptions) -> KernelOptions:
    if o.tf32_mode not in ("tf32", "tf32rn", "tf32x3"):
        raise ValueError(f"fused MLP option tf32_mode must be tf32, tf32rn or tf32x3, got {o.tf32_mode!r}")
    return o


# the last launch's compiled-kernel facts per direction (registers, spills, shared memory)
LAST_LAUNCH: dict[str, dict] = {}


OPTIONS = _env_options()

# Kernels that failed at their first launch in this process ("fused", "chain") -> the reason.
# Such a failure (no shared memory for the shape, a Triton/driver that cannot compile it) is
# logged once and that kind of network runs the PyTorch reference from then on (MLP.path);
# the call that failed is answered by the reference too, so a training run never stops on it.
FALLBACK: dict[str, str] = {}
_LAUNCHED: set = set()  # launch keys that have run once (a later error there is a real error)


def _fall_back(kind: str, key, exc: BaseException) -> None:
    if key in _LAUNCHED and not isinstance(exc, OutOfResources):
        raise exc
    if kind not in FALLBACK:
        FALLBACK[kind] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"[mlp] the Triton '{kind}' MLP kernels failed at launch ({FALLBACK[kind][:160]}); "
              "those networks use the PyTorch reference from now on", file=sys.stderr, flush=True)


def reset_fallback() -> None:
    """Forget earlier launch failures (tests, benchmarks that change launch shapes)."""
    FALLBACK.clear()
    _LAUNCHED.clear()


def _reference_linear(x, ws, bs):
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = torch.nn.functional.linear(h, w, b)
        if i < len(ws) - 1:
            h = torch.relu(h)
    return h


def _reference_grads(x, ws, bs, gy, need_dx: bool):
    """Gradients of the reference network at (x, ws, bs) for dL/dy = gy (the fallback's backward)."""
    with torch.enable_grad():
        xs = x.detach().requires_grad_(need_dx)
        wd = [w.detach().requires_grad_() for w in ws]
        bd = [b.detach().requires_grad_() for b in bs]
        y = _reference_linear(xs, wd, bd)
        got = torch.autograd.grad(y, ([xs] if need_dx else []) + wd + bd, gy)
    if need_dx:
        return got[0], list(got[1:])
    return None, list(got)


def set_options(**kw) -> KernelOptions:
    """Change the launch shapes process-wide (benchmarks); returns the previous options."""
    global OPTIONS
    old, OPTIONS = OPTIONS, _checked(replace(OPTIONS, **kw))
    return old


def launch_precision(mode: str) -> dict:
    """The kernels' PREC / RN constexprs for a precision (``_prec``): "tf32rn" is TF32 products
    of operands rounded in the kernel."""
    return {"PREC": "tf32" if mode == "tf32rn" else mode, "RN": mode == "tf32rn"}


def _prec() -> str:
    if not torch.backends.cuda.matmul.allow_tf32 or interpreting():
        return "ieee"
    return OPTIONS.tf32_mode


_SMS: dict[int, int] = {}


def _programs(device: torch.device, n_blocks: int) -> int:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SMS:
            _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return max(1, min(n_blocks, OPTIONS.bwd_programs_per_sm * _SMS[idx]))
    return max(1, min(n_blocks, 4))


def _meta(x, w0, wm, wo):
    n_mid = 0 if wm is None else wm.shape[0]
    k0, wid, no = w0.shape[1], w0.shape[0], wo.shape[0]
    return dict(K0=k0, K0P=_p2(k0), WID=wid, NO=no, NOP=_p2(no), NMID=n_mid, **launch_precision(_prec()))


def _forward(x, w0, b0, wm, bm, wo, bo):
    n = x.shape[0]
    meta = _meta(x, w0, wm, wo)
    y = torch.empty(n, meta["NO"], device=x.device, dtype=torch.float32)
    if n == 0:
        return y
    wm_ = wm if wm is not None else w0  # unused when NMID == 0
    bm_ = bm if bm is not None else b0
    o = OPTIONS
    grid = (triton.cdiv(n, o.fwd_block),)
    st = {"num_stages": o.fwd_stages} if o.fwd_stages else {}
    k = _mlp_fwd_kernel[grid](x, w0, b0, wm_, bm_, wo, bo, y, n, x.stride(0), BLOCK=o.fwd_block,
                              num_warps=o.fwd_warps, **st, **meta)
    _LAUNCHED.add(_key("fwd", meta, o))
    _record("fwd", k)
    return y


def _key(direction: str, meta: dict, o: KernelOptions, *extra):
    return (direction, tuple(sorted(meta.items())), o, *extra)


def _record(direction: str, k) -> None:
    try:
        LAST_LAUNCH[direction] = {"regs": int(k.n_regs), "spills": int(k.n_spills),
                                  "shared": int(k.metadata.shared)}
    except Exception:  # interpreter / other Triton versions: no handle facts
        pass


def _backward(x, w0, b0, wm, bm, wo, bo, gy, need_dx: bool):
    n = x.shape[0]
    meta = _meta(x, w0, wm, wo)
    k0, wid, no, n_mid = meta["K0"], meta["WID"], meta["NO"], meta["NMID"]
    dev = x.device
    o = OPTIONS
    n_blocks = triton.cdiv(n, o.bwd_block)
    P = _programs(dev, max(n_blocks, 1))
    f32 = dict(device=dev, dtype=torch.float32)
    new = torch.empty if n > 0 else torch.zeros  # every program writes all of its partials
    pw0, pb0 = new(P, wid, k0, **f32), new(P, wid, **f32)
    pwm, pbm = new(P, max(n_mid, 1), wid, wid, **f32), new(P, max(n_mid, 1), wid, **f32)
    pwo, pbo = new(P, no, wid, **f32), new(P, no, **f32)
    gx = torch.empty(n, k0, **f32) if need_dx else pb0
    if n > 0:
        wm_ = wm if wm is not None else w0
        bm_ = bm if bm is not None else b0
        st = {"num_stages": o.bwd_stages} if o.bwd_stages else {}
        try:
            k = _mlp_bwd_kernel[(P,)](x, w0, b0, wm_, bm_, wo, bo, gy, gx, n, x.stride(0), n_blocks,
                                      pw0, pb0, pwm, pbm, pwo, pbo, BLOCK=o.bwd_block, NEED_DX=need_dx, HOIST=o.bwd_hoist,
                                      num_warps=o.bwd_warps, **st, **meta)
        except OutOfResources:
            if o.bwd_block <= 16 and o.bwd_stages == 1:
                raise
            set_options(bwd_block=max(16, o.bwd_block // 2), bwd_stages=1)  # and keep it
            return _backward(x, w0, b0, wm, bm, wo, bo, gy, need_dx)
        _LAUNCHED.add(_key("bwd", meta, o, need_dx))
        _record("bwd", k)
    grads = [pw0.sum(0), pb0.sum(0), pwm.sum(0)[:n_mid] if n_mid else None,
             pbm.sum(0)[:n_mid] if n_mid else None, pwo.sum(0), pbo.sum(0)]
    return (gx if need_dx else None), grads


def _split(w0, b0, wm, bm, wo, bo):
    n_mid = 0 if wm is None else wm.shape[0]
    return ([w0, *[wm[i] for i in range(n_mid)], wo], [b0, *[bm[i] for i in range(n_mid)], bo])


class _FusedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, b0, wm, bm, wo, bo):  # type: ignore[override]
        ctx.save_for_backward(x, w0, b0, wm, bm, wo, bo)
        try:
            return _forward(x, w0, b0, wm, bm, wo, bo)
        except Exception as exc:
            _fall_back("fused", _key("fwd", _meta(x, w0, wm, wo), OPTIONS), exc)
            return _reference_linear(x, *_split(w0, b0, wm, bm, wo, bo))

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w0, b0, wm, bm, wo, bo = ctx.saved_tensors
        gy = gy.to(torch.float32).contiguous()
        need_dx = ctx.needs_input_grad[0]
        try:
            gx, (gw0, gb0, gwm, gbm, gwo, gbo) = _backward(x, w0, b0, wm, bm, wo, bo, gy, need_dx)
        except Exception as exc:
            _fall_back("fused", _key("bwd", _meta(x, w0, wm, wo), OPTIONS, need_dx), exc)
            ws, bs = _split(w0, b0, wm, bm, wo, bo)
            gx, g = _reference_grads(x, ws, bs, gy, need_dx)
            L = len(ws)
            gw, gb = g[:L], g[L:]
            mid = L > 2
            gw0, gb0, gwo, gbo = gw[0], gb[0], gw[-1], gb[-1]
            gwm = torch.stack(gw[1:-1]) if mid else None
            gbm = torch.stack(gb[1:-1]) if mid else None
        return gx, gw0, gb0, gwm, gbm, gwo, gbo


def fused_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """``x`` (B, in) through Linear layers ``weights[l]`` (out, in) / ``biases[l]`` with ReLU between
    (none after the last), as one fused forward kernel and one fused backward kernel."""
    if len(weights) < 2 or len(weights) != len(biases):
        raise ValueError("fused_mlp needs at least two Linear layers, one bias each")
    x = x.to(torch.float32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w0, b0, wo, bo = weights[0], biases[0], weights[-1], biases[-1]
    if len(weights) > 2:
        wm = torch.stack(weights[1:-1])
        bm = torch.stack(biases[1:-1])
    else:
        wm = bm = None
    if not supports(w0.shape[1], w0.shape[0], wo.shape[0], len(weights) - 2):
        raise ValueError(f"fused_mlp does not take in={w0.shape[1]} width={w0.shape[0]} "
                         f"out={wo.shape[0]} layers={len(weights)}")
    return _FusedMLPFunction.apply(x, w0.contiguous(), b0.contiguous(), wm, bm,
                                   wo.contiguous(), bo.contiguous())


# ------------------------------------------------------------------- wide networks (chain)
@triton.jit
def _relu_bwd_kernel(G, GY, WO, H, D, PB, n, rows_per_prog,
                     WID: tl.constexpr, NO: tl.constexpr, FROM_HEAD: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """d = g * (h > 0) over a (rows_per_prog, BLOCK_C) slab; column sums of d to PB[pid_r].
    FROM_HEAD: g = GY (n, NO) @ WO (NO, WID), formed here (NO small)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < WID
    acc = tl.zeros((BLOCK_C,), tl.float32)
    r0 = pid_r * rows_per_prog
    for start in range(r0, r0 + rows_per_prog, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = (rows < n) & (rows < r0 + rows_per_prog)
        r64 = rows[:, None].to(tl.int64)
        m2 = rmask[:, None] & cmask[None, :]
        h = tl.load(H + r64 * WID + cols[None, :], mask=m2, other=0.0)
        if FROM_HEAD:
            g = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
            for j in tl.static_range(NO):
                gy = tl.load(GY + rows.to(tl.int64) * NO + j, mask=rmask, other=0.0)
                w = tl.load(WO + j * WID + cols, mask=cmask, other=0.0)
                g += gy[:, None] * w[None, :]
        else:
            g = tl.load(G + r64 * WID + cols[None, :], mask=m2, other=0.0)
        d = tl.where(h > 0.0, g, 0.0)
        tl.store(D + r64 * WID + cols[None, :], d, mask=m2)
        acc += tl.sum(d, axis=0)
    tl.store(PB + pid_r.to(tl.int64) * WID + cols, acc, mask=cmask)


_CHAIN_BLOCK_R = 32
_CHAIN_BLOCK_C = 128


def _relu_bwd(h: torch.Tensor, g: torch.Tensor | None = None, gy: torch.Tensor | None = None,
              wo: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, column sums of d) for d = g * (h > 0); g given, or formed as gy @ wo."""
    n, wid = h.shape
    d = torch.empty_like(h)
    bc = min(_CHAIN_BLOCK_C, _p2(wid))
    n_col = triton.cdiv(wid, bc)
    if h.device.type == "cuda":
        idx = h.device.index if h.device.index is not None else torch.cuda.current_device()
        if idx not in _SMS:
            _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = 8 * _SMS[idx] // n_col
    else:
        target = 4
    rows_per = max(_CHAIN_BLOCK_R, triton.cdiv(triton.cdiv(max(n, 1), max(target, 1)), _CHAIN_BLOCK_R) * _CHAIN_BLOCK_R)
    n_row = triton.cdiv(max(n, 1), rows_per)
    pb = torch.empty(n_row, wid, device=h.device, dtype=torch.float32)
    head = g is None
    no = wo.shape[0] if head else 1
    _relu_bwd_kernel[(n_row, n_col)](g if not head else h, gy if head else h, wo if head else h, h, d, pb,
                                     n, rows_per, WID=wid, NO=no, FROM_HEAD=head,
                                     BLOCK_R=_CHAIN_BLOCK_R, BLOCK_C=bc, num_warps=4)
    return d, pb.sum(0)


class _ChainMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *params):  # type: ignore[override]
        ws, bs = params[0::2], params[1::2]
        hs = []
        h = x
        for w, b in zip(ws[:-1], bs[:-1]):
            h = torch._addmm_activation(b, h, w.t())
            hs.append(h)
        y = torch.addmm(bs[-1], h, ws[-1].t())
        ctx.save_for_backward(x, *hs, *ws)
        ctx.biases = [b.detach() for b in bs]  # only the fallback's reference backward reads them
        ctx.n_hidden = len(hs)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        try:
            return _ChainMLPFunction._backward(ctx, gy)
        except Exception as exc:
            _fall_back("chain", ("chain", ctx.n_hidden), exc)
            saved = ctx.saved_tensors
            L = ctx.n_hidden
            x, ws = saved[0], saved[1 + L:]
            need_dx = ctx.needs_input_grad[0]
            gx, g = _reference_grads(x, list(ws), list(ctx.biases), gy.to(torch.float32), need_dx)
            n = L + 1
            return (gx, *[t for pair in zip(g[:n], g[n:]) for t in pair])

    @staticmethod
    def _backward(ctx, gy):
        saved = ctx.saved_tensors
        L = ctx.n_hidden
        x, hs, ws = saved[0], saved[1:1 + L], saved[1 + L:]
        gy = gy.to(torch.float32).contiguous()
        grads: list = [None] * (2 * (L + 1))
        grads[2 * L] = gy.t() @ hs[-1]
        grads[2 * L + 1] = gy.sum(0)
        d, db = _relu_bwd(hs[-1], gy=gy, wo=ws[-1].contiguous())
        gx = None
        for l in range(L - 1, -1, -1):
            inp = hs[l - 1] if l > 0 else x
            grads[2 * l] = d.t() @ inp
            grads[2 * l + 1] = db
            if l > 0:
                d, db = _relu_bwd(hs[l - 1], g=d @ ws[l])
            elif ctx.needs_input_grad[0]:
                gx = d @ ws[0]
        _LAUNCHED.add(("chain", L))
        return (gx, *grads)


def chain_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """Same function as :func:`fused_mlp` for any width: cuBLAS products with the bias/ReLU work
    fused around them (module docstring)."""
    if len(weights) < 2 or len(weights) != len(biases):
        raise ValueError("chain_mlp needs at least two Linear layers, one bias each")
    if weights[-1].shape[0] > 16:
        raise ValueError("chain_mlp forms the last layer's gradient in-kernel: at most 16 outputs")
    x = x.to(torch.float32).contiguous()
    params = [t for w, b in zip(weights, biases) for t in (w, b)]
    return _ChainMLPFunction.apply(x, *params)
