"""Hash-grid encodings behind one interface: ``make_grid(n_dims, cfg, backend)``.

Backends: ``torch`` (the reference, any device), ``triton`` (CUDA kernels, same
semantics), ``tcnn`` (tiny-cuda-nn when importable). ``auto`` picks triton on CUDA
when available, otherwise torch. All take inputs in [0, 1]^d and return
(B, n_levels * n_features_per_level) float32, level-major.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..config import GridConfig
from ..errors import ConfigError
from .hashgrid import TorchHashGrid, grid_layout, n_params

__all__ = ["make_grid", "available_backends", "TorchHashGrid", "grid_layout", "n_params"]


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is not None and _triton_module() is not None:
            out.insert(0, "triton")
        if importlib.util.find_spec("tinycudann") is not None:
            out.append("tcnn")
    return out


def _triton_module():
    try:
        from . import triton_hashgrid  # noqa: F401
    except ImportError:
        return None
    return triton_hashgrid


def make_grid(n_dims: int, cfg: GridConfig, backend: str = "auto",
              device: torch.device | str = "cpu", seed: int | None = None) -> nn.Module:
    device = torch.device(device)
    avail = available_backends(device)
    if backend == "auto":
        backend = avail[0]
    if backend not in avail:
        raise ConfigError(f"hash-grid backend {backend!r} is not available on {device}; "
                          f"available: {', '.join(avail)}")
    if backend == "torch":
        return TorchHashGrid(n_dims, cfg, seed=seed).to(device)
    if backend == "triton":
        mod = _triton_module()
        return mod.TritonHashGrid(n_dims, cfg, seed=seed).to(device)  # type: ignore[union-attr]
    from .tcnn_grid import TcnnHashGrid
    return TcnnHashGrid(n_dims, cfg, seed=seed).to(device)
