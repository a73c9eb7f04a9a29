"""Every loss term of Hashing-NVD as a pure function of tensors (method.md 2.4, 2.5).

Weights are applied by the trainer. Where the seed takes a mean over a data-dependent
subset (flow-consistent pixels, "invisible" residual samples) these functions take the
whole batch and a 0/1 mask and return the same mean, so that a training step has fixed
shapes (no host synchronisation, CUDA-graph friendly). An empty subset gives 0 where the
seed would give NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the rows where ``mask`` (B,) is 1; extra dims are averaged too."""
    m = mask.to(values.dtype).reshape(mask.shape + (1,) * (values.dim() - mask.dim()))
    per_row = values[0].numel() if values.dim() > mask.dim() else 1
    return (values * m).sum() / (m.sum() * per_row).clamp_min(1.0)


def rgb_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """mean_n ||C - C_gt||^2."""
    return (pred - gt).pow(2).sum(-1).mean()


def gradient_loss(c: torch.Tensor, c_x1: torch.Tensor, c_y1: torch.Tensor,
                  dx_gt: torch.Tensor, dy_gt: torch.Tensor) -> torch.Tensor:
    """mean ||(C(x+1) - C(x)) - dI/dx||^2 + ||(C(y+1) - C(y)) - dI/dy||^2 (forward differences)."""
    return (((c_x1 - c) - dx_gt).pow(2).sum(-1) + ((c_y1 - c) - dy_gt).pow(2).sum(-1)).mean()


def sparsity_loss(textures: list[torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
    """Foreground textures pushed to black where their layer is not used (background excluded)."""
    if len(textures) < 2:
        return alpha.new_zeros(())
    fg = torch.cat([textures[i] * (1.0 - alpha[:, i:i + 1]) for i in range(len(textures) - 1)], dim=1)
    return fg.pow(2).sum(-1).mean()


def alpha_bootstrapping_loss(alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of every layer's alpha against the masks (background target = 1 - max(objects))."""
    return F.binary_cross_entropy(alpha, target)


def alpha_reg_loss(alpha: torch.Tensor) -> torch.Tensor:
    """mean -log(max_i alpha_i): each pixel should belong to one layer."""
    return (-torch.log(alpha.amax(dim=1))).mean()


def flow_alpha_loss(alpha: torch.Tensor, alpha_fw: torch.Tensor, ok_fw: torch.Tensor,
                    alpha_bw: torch.Tensor, ok_bw: torch.Tensor) -> torch.Tensor:
    """Alpha follows the flow: 1/2 (mean|a(p) - a(p + f_fw, t+1)| + mean|a(p) - a(p + f_bw, t-1)|)."""
    fw = masked_mean((alpha - alpha_fw).abs(), ok_fw)
    bw = masked_mean((alpha - alpha_bw).abs(), ok_bw)
    return 0.5 * (fw + bw)


def flow_mapping_loss(uv: torch.Tensor, uv_fw: torch.Tensor, ok_fw: torch.Tensor,
                      uv_bw: torch.Tensor, ok_bw: torch.Tensor, alpha: torch.Tensor,
                      rez: int, uv_scale: float) -> torch.Tensor:
    """uv follows the flow, in atlas-scale pixels, weighted by the layer's alpha (B,)."""
    k = rez / (2.0 * uv_scale)
    fw = (uv_fw - uv).norm(dim=-1) * k * alpha
    bw = (uv_bw - uv).norm(dim=-1) * k * alpha
    return 0.5 * (masked_mean(fw, ok_fw) + masked_mean(bw, ok_bw))


def rigidity_loss(uv: torch.Tensor, uv_xm: torch.Tensor, uv_ym: torch.Tensor,
                  rez: int, uv_scale: float, d: float,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local rigidity of the mapping from backward differences at distance ``d`` pixels.

    J = [[du/dx, du/dy], [dv/dx, dv/dy]] with du/dx = (u(x) - u(x - d)) * rez/2 / s / d;
    loss = ||J^T J||_F + ||(J^T J + 0.001 I)^-1||_F, averaged over the batch, or with
    ``weight`` (B,) its weighted mean sum(w l) / max(sum(w), 1) (``model.uv_init = "fit"``: an
    object's alpha, so the points that never show it do not hold its magnified mapping back).
    """
    k = rez / 2.0 / uv_scale / d
    dx = (uv - uv_xm) * k  # (du/dx, dv/dx)
    dy = (uv - uv_ym) * k  # (du/dy, dv/dy)
    # J^T J = [[dx.dx, dx.dy], [dy.dx, dy.dy]] with columns dx=(du/dx,dv/dx), dy=(du/dy,dv/dy)
    a = (dx * dx).sum(-1)
    b = (dx * dy).sum(-1)
    dd = (dy * dy).sum(-1)
    a_r, d_r = a + 0.001, dd + 0.001
    det = a_r * d_r - b * b
    jtj = torch.sqrt(a * a + 2 * b * b + dd * dd)
    inv = torch.sqrt(d_r * d_r + 2 * b * b + a_r * a_r) / det.abs()
    if weight is None:
        return (jtj + inv).mean()
    return (weight * (jtj + inv)).sum() / weight.sum().clamp_min(1.0)


def residual_reg_loss(residual: torch.Tensor) -> torch.Tensor:
    """mean (R - 1)^2: the residual stays a gentle gain."""
    return (residual - 1.0).pow(2).mean()


def residual_consistency_loss(target: torch.Tensor, other: torch.Tensor,
                              invisible: torch.Tensor) -> torch.Tensor:
    """Correlation of residual patches across time for atlas points off-screen at other times.

    target:    (n, 9, 3) residual of a 3x3 patch at its own frame (detached by the caller).
    other:     (T, n, 9, 3) residual of the same atlas points at T other frames.
    invisible: (T, n) 1 where the atlas point is outside the frame at that time.
    loss = mean over invisible pairs of (1 - Pearson rho over the 9 samples, per channel)
           + 16 * mean(var of the patch at the other frame), values scaled by 255 as in the seed.
    """
    r1 = target[None] * 255.0
    r2 = other * 255.0
    x1 = r1 - r1.mean(dim=2, keepdim=True)
    x2 = r2 - r2.mean(dim=2, keepdim=True)
    std1 = r1.std(dim=2, keepdim=True)
    std2 = r2.std(dim=2, keepdim=True)
    n = target.shape[1] - 1
    corr = 1.0 - (x1 * x2).sum(dim=2, keepdim=True) / (n * std1 * std2 + 1e-6)  # (T, n, 1, 3)
    flat = invisible.reshape(-1)
    corr_term = masked_mean(corr.reshape(flat.shape[0], -1), flat)
    std_term = masked_mean((std2 / 255.0).pow(2).reshape(flat.shape[0], -1), flat)
    return corr_term + 16.0 * std_term
