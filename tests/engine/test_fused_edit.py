"""The fused edit pass against the PyTorch composite (and the renderer's formula)."""

import importlib.util
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and importlib.util.find_spec("triton") is not None and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

from backend.edit.fused import composite_delta, composite_delta_torch, triton  # noqa: E402
from backend.export.atlas import sample_atlas  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")


def _inputs(n_layers, H, W, S, seed):
    g = torch.Generator().manual_seed(seed)
    frame = torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8)
    uv = torch.rand(n_layers, H, W, 2, generator=g) * 2.2 - 1.1  # some outside the atlas: border
    alpha = torch.rand(n_layers, H, W, generator=g).half()
    res = (torch.rand(n_layers, H, W, 3, generator=g) * 1.5).half()
    deltas = torch.randn(n_layers, S, S, 3, generator=g) * 0.2
    deltas[:, : S // 2] = 0.0  # half of each atlas untouched
    return [t.to(DEV) for t in (frame, uv, alpha, res, deltas)]


def test_torch_composite_is_the_renderer_formula():
    frame, uv, alpha, res, deltas = [t.cpu() for t in _inputs(2, 9, 13, 16, 0)]
    out = frame.float() / 255
    for i in range(2):
        out += alpha[i].float()[..., None] * res[i].float() * sample_atlas(deltas[i], uv[i])
    expected = torch.floor(out.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    assert torch.equal(composite_delta_torch(frame, uv, alpha, res, deltas), expected)


@pytest.mark.skipif(triton is None, reason="triton is not installed: the fused kernel is untested here")
@pytest.mark.parametrize("n_layers,H,W,S", [(1, 7, 11, 8), (2, 16, 20, 32), (3, 5, 64, 17)])
def test_kernel_matches_torch(n_layers, H, W, S):
    frame, uv, alpha, res, deltas = _inputs(n_layers, H, W, S, n_layers * 7 + W)
    ref = composite_delta_torch(frame, uv, alpha, res, deltas)
    out = torch.full_like(frame, 77)
    got = composite_delta(frame, uv, alpha, res, deltas, out=out, block=64)
    # float32 summation order may move a value across a rounding boundary: at most 1 level
    assert (got.int() - ref.int()).abs().max().item() <= 1
    assert (got != ref).float().mean().item() < 0.01
    # untouched pixels (zero delta everywhere they sample) keep the frame exactly
    zero = torch.zeros_like(deltas)
    assert torch.equal(composite_delta(frame, uv, alpha, res, zero, block=64), frame)


@pytest.mark.skipif(triton is None, reason="triton is not installed: the fused kernel is untested here")
def test_kernel_with_per_layer_atlas_sizes():
    """Layers whose atlases differ in size (export.atlas_size = 0 sizes each layer): a list of deltas."""
    frame, uv, alpha, res, _ = _inputs(3, 9, 21, 8, 5)
    g = torch.Generator().manual_seed(3)
    deltas = [(torch.randn(S, S, 3, generator=g) * 0.2).to(DEV) for S in (24, 8, 40)]
    ref = composite_delta_torch(frame, uv, alpha, res, deltas)
    got = composite_delta(frame, uv, alpha, res, deltas, block=64)
    assert (got.int() - ref.int()).abs().max().item() <= 1
    assert (got != ref).float().mean().item() < 0.01
    # each layer alone: the same as sampling that layer's own atlas
    for i in range(3):
        one = [d if k == i else torch.zeros_like(d) for k, d in enumerate(deltas)]
        out = frame.float() / 255 + alpha[i].float()[..., None] * res[i].float() * sample_atlas(deltas[i], uv[i])
        exp = torch.floor(out.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        assert (composite_delta(frame, uv, alpha, res, one, block=64).int() - exp.int()).abs().max().item() <= 1
