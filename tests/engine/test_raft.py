"""RAFT through torchvision: padding to the model's multiple and its removal, batching, weights rules.

The padding and crop are checked without torchvision (a stand-in model that returns each
pixel's padded coordinates). The real torchvision RAFT runs with random weights (no download):
shapes, padding and the compute_flow plumbing, not accuracy. Those tests skip where
torchvision is absent, and fail instead under scripts/test_vision (NEURAL_ATLAS_REQUIRE_TORCHVISION=1).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from backend.clip import Clip
from backend.errors import ConfigError
from backend.preprocess import compute_flow
from backend.preprocess.raft import MIN_SIDE, RaftFlow, pad_amounts, pad_images, unpad
from backend.preprocess.vision import VisionUnavailable, WeightsUnavailable


def torchvision_or_skip():
    from backend.preprocess.vision import import_torchvision
    try:
        return import_torchvision()
    except VisionUnavailable as e:
        if os.environ.get("NEURAL_ATLAS_REQUIRE_TORCHVISION") == "1":
            raise
        pytest.skip(f"torchvision unavailable ({e}); scripts/test_vision runs these")


def frames(n, width, height, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------- padding
@pytest.mark.parametrize("h, w", [(45, 61), (128, 128), (256, 448), (100, 300), (431, 767)])
def test_pad_amounts_reach_multiple_and_minimum(h, w):
    top, bottom, left, right = pad_amounts(h, w)
    H, W = h + top + bottom, w + left + right
    assert H % 8 == 0 and W % 8 == 0 and H >= MIN_SIDE and W >= MIN_SIDE
    assert H - h < 8 or H == MIN_SIDE
    assert 0 <= bottom - top <= 1 and 0 <= right - left <= 1


def test_pad_then_unpad_is_identity_and_border_replicates():
    x = torch.rand(2, 3, 45, 61)
    padded, pads = pad_images(x)
    top, bottom, left, right = pads
    assert padded.shape[-2:] == (45 + top + bottom, 61 + left + right)
    assert torch.equal(unpad(padded, pads), x)
    assert torch.equal(padded[..., 0, left:left + 61], x[..., 0, :])  # top rows repeat row 0


class CoordinateModel(torch.nn.Module):
    """Stands in for RAFT: 'flow' = each padded pixel's own (x, y) and checks the inputs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, a, b, num_flow_updates=12):
        self.seen.append((a.shape, float(a.min()), float(a.max())))
        n, _, h, w = a.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        return [torch.stack([xs, ys])[None].expand(n, 2, h, w)]


def test_raft_wrapper_crops_the_padding_off():
    model = CoordinateModel()
    raft = RaftFlow.from_model(model, batch_size=2)
    src = frames(3, 61, 45)
    out = raft(src, frames(3, 61, 45, seed=1))
    assert out.shape == (3, 45, 61, 2) and out.dtype == np.float32
    top, _, left, _ = pad_amounts(45, 61)
    # output pixel (y, x) came from padded pixel (y + top, x + left): the crop is aligned
    ys, xs = np.mgrid[0:45, 0:61]
    np.testing.assert_array_equal(out[1, ..., 0], xs + left)
    np.testing.assert_array_equal(out[1, ..., 1], ys + top)
    # batched by 2: calls of 2 and 1 pairs; inputs scaled to [-1, 1] and padded to the multiple
    assert [s[0][0] for s in model.seen] == [2, 1]
    assert all(s[0][-2] % 8 == 0 and s[0][-1] % 8 == 0 for s in model.seen)
    assert all(-1.0 <= s[1] and s[2] <= 1.0 for s in model.seen)


# ------------------------------------------------------ torchvision RAFT
def test_raft_small_random_weights_end_to_end(tmp_path):
    torchvision_or_skip()
    raft = RaftFlow("raft_small", weights=None, device="cpu", iters=2, batch_size=2)
    out = raft(frames(3, 61, 45), frames(3, 61, 45, seed=1))
    assert out.shape == (3, 45, 61, 2) and np.isfinite(out).all()
    clip = Clip(frames=frames(3, 70, 50), source="random")
    fs = compute_flow(clip, method="raft_small", weights=None, device="cpu", cache_dir=tmp_path, iters=2)
    assert fs.forward.shape == (2, 50, 70, 2) and fs.method == "raft_small"
    assert fs.tag == "raft_small/random/iters2/70x50" and fs.forward_ok.shape == (2, 50, 70)
    again = compute_flow(clip, method="raft_small", weights=None, cache_dir=tmp_path, iters=2)
    np.testing.assert_array_equal(again.forward, fs.forward)


def test_raft_large_random_weights_odd_size():
    torchvision_or_skip()
    raft = RaftFlow("raft_large", weights=None, device="cpu", iters=1)
    out = raft(frames(1, 133, 37), frames(1, 133, 37, seed=2))
    assert out.shape == (1, 37, 133, 2) and np.isfinite(out).all()


def test_raft_weights_from_path_and_from_torchvision_cache(tmp_path, monkeypatch):
    tv = torchvision_or_skip()
    model = tv.models.optical_flow.raft_small(weights=None)
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    a, b = frames(1, 64, 48), frames(1, 64, 48, seed=3)
    expected = RaftFlow.from_model(model, iters=2)(a, b)
    from_path = RaftFlow("raft_small", weights=path, device="cpu", iters=2)
    np.testing.assert_allclose(from_path(a, b), expected, atol=1e-5)
    # the default weights are torchvision's file in TORCH_HOME/hub/checkpoints
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    name = tv.models.optical_flow.Raft_Small_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cached)
    default = RaftFlow("raft_small", device="cpu", iters=2)
    assert default.weights_path == cached
    np.testing.assert_allclose(default(a, b), expected, atol=1e-5)


def test_missing_weights_fail_explicitly_and_fall_back_in_auto(tmp_path, monkeypatch):
    torchvision_or_skip()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("NEURAL_ATLAS_DOWNLOAD_WEIGHTS", raising=False)
    with pytest.raises(WeightsUnavailable, match=r"raft_large_C_T_SKHT_V2.*--flow-weights") as e:
        RaftFlow("raft_large")
    assert str(tmp_path / "empty_home") in str(e.value) and isinstance(e.value, ConfigError)
    clip = Clip(frames=frames(2, 32, 24), source="random")
    with pytest.raises(WeightsUnavailable, match="not found"):
        compute_flow(clip, method="raft_small")
    with pytest.warns(UserWarning, match="RAFT unavailable, using DIS.*not found"):
        fs = compute_flow(clip, method="auto", device="cuda")
    assert fs.method == "dis"
    with pytest.raises(WeightsUnavailable, match="nope.pth.*--flow-weights"):
        RaftFlow("raft_small", weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="cannot read"):
        RaftFlow("raft_small", weights=bad)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsUnavailable, match="does not hold raft_small"):
        RaftFlow("raft_small", weights=other)
