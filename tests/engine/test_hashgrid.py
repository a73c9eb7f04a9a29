"""The PyTorch hash grid against tiny-cuda-nn's layout table and a brute-force float64 reference."""

import math

import numpy as np
import pytest
import torch

from backend.config import GridConfig
from backend.encodings import TorchHashGrid, grid_layout, n_params
from backend.encodings.hashgrid import PRIMES

# method.md section 1.3: (resolution, 2D entries, 3D entries) per level
TABLE_13 = [
    (16, 256, 4096), (20, 400, 8000), (25, 632, 15632), (32, 1024, 32768), (40, 1600, 32768),
    (49, 2408, 32768), (62, 3848, 32768), (77, 5936, 32768), (96, 9216, 32768), (120, 14400, 32768),
    (150, 22504, 32768), (187, 32768, 32768), (233, 32768, 32768), (292, 32768, 32768),
    (364, 32768, 32768), (455, 32768, 32768),
]


def test_layout_matches_method_table():
    cfg = GridConfig()
    l2, l3 = grid_layout(2, cfg), grid_layout(3, cfg)
    assert [(a.resolution, a.size, b.size) for a, b in zip(l2, l3)] == TABLE_13
    assert [lv.hashed for lv in l2] == [False] * 11 + [True] * 5
    assert [lv.hashed for lv in l3] == [False] * 4 + [True] * 12  # 32^3 == T stays dense
    assert n_params(2, cfg) == 452_128 and n_params(3, cfg) == 907_424
    assert [round(lv.scale, 2) for lv in l2[:4]] == [15.0, 19.0, 24.0, 30.25]


def _brute_force(x: np.ndarray, table: np.ndarray, n_dims: int, cfg: GridConfig,
                 fp32_position: bool = True) -> np.ndarray:
    """Straight from the definition, float64, python integers with explicit uint32 wrap.

    With ``fp32_position`` the grid position is rounded to float32 once, as tiny-cuda-nn's
    fmaf does; without it everything is float64 (smooth in x, for finite differences).
    """
    layout = grid_layout(n_dims, cfg)
    F = cfg.n_features_per_level
    tab = table.reshape(-1, F).astype(np.float64)
    out = np.zeros((x.shape[0], len(layout) * F))
    for b in range(x.shape[0]):
        for li, lv in enumerate(layout):
            # fmaf(scale, x, 0.5) in float32, as tiny-cuda-nn computes the position
            pos = [float(x[b, k]) * lv.scale + 0.5 for k in range(n_dims)]
            if fp32_position:
                pos = [float(np.float32(p)) for p in pos]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell)]
            for corner in range(1 << n_dims):
                bits = [(corner >> k) & 1 for k in range(n_dims)]
                g = [(cell[k] + bits[k]) & 0xFFFFFFFF for k in range(n_dims)]
                if lv.hashed:
                    h = 0
                    for k in range(n_dims):
                        h ^= (g[k] * PRIMES[k]) & 0xFFFFFFFF
                    idx = h % lv.size
                else:
                    idx = (sum(g[k] * lv.resolution ** k for k in range(n_dims)) & 0xFFFFFFFF) % lv.size
                w = 1.0
                for k in range(n_dims):
                    w *= frac[k] if bits[k] else 1.0 - frac[k]
                out[b, li * F:(li + 1) * F] += w * tab[lv.offset + idx]
    return out


SMALL = GridConfig(n_levels=6, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4,
                   per_level_scale=1.7)


@pytest.mark.parametrize("n_dims,cfg", [(2, SMALL), (3, SMALL), (2, GridConfig()), (3, GridConfig())])
def test_forward_matches_brute_force(n_dims, cfg):
    gen = torch.Generator().manual_seed(7 + n_dims)
    grid = TorchHashGrid(n_dims, cfg)
    with torch.no_grad():
        grid.params.copy_(torch.randn(grid.params.shape, generator=gen))
    # inside [0,1], plus points outside it (flow targets off-frame reach the grid: uint32 wrap)
    x = torch.rand(24, n_dims, generator=gen)
    x[:4] = x[:4] * 1.4 - 0.2
    out = grid(x).detach().double().numpy()
    ref = _brute_force(x.double().numpy(), grid.params.detach().numpy(), n_dims, cfg)
    assert out.shape == (24, cfg.n_levels * cfg.n_features_per_level)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_dims", [2, 3])
def test_gradients_match_brute_force(n_dims):
    cfg = SMALL
    gen = torch.Generator().manual_seed(3 + n_dims)
    grid = TorchHashGrid(n_dims, cfg)
    with torch.no_grad():
        grid.params.copy_(torch.randn(grid.params.shape, generator=gen))
    x = (torch.rand(10, n_dims, generator=gen) * 0.9 + 0.05).requires_grad_(True)
    upstream = torch.randn(10, cfg.n_levels * cfg.n_features_per_level, generator=gen)
    (grid(x) * upstream).sum().backward()

    xs = x.detach().double().numpy()
    tab = grid.params.detach().double().numpy()
    up = upstream.double().numpy()

    def objective(xv, tv):
        return float((_brute_force(xv, tv, n_dims, cfg, fp32_position=False) * up).sum())

    # d/d table: the objective is linear in the table, so unit perturbations are exact
    g_tab = np.zeros_like(tab)
    used = np.nonzero(grid.params.grad.numpy())[0]
    for i in np.concatenate([used[:40], [0, len(tab) - 1]]):
        e = np.zeros_like(tab)
        e[i] = 1.0
        g_tab[i] = objective(xs, tab + e) - objective(xs, tab)
        assert grid.params.grad[i].item() == pytest.approx(g_tab[i], rel=1e-4, abs=1e-5)
    # d/d x: central differences in float64, away from cell boundaries
    eps = 1e-7
    for b in range(xs.shape[0]):
        for k in range(n_dims):
            xp, xm = xs.copy(), xs.copy()
            xp[b, k] += eps
            xm[b, k] -= eps
            fd = (objective(xp, tab) - objective(xm, tab)) / (2 * eps)
            assert x.grad[b, k].item() == pytest.approx(fd, rel=2e-3, abs=2e-3)


def test_input_gradient_matches_autograd_of_reference():
    from backend.encodings.hashgrid import hashgrid_forward_reference
    cfg = GridConfig()
    grid = TorchHashGrid(3, cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        grid.params.copy_(torch.randn(grid.params.shape, generator=gen))
    x = torch.rand(300, 3, generator=gen).requires_grad_(True)
    up = torch.randn(300, 32, generator=gen)
    (grid(x) * up).sum().backward()
    gx, gt = x.grad.clone(), grid.params.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    t2 = grid.params.detach().clone().requires_grad_(True)
    (hashgrid_forward_reference(x2, t2, 3, cfg) * up).sum().backward()
    # input gradients sum terms of size ~scale (up to 455): compare relative to the gradient's norm
    assert ((gx - x2.grad).norm() / x2.grad.norm()).item() < 1e-5
    assert (gx - x2.grad).abs().max().item() < 1e-3
    torch.testing.assert_close(gt, t2.grad, rtol=1e-5, atol=1e-6)


def test_init_is_tcnn_range_and_deterministic():
    a, b = TorchHashGrid(2, GridConfig()), TorchHashGrid(2, GridConfig())
    assert torch.equal(a.params, b.params)
    assert a.params.abs().max() <= 1e-4 and a.params.std() > 1e-5
