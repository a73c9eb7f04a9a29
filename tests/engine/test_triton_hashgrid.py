"""Triton hash-grid kernels against the PyTorch reference (values, table and input gradients).

On CUDA the compiled kernels run at several sizes. Without CUDA the same checks run through
Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton is first imported) at
small sizes; without triton the module is skipped. Every check draws fresh random inputs
(the seed is in the failure message) with some points outside [0, 1] (uint32 wraparound).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and importlib.util.find_spec("triton") is not None and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

try:
    from backend.encodings import triton_hashgrid as th
except ImportError as exc:  # no triton on this machine
    pytest.skip(f"triton is not importable ({exc}); the Triton hash grid is untested here",
                allow_module_level=True)

from backend.config import GridConfig
from backend.encodings import TorchHashGrid, make_grid

INTERP = th._interpreting()
if not CUDA and not INTERP:
    pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET could be set",
                allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")
DEFAULT = GridConfig()
SMALL = GridConfig(n_levels=6, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4,
                   per_level_scale=1.7)
F4 = GridConfig(n_levels=5, n_features_per_level=4, log2_hashmap_size=9, base_resolution=3,
                per_level_scale=2.0)
TINY = GridConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=7, base_resolution=2,
                  per_level_scale=2.5)
F1 = GridConfig(n_levels=7, n_features_per_level=1, log2_hashmap_size=10, base_resolution=8,
                per_level_scale=1.5)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _inputs(B: int, D: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.rand(B, D, generator=gen)
    n_out = max(1, B // 10)
    x[:n_out] = x[:n_out] * 3.0 - 1.0  # outside [0, 1]: wraps in uint32
    if B >= 8:
        x[n_out:n_out + 4] = torch.tensor([-7.3e4, 6.1e4, -1.0e3, 123.45])[:, None].expand(4, D)
    return x[torch.randperm(B, generator=gen)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _maxrel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _compare(D: int, cfg: GridConfig, B: int, options=None, need_x=True, need_table=True):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    ref = TorchHashGrid(D, cfg).to(DEVICE)
    tri = th.TritonHashGrid(D, cfg, options=options).to(DEVICE)
    with torch.no_grad():
        ref.params.copy_(torch.randn(ref.params.shape, generator=gen).to(DEVICE))
        tri.params.copy_(ref.params)
    ref.params.requires_grad_(need_table)
    tri.params.requires_grad_(need_table)
    x = _inputs(B, D, gen).to(DEVICE)
    up = torch.randn(B, cfg.n_levels * cfg.n_features_per_level, generator=gen).to(DEVICE)
    x1 = x.clone().requires_grad_(need_x)
    x2 = x.clone().requires_grad_(need_x)
    o1, o2 = ref(x1), tri(x2)
    msg = f"D={D} B={B} cfg={cfg} options={options} seed={seed}"
    assert o2.shape == o1.shape and o2.dtype == torch.float32, msg
    assert torch.isfinite(o2).all(), msg
    errs = {"out": _maxrel(o2, o1)}
    if need_x or need_table:
        (o1 * up).sum().backward()
        (o2 * up).sum().backward()
    if need_x:
        errs["dx"] = _rel(x2.grad, x1.grad)
        errs["dx_max"] = _maxrel(x2.grad, x1.grad)
    else:
        assert x2.grad is None
    if need_table:
        errs["dtable"] = _rel(tri.params.grad, ref.params.grad)
        errs["dtable_max"] = _maxrel(tri.params.grad, ref.params.grad)
        assert torch.equal(tri.params.grad != 0, ref.params.grad != 0) or errs["dtable_max"] < 1e-5, msg
    else:
        assert tri.params.grad is None
    # float32 rounding, different summation order (atomics, corner order)
    assert errs["out"] < 2e-6, (errs, msg)
    if need_x:
        assert errs["dx"] < 1e-5 and errs["dx_max"] < 1e-4, (errs, msg)
    if need_table:
        assert errs["dtable"] < 1e-5 and errs["dtable_max"] < 1e-4, (errs, msg)
    print(msg, {k: f"{v:.2e}" for k, v in errs.items()})
    return errs


if CUDA:
    CASES = [(D, cfg, B) for D in (2, 3) for cfg in (SMALL, DEFAULT) for B in (1, 1000, 65_537)]
    CASES += [(2, DEFAULT, 1 << 20), (3, DEFAULT, 1 << 20)]
    CASES += [(1, F1, 4099), (4, F4, 4099), (3, F4, 70_000), (2, F1, 70_000), (4, DEFAULT, 3000)]
else:  # interpreter: slow, keep it small
    CASES = [(2, SMALL, 300), (3, SMALL, 200), (2, DEFAULT, 100), (1, F1, 64), (4, TINY, 40)]


@pytest.mark.parametrize("D,cfg,B", CASES)
def test_matches_reference(D, cfg, B):
    _compare(D, cfg, B)


@pytest.mark.parametrize("need_x,need_table", [(True, False), (False, True), (False, False)])
def test_gradient_subsets(need_x, need_table):
    _compare(3 if CUDA else 2, SMALL, 2000 if CUDA else 100, need_x=need_x, need_table=need_table)


VARIANTS = [
    dict(fwd_mode="level-fast"), dict(fwd_mode="level-slow", bwd_mode="level-slow"),
    dict(fwd_mode="level-slow-direct", bwd_pair=True),
    dict(fwd_mode="points", bwd_pair=True, bwd_replicas=8, bwd_priv_max=1024),
    dict(fwd_unroll=True, bwd_unroll=True),
    dict(fwd_mode="points", fwd_block=64, bwd_block=128, fwd_warps=2),
    dict(fwd_mode="level-slow", fwd_block=512, bwd_block=512, fwd_warps=8, bwd_warps=8),
]


@pytest.mark.parametrize("variant", VARIANTS if CUDA else VARIANTS[:5])
def test_kernel_variants(variant):
    opts = th.with_options(**variant)
    if CUDA and "fwd_unroll" not in variant:  # unrolled 16-level kernels take long to compile
        B = 1 << 16  # above AUTO_MIN_POINTS: the gradient replicas are used
        _compare(3, DEFAULT, B + 1, options=opts)
        _compare(2, DEFAULT, B + 3, options=opts)
    elif CUDA:
        _compare(3, SMALL, 50_001, options=opts)
    else:
        th.AUTO_MIN_POINTS = 0  # exercise the replicas at interpreter sizes
        try:
            _compare(2, SMALL, 150, options=opts)
        finally:
            th.AUTO_MIN_POINTS = 1 << 16


@pytest.mark.parametrize("mode", ["points", "level-slow"])
def test_poisoned_outputs_are_fully_written(monkeypatch, mode):
    """Every output and input-gradient element is written (buffers start as NaN)."""
    def poisoned(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(th, "_empty", poisoned)
    opts = th.with_options(fwd_mode=mode, bwd_mode=mode)
    B = 12_345 if CUDA else 77
    errs = _compare(3 if CUDA else 2, DEFAULT if CUDA else SMALL, B, options=opts)
    assert all(v == v for v in errs.values())  # no NaN anywhere


@pytest.mark.skipif(not CUDA, reason="the fma position path is the compiled one")
def test_fma_position_matches_float64_emulation():
    """tl.fma (tcnn's fmaf) and the reference's float64-then-round agree bit for bit."""
    gen = torch.Generator().manual_seed(_seed())
    for D in (2, 3):
        grid_fma = th.TritonHashGrid(D, DEFAULT, options=th.with_options(pos_f64=False)).to(DEVICE)
        grid_f64 = th.TritonHashGrid(D, DEFAULT, options=th.with_options(pos_f64=True)).to(DEVICE)
        with torch.no_grad():
            grid_fma.params.normal_()
            grid_f64.params.copy_(grid_fma.params)
        x = torch.rand(1 << 20, D, generator=gen)
        x[: 1 << 18] *= 1e-3  # x * scale < 1/64: where the float64 sum itself rounds
        x = x.to(DEVICE)
        with torch.no_grad():
            diff = (grid_fma(x) != grid_f64(x)).sum().item()
        assert diff == 0, f"{diff} outputs differ between fmaf and float64 emulation"


def test_state_dict_and_init_match_reference():
    for D in (2, 3):
        a, b = TorchHashGrid(D, DEFAULT), th.TritonHashGrid(D, DEFAULT)
        assert torch.equal(a.params, b.params)
        assert a.n_output_dims == b.n_output_dims == 32 and b.backend == "triton"
        b.load_state_dict(a.state_dict())
        assert list(b.state_dict()) == ["params"]


@pytest.mark.skipif(not CUDA, reason="make_grid picks triton on CUDA only")
def test_make_grid_selects_triton_on_cuda():
    grid = make_grid(3, DEFAULT, device="cuda")
    assert grid.backend == "triton" and grid.params.is_cuda
    x = torch.rand(100, 3, device="cuda")
    assert grid(x).shape == (100, 32)


def test_empty_batch_and_noncontiguous_grad():
    grid = th.TritonHashGrid(2, TINY).to(DEVICE)
    assert grid(torch.rand(0, 2, device=DEVICE)).shape == (0, 12)
    x = torch.rand(50, 2, device=DEVICE, requires_grad=True)
    out = grid(x)
    big = torch.randn(50, 24, device=DEVICE)
    out.backward(big[:, ::2])  # a non-contiguous upstream gradient
    ref = TorchHashGrid(2, TINY).to(DEVICE)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).backward(big[:, ::2])
    assert _rel(x.grad, x2.grad) < 1e-5
