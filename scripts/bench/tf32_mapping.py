#!/usr/bin/env python3
"""What TF32 matrix products do to the mapping MLP: uv error and rigidity-Jacobian noise.

    python scripts/bench/tf32_mapping.py [--steps 300]

TF32 tensor cores round each operand of a matrix product to a 10-bit mantissa and accumulate
in fp32. This script emulates exactly that on the CPU (operands rounded to nearest, products
summed in float64), on the seed's mapping MLP (4 x 256) after a short pretraining towards
uv = 0.6 xy, and compares it with the plain fp32 network (the baseline, same run) at two
working sizes: the uv error in atlas pixels (uv * rez / (2 s)) and the error of the d = 1 px
finite-difference Jacobian du/dx that the rigidity loss uses, relative to its value.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.config import ModelConfig  # noqa: E402
from backend.model.networks import MappingNet  # noqa: E402


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 explicit mantissa bits), to nearest, ties away from zero."""
    i = x.contiguous().view(torch.int32)
    return ((i + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32)


def forward(net: MappingNet, xyt: torch.Tensor, mode: str) -> torch.Tensor:
    """``mode``: "f64" (the reference: every operation in float64), "fp32" (plain float32 products,
    what the seed computes) or "tf32" (operands rounded to TF32, products accumulated exactly)."""
    if mode == "fp32":
        return net(xyt).double()
    h = xyt.double()
    for m in net.mlp:
        if isinstance(m, torch.nn.Linear):
            if mode == "tf32":
                h = tf32_round(h.float()).double() @ tf32_round(m.weight).double().T + m.bias.double()
                h = h.float().double()  # the product's fp32 result
            else:
                h = h @ m.weight.double().T + m.bias.double()
        else:
            h = m(h)
    return torch.tanh(h)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps towards uv = 0.6 xy")
    ap.add_argument("--points", type=int, default=20_000)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = MappingNet(ModelConfig())
    F_, s = 100, 0.6
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(args.steps):
        xyt = torch.rand(4096, 3) * 2 - 1
        loss = (net(xyt) - s * xyt[:, :2]).norm(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"TF32 emulated; pretraining loss {float(loss.detach()):.4f}; errors against float64")
    print(f"{'size':>10} {'uv err fp32':>12} {'uv err tf32':>12} {'ratio':>7} {'du/dx err fp32':>15} "
          f"{'du/dx err tf32':>15} {'ratio':>7}   (uv: mean abs, atlas px; du/dx: rms, du/dx ~ 1)")
    with torch.no_grad():
        for W, H in ((448, 256), (1920, 1080)):
            rez = max(W, H)
            k = rez / 2 / s
            x = torch.rand(args.points) * (W - 2) + 1
            y = torch.rand(args.points) * (H - 2) + 1
            f = torch.randint(0, F_, (args.points,)).float()

            def pts(xx):
                return torch.stack([xx / (rez / 2) - 1, y / (rez / 2) - 1, f / (F_ / 2) - 1], 1)

            ref0, ref1 = forward(net, pts(x), "f64"), forward(net, pts(x - 1), "f64")
            jr = (ref0 - ref1)[:, 0] * k
            row = []
            for mode in ("fp32", "tf32"):
                u0, u1 = forward(net, pts(x), mode), forward(net, pts(x - 1), mode)
                j = (u0 - u1)[:, 0] * k
                row.append((float((u0 - ref0).abs().mean() * k), float(((j - jr) ** 2).mean().sqrt())))
            (ue32, je32), (ue, je) = row
            print(f"{W}x{H:<5} {ue32:12.5f} {ue:12.5f} {ue / ue32:6.0f}x {je32:15.5f} {je:15.5f} {je / je32:6.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
