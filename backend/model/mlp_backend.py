"""How the networks' Linear-ReLU stacks are evaluated: ``model.mlp_backend``.

* ``torch``: ``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU`` (the reference; always on CPU).
* ``compile``: the same function through ``torch.compile`` (Inductor: cuBLAS matrix products
  with the bias, ReLU, ReLU-backward and bias-gradient work fused into generated Triton kernels;
  the output activation fused too), one compiled graph per network kind, shapes dynamic.
* ``triton``: the hand-written kernels of :mod:`backend.model.fused_mlp`: fully fused forward and
  backward for every network they take (width <= 64: texture, residual, alpha); for the 256-wide
  mapping (too wide to keep in registers) the "chain": cuBLAS products with cuBLASLt's bias+ReLU
  epilogue and one Triton kernel per layer for the ReLU backward and the bias gradient.
  No Inductor, so no compilation time beyond Triton's JIT.
* ``auto``: the measured winner on CUDA (``AUTO_CUDA``, docs/benchmarks.md), ``torch`` elsewhere.

Only training-time calls (autograd on, a CUDA tensor) take the compiled or fused path; without
gradients (evaluation, export, the residual-consistency targets) the reference runs, so the
exported maps never depend on the backend. On a CPU every backend is the reference, except that
``triton`` runs its kernels under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

BACKENDS = ("auto", "torch", "compile", "triton")
ACTIVATIONS = ("none", "tanh", "tanh01", "softplus")
AUTO_CUDA = "triton"  # the measured winner on the H200 end to end, TF32 rounded to nearest (docs/benchmarks.md, "Run fused-6")


def resolve(name: str, device: torch.device | str) -> str:
    """``auto`` -> the backend it stands for on ``device``; others are checked and returned."""
    if name not in BACKENDS:
        raise ConfigError(f"model.mlp_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        return AUTO_CUDA if device.type == "cuda" else "torch"
    if name == "triton" and importlib.util.find_spec("triton") is None:
        if device.type != "cuda":
            return "torch"  # what every backend is on a CPU anyway
        raise ConfigError("model.mlp_backend = 'triton' needs the triton package (not importable here)")
    return name


def activation(y: torch.Tensor, act: str) -> torch.Tensor:
    """The networks' output activations, written as the reference writes them."""
    if act == "tanh":
        return torch.tanh(y)
    if act == "tanh01":
        return (torch.tanh(y) + 1.0) * 0.5
    if act == "softplus":
        return F.softplus(y)
    return y


def reference_mlp(x: torch.Tensor, act: str, *params: torch.Tensor) -> torch.Tensor:
    """Functional form of :class:`MLP` (weights and biases interleaved): what ``compile`` compiles."""
    h = x
    n = len(params) // 2
    for i in range(n):
        h = F.linear(h, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            h = torch.relu(h)
    return activation(h, act)


_COMPILED: dict[str, object] = {}


def _compiled(act: str):
    fn = _COMPILED.get(act)
    if fn is None:
        import torch._dynamo

        def network(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
            return reference_mlp(x, act, *params)

        # one graph per network kind and layer count; batch sizes are symbolic (dynamic=True)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        fn = torch.compile(network, dynamic=True, fullgraph=True)
        _COMPILED[act] = fn
    return fn


def _fused_module():
    try:
        from . import fused_mlp
    except ImportError:
        return None
    return fused_mlp


class MLP(nn.Sequential):
    """Linear-ReLU stack with an output activation; parameters and state-dict keys are those of the
    plain ``nn.Sequential`` (checkpoints load either way). ``backend`` is set by the model."""

    def __init__(self, in_dim: int, out_dim: int, width: int, layers: int, act: str = "none") -> None:
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}")
        mods: list[nn.Module] = [nn.Linear(in_dim, width), nn.ReLU()]
        for _ in range(layers - 2):
            mods += [nn.Linear(width, width), nn.ReLU()]
        mods.append(nn.Linear(width, out_dim))
        super().__init__(*mods)
        self.act = act
        self.backend = "torch"
        self.n_layers = layers
        self.in_dim, self.out_dim, self.width = in_dim, out_dim, width

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]

    def fused_ok(self) -> bool:
        fm = _fused_module()
        return fm is not None and fm.supports(self.in_dim, self.width, self.out_dim, self.n_layers - 2)

    def path(self, x: torch.Tensor) -> str:
        """The path a call with ``x`` takes: torch, compile, triton (fully fused) or chain."""
        if self.backend == "torch" or not torch.is_grad_enabled():
            return "torch"
        if self.backend == "triton":
            fm = _fused_module()
            if fm is None or not (x.device.type == "cuda" or fm.interpreting()):
                return "torch"
            if self.fused_ok():
                return "torch" if "fused" in fm.FALLBACK else "triton"
            return "chain" if self.out_dim <= 16 and "chain" not in fm.FALLBACK else "torch"
        if x.device.type != "cuda":
            return "torch"
        return "compile"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        p = self.path(x)
        if p == "torch":
            return activation(super().forward(x), self.act)
        lin = self.linears
        if p in ("triton", "chain"):
            fm = _fused_module()
            fn = fm.fused_mlp if p == "triton" else fm.chain_mlp
            return activation(fn(x, [m.weight for m in lin], [m.bias for m in lin]), self.act)
        params = [t for m in lin for t in (m.weight, m.bias)]
        return _compiled(self.act)(x, *params)
