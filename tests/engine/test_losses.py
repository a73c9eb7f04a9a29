"""Each loss term on small inputs checked by hand (method.md 2.4, 2.5)."""

import math

import pytest
import torch

from backend import losses as L


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_rgb_loss_is_mean_squared_norm():
    pred, gt = t([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]), t([[0.0, 0.0, 0.0], [0.5, 0.5, 1.5]])
    assert L.rgb_loss(pred, gt).item() == pytest.approx((1.0 + 1.0) / 2)


def test_gradient_loss_forward_differences():
    c = t([[0.2, 0.2, 0.2]])
    cx, cy = t([[0.5, 0.2, 0.2]]), t([[0.2, 0.2, 0.2]])
    dx, dy = t([[0.1, 0.0, 0.0]]), t([[0.0, 0.0, 0.4]])
    # x: (0.3 - 0.1)^2 = 0.04; y: (0 - 0.4)^2 = 0.16
    assert L.gradient_loss(c, cx, cy, dx, dy).item() == pytest.approx(0.20)


def test_sparsity_only_foreground_layers():
    textures = [t([[1.0, 0.0, 0.0]]), t([[0.0, 1.0, 1.0]]), t([[9.0, 9.0, 9.0]])]  # last = bg
    alpha = t([[0.5, 0.25, 0.25]])
    # fg0: (0.5,0,0) -> .25 ; fg1: (0,.75,.75) -> 1.125
    assert L.sparsity_loss(textures, alpha).item() == pytest.approx(0.25 + 1.125)
    assert L.sparsity_loss(textures[-1:], alpha[:, -1:]).item() == 0.0


def test_alpha_bootstrapping_is_bce_over_all_layers():
    alpha, target = t([[0.9, 0.1]]), t([[1.0, 0.0]])
    assert L.alpha_bootstrapping_loss(alpha, target).item() == pytest.approx(-math.log(0.9), rel=1e-5)


def test_alpha_reg_minus_log_max():
    alpha = t([[0.5, 0.5], [0.9, 0.1]])
    assert L.alpha_reg_loss(alpha).item() == pytest.approx((math.log(2) - math.log(0.9)) / 2, rel=1e-5)


def test_flow_alpha_masked_means_and_empty_subset():
    a = t([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    a_fw = t([[0.0, 1.0], [0.5, 0.5], [7.0, 7.0]])
    ok_fw = torch.tensor([True, True, False])
    a_bw = a.clone()
    ok_bw = torch.tensor([False, False, False])
    # fw over rows 0,1: (1+1+0+0)/4 = .5 ; bw empty -> 0 (the seed would give NaN)
    assert L.flow_alpha_loss(a, a_fw, ok_fw, a_bw, ok_bw).item() == pytest.approx(0.25)


def test_flow_mapping_in_atlas_pixels_weighted_by_alpha():
    uv = t([[0.0, 0.0], [0.0, 0.0]])
    uv_fw = t([[0.03, 0.04], [1.0, 1.0]])
    ok = torch.tensor([True, False])
    alpha = t([0.5, 1.0])
    rez, s = 100, 0.5
    # |d| = .05 -> .05 * 100 / (2 * .5) = 5 px, times alpha .5 = 2.5 ; fw and bw equal
    val = L.flow_mapping_loss(uv, uv_fw, ok, uv_fw, ok, alpha, rez, s).item()
    assert val == pytest.approx(2.5, rel=1e-5)


@pytest.mark.parametrize("d", [1.0, 100.0])
@pytest.mark.parametrize("gain,angle", [(1.0, 0.0), (1.0, 0.7), (2.0, 0.3)])
def test_rigidity_of_similarity_maps(d, gain, angle):
    rez, s = 200, 0.8
    c, sn = math.cos(angle), math.sin(angle)
    # uv = s * gain * R(angle) * xy, xy = px / (rez/2): J = gain * R, J^T J = gain^2 I
    def uv_of(px):
        xy = px / (rez / 2)
        return s * gain * torch.stack([c * xy[:, 0] - sn * xy[:, 1], sn * xy[:, 0] + c * xy[:, 1]], -1)
    p = t([[10.0, 20.0], [150.0, 40.0]])
    uv, uv_xm, uv_ym = uv_of(p), uv_of(p - t([d, 0.0])), uv_of(p - t([0.0, d]))
    g2 = gain ** 2
    expected = math.sqrt(2) * g2 + math.sqrt(2) * (g2 + 0.001) / ((g2 + 0.001) ** 2)
    assert L.rigidity_loss(uv, uv_xm, uv_ym, rez, s, d).item() == pytest.approx(expected, rel=1e-4)


def test_rigidity_penalises_shear():
    rez, s, d = 100, 1.0, 1.0
    p = t([[5.0, 5.0]])
    sim = L.rigidity_loss(p / 50, (p - t([1.0, 0.0])) / 50, (p - t([0.0, 1.0])) / 50, rez, s, d)
    shear = lambda q: torch.stack([q[:, 0] + 0.8 * q[:, 1], q[:, 1]], -1) / 50  # noqa: E731
    sh = L.rigidity_loss(shear(p), shear(p - t([1.0, 0.0])), shear(p - t([0.0, 1.0])), rez, s, d)
    assert sh.item() > sim.item() + 0.5


def test_residual_reg():
    assert L.residual_reg_loss(t([[1.0, 2.0, 0.0]])).item() == pytest.approx(2 / 3)


def test_residual_consistency_correlation_and_variance():
    g = torch.Generator().manual_seed(0)
    target = 1.0 + 0.01 * torch.randn(4, 9, 3, generator=g)
    same = target[None].expand(2, 4, 9, 3).clone()
    inv = torch.ones(2, 4, dtype=torch.bool)
    var_term = 16 * ((target.std(dim=1)) ** 2).mean().item()
    # identical patches: correlation 1 -> only the variance term remains
    assert L.residual_consistency_loss(target, same, inv).item() == pytest.approx(var_term, rel=1e-3, abs=1e-6)
    # mirrored patches: correlation -1 -> 2 + variance
    mirrored = (2.0 - target)[None].expand(2, 4, 9, 3)
    assert L.residual_consistency_loss(target, mirrored, inv).item() == pytest.approx(2 + var_term, rel=1e-3)
    # nothing invisible -> 0
    assert L.residual_consistency_loss(target, mirrored, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_masked_mean_matches_subset_mean():
    v = torch.randn(10, 3)
    m = torch.rand(10) > 0.5
    m[0] = True
    assert L.masked_mean(v, m).item() == pytest.approx(v[m].mean().item(), rel=1e-5, abs=1e-7)
