"""tiny-cuda-nn's HashGrid behind the TorchHashGrid interface (CUDA only, optional).

``tinycudann`` is imported when the module is built, not when this file is imported. The
grid table is tcnn's own ``params`` Parameter, registered here as ``params`` only (the tcnn
module is kept unregistered), so state dicts are interchangeable with ``TorchHashGrid`` and
``TritonHashGrid``: same key, same flat level-after-level layout (method.md 1.3, 8.2).
The output is float32 (``dtype=torch.float32``), level-major, as hashing-nvd requests it.
Not testable without a tcnn build; see docs/kernels.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GridConfig
from .hashgrid import n_params


def tcnn_config(cfg: GridConfig) -> dict:
    return {
        "otype": "HashGrid",
        "n_levels": cfg.n_levels,
        "n_features_per_level": cfg.n_features_per_level,
        "log2_hashmap_size": cfg.log2_hashmap_size,
        "base_resolution": cfg.base_resolution,
        "per_level_scale": float(cfg.per_level_scale),
    }


class TcnnHashGrid(nn.Module):
    """Hash-grid encoding through ``tinycudann.Encoding``; inputs in [0, 1]^d."""

    backend = "tcnn"

    def __init__(self, n_dims: int, cfg: GridConfig, seed: int | None = None) -> None:
        super().__init__()
        import tinycudann as tcnn  # noqa: PLC0415 - optional, CUDA-only dependency

        self.n_dims = n_dims
        self.cfg = cfg
        enc = tcnn.Encoding(n_dims, tcnn_config(cfg), seed=1337 if seed is None else seed,
                            dtype=torch.float32)
        if enc.n_output_dims != cfg.n_levels * cfg.n_features_per_level:
            raise RuntimeError(f"tcnn encoding has {enc.n_output_dims} outputs, expected "
                               f"{cfg.n_levels * cfg.n_features_per_level}")
        if enc.params.numel() != n_params(n_dims, cfg):
            raise RuntimeError(f"tcnn grid has {enc.params.numel()} params, the layout "
                               f"{n_params(n_dims, cfg)}: sizes differ (method.md 8.2 float caveat)")
        self.n_output_dims = enc.n_output_dims
        object.__setattr__(self, "_enc", enc)  # not a submodule: one state-dict key, 'params'
        self.params = enc.params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_dims:
            raise ValueError(f"expected input of shape (B, {self.n_dims}), got {tuple(x.shape)}")
        out = self._enc(x.to(torch.float32).contiguous())
        return out.to(torch.float32)
