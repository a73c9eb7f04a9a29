"""The networks of Hashing-NVD (method.md 1.2) and the layered model that composites them.

Per layer i: a mapping MLP M_i (x,y,t) -> (u,v) in (-1,1) (tanh, no encoding), a texture
T_i (u,v) -> RGB in [0,1] (2D hash grid + MLP, (tanh+1)/2) and a residual R_i (u,v,t) -> RGB
gain (3D hash grid + MLP, softplus) whose uv input is detached. One alpha network (3D hash
grid + MLP) gives N-1 logits that become N hierarchical alphas, background last.

    C(x,y,t) = sum_i alpha_i(x,y,t) * T_i(uv_i) * R_i(uv_i.detach(), t)

Hash-grid inputs are remapped from [-1,1] to [0,1] by v/2 + 0.5, as in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..encodings import make_grid
from .mlp_backend import MLP, resolve

ALPHA_EPS = 1e-5


def mlp(in_dim: int, out_dim: int, width: int, layers: int, act: str = "none") -> MLP:
    """Linear-ReLU stack with ``layers`` Linear layers (the seed's EncodingMLP without encoding) and
    the output activation ``act``; evaluated by the model's ``mlp_backend`` (mlp_backend.py)."""
    return MLP(in_dim, out_dim, width, layers, act)


class MappingNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mlp = mlp(3, 2, cfg.mapping_width, cfg.mapping_layers, "tanh")

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        return self.mlp(xyt)


class TextureNet(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str, device: torch.device, seed: int) -> None:
        super().__init__()
        self.grid = make_grid(2, cfg.texture_grid, backend, device, seed=seed)
        self.mlp = mlp(self.grid.n_output_dims, 3, cfg.texture_width, cfg.texture_layers, "tanh01")

    def forward(self, uv: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.grid(uv * 0.5 + 0.5))


class ResidualNet(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str, device: torch.device, seed: int) -> None:
        super().__init__()
        self.grid = make_grid(3, cfg.xyt_grid, backend, device, seed=seed)
        self.mlp = mlp(self.grid.n_output_dims, 3, cfg.residual_width, cfg.residual_layers, "softplus")

    def forward(self, uv: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uvt = torch.cat([uv, t], dim=-1)
        return self.mlp(self.grid(uvt * 0.5 + 0.5))


class AlphaNet(nn.Module):
    def __init__(self, n_layers: int, cfg: ModelConfig, backend: str, device: torch.device, seed: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.grid = make_grid(3, cfg.xyt_grid, backend, device, seed=seed)
        self.mlp = mlp(self.grid.n_output_dims, n_layers - 1, cfg.alpha_width, cfg.alpha_layers, "tanh01")

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        a = self.mlp(self.grid(xyt * 0.5 + 0.5))
        return hierarchical_alpha(a)


def hierarchical_alpha(a: torch.Tensor) -> torch.Tensor:
    """(B, N-1) in [0,1] -> (B, N): alpha_0 = a_0, alpha_k = a_k prod_{j<k}(1-a_j), bg = prod(1-a)."""
    out = [a[:, :1]]
    rest = 1.0 - a[:, :1]
    for k in range(1, a.shape[1]):
        out.append(a[:, k:k + 1] * rest)
        rest = rest * (1.0 - a[:, k:k + 1])
    out.append(rest)
    return torch.clamp(torch.cat(out, dim=1), ALPHA_EPS, 1.0 - ALPHA_EPS)


@dataclass
class Render:
    """Everything the losses need from one batch of points (N layers, B points)."""

    uv: list[torch.Tensor]  # N x (B, 2)
    rgb: list[torch.Tensor]  # N x (B, 3): texture T_i(uv_i)
    residual: list[torch.Tensor]  # N x (B, 3): R_i(uv_i.detach(), t)
    alpha: torch.Tensor  # (B, N)

    @property
    def color(self) -> torch.Tensor:
        return sum(self.rgb[i] * self.residual[i] * self.alpha[:, i:i + 1] for i in range(len(self.rgb)))

    @property
    def color_no_residual(self) -> torch.Tensor:
        return sum(self.rgb[i] * self.alpha[:, i:i + 1] for i in range(len(self.rgb)))


class LayeredModel(nn.Module):
    """N layers (objects in mask order, background last) and the shared alpha network."""

    def __init__(self, n_layers: int, cfg: ModelConfig, device: torch.device | str = "cpu",
                 backend: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("a model needs at least one layer")
        device = torch.device(device)
        backend = backend or cfg.encoding_backend
        self.n_layers = n_layers
        self.cfg = cfg
        self.mappings = nn.ModuleList(MappingNet(cfg) for _ in range(n_layers))
        self.textures = nn.ModuleList(TextureNet(cfg, backend, device, 1337 + seed + 3 * i)
                                      for i in range(n_layers))
        self.residuals = nn.ModuleList(ResidualNet(cfg, backend, device, 1338 + seed + 3 * i)
                                       for i in range(n_layers)) if cfg.use_residual else None
        self.alpha_net = AlphaNet(n_layers, cfg, backend, device, 1339 + seed) if n_layers > 1 else None
        self.uv_scales = [cfg.uv_scale_fg] * (n_layers - 1) + [cfg.uv_scale_bg]
        self.set_mlp_backend(cfg.mlp_backend, device)
        self.to(device)

    def set_mlp_backend(self, name: str, device: torch.device | str | None = None) -> str:
        """Evaluate every MLP with ``name`` (torch|compile|triton|auto, resolved for ``device``)."""
        dev = device if device is not None else next(self.parameters()).device
        self.mlp_backend = resolve(name, dev)
        for mod in self.modules():
            if isinstance(mod, MLP):
                mod.backend = self.mlp_backend
        return self.mlp_backend

    @property
    def grid_backend(self) -> str:
        return getattr(self.textures[0].grid, "backend", "torch")

    # ------------------------------------------------------------ components
    def mapping(self, i: int, xyt: torch.Tensor) -> torch.Tensor:
        return self.mappings[i](xyt)

    def texture(self, i: int, uv: torch.Tensor) -> torch.Tensor:
        return self.textures[i](uv)

    def residual(self, i: int, uv: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.residuals is None:
            return torch.ones(uv.shape[0], 3, device=uv.device, dtype=uv.dtype)
        return self.residuals[i](uv.detach(), t)

    def alpha(self, xyt: torch.Tensor) -> torch.Tensor:
        if self.alpha_net is None:
            return torch.ones(xyt.shape[0], 1, device=xyt.device, dtype=xyt.dtype)
        return self.alpha_net(xyt)

    def render(self, xyt: torch.Tensor, uv: list[torch.Tensor] | None = None) -> Render:
        """Evaluate every layer at normalised points (B, 3); ``uv`` may be precomputed."""
        if uv is None:
            uv = [self.mapping(i, xyt) for i in range(self.n_layers)]
        t = xyt[:, 2:3]
        rgb = [self.texture(i, uv[i]) for i in range(self.n_layers)]
        res = [self.residual(i, uv[i], t) for i in range(self.n_layers)]
        return Render(uv, rgb, res, self.alpha(xyt))

    # ------------------------------------------------------------ optimiser
    def param_groups(self, grid_lr: float, mlp_lr: float, mapping_lr: float | None = None) -> list[dict]:
        """Hash tables at ``grid_lr``, the texture/residual/alpha Linear layers at ``mlp_lr`` and the
        mapping MLPs at ``mapping_lr`` (default ``mlp_lr``; the seed: 1e-2 / 1e-4 / 1e-4)."""
        grids, mlps, maps = [], [], []
        for name, p in self.named_parameters():
            if name.endswith("grid.params"):
                grids.append(p)
            elif name.startswith("mappings."):
                maps.append(p)
            else:
                mlps.append(p)
        return [{"params": grids, "lr": grid_lr, "name": "grid"},
                {"params": mlps, "lr": mlp_lr, "name": "mlp"},
                {"params": maps, "lr": mlp_lr if mapping_lr is None else mapping_lr, "name": "mapping"}]
