"""Edit lifetime: per-frame opacity of an edit layer, in the renderer, the fused pass and the CLI."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and importlib.util.find_spec("triton") is not None and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

from backend.edit import EditRenderer  # noqa: E402
from backend.edit.apply import parse_opacity  # noqa: E402
from backend.edit.fused import composite_delta, composite_delta_torch, triton  # noqa: E402
from backend.errors import ConfigError  # noqa: E402
from backend.pipeline import decompose  # noqa: E402
from backend.synthetic import make_synthetic_clip, paint_disc  # noqa: E402

from .test_train import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_parse_opacity_forms_and_messages():
    o = parse_opacity({"0": [0.0, 0.25, 1], 1: {"2": 0.5}}, n_layers=2, n_frames=3)
    assert o[0].tolist() == [0.0, 0.25, 1.0] and o[1].tolist() == [1.0, 1.0, 0.5]
    assert parse_opacity(None, 2, 3) == {}
    cases = [({"0": [1, 1]}, r"layer 0 has 2 values; the shot has 3 frames"),
             ({"0": [1, 1.5, 1]}, r"layer 0 at frame 1 is 1.5; opacity must be a number in \[0, 1\]"),
             ({"0": [1, float("nan"), 1]}, r"frame 1 is nan"),
             ({"0": {"1": -0.1}}, r"frame 1 is -0.1"),
             ({"0": [1, True, 1]}, r"frame 1 is True"),
             ({"2": [1, 1, 1]}, r"names layer 2; this decomposition has layers 0..1 \(fg, background\)"),
             ({"x": [1, 1, 1]}, r"layer keys must be layer indices, got 'x'"),
             ({"0": {"3": 1}}, r"names frame 3; the shot has frames 0..2"),
             ({"0": 0.5}, r"must be a list of 3 values"),
             ([1, 2], r"must map layer indices")]
    for spec, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            parse_opacity(spec, 2, 3, ["fg", "background"])


def _inputs(n, H, W, S, seed):
    g = torch.Generator().manual_seed(seed)
    frame = torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8)
    uv = torch.rand(n, H, W, 2, generator=g) * 2 - 1
    alpha = torch.rand(n, H, W, generator=g).half()
    res = (torch.rand(n, H, W, 3, generator=g) * 1.5).half()
    deltas = torch.randn(n, S, S, 3, generator=g) * 0.3
    return frame, uv, alpha, res, deltas


def test_torch_composite_opacity_scales_each_layers_delta():
    frame, uv, alpha, res, deltas = _inputs(2, 9, 13, 16, 1)
    o = torch.tensor([0.25, 0.0])
    scaled = torch.stack([alpha[0].float() * 0.25, torch.zeros_like(alpha[1].float())])
    assert torch.equal(composite_delta_torch(frame, uv, alpha, res, deltas, o),
                       composite_delta_torch(frame, uv, scaled, res, deltas))
    assert torch.equal(composite_delta_torch(frame, uv, alpha, res, deltas, torch.zeros(2)), frame)
    assert torch.equal(composite_delta_torch(frame, uv, alpha, res, deltas, torch.ones(2)),
                       composite_delta_torch(frame, uv, alpha, res, deltas))


@pytest.mark.skipif(triton is None, reason="triton is not installed: the fused kernel is untested here")
def test_fused_kernel_applies_the_opacity():
    frame, uv, alpha, res, deltas = _inputs(2, 8, 24, 16, 2)
    dev = torch.device("cuda" if CUDA else "cpu")
    frame, uv, alpha, res, deltas = (t.to(dev) for t in (frame, uv, alpha, res, deltas))
    for o in ([0.3, 1.0], [0.0, 0.0], [1.0, 0.6]):
        ot = torch.tensor(o)
        ref = composite_delta_torch(frame, uv, alpha, res, deltas, ot.to(dev))
        got = composite_delta(frame, uv, alpha, res, deltas, block=64, opacity=ot)
        assert (got.int() - ref.int()).abs().max().item() <= 1
    assert torch.equal(composite_delta(frame, uv, alpha, res, deltas, block=64, opacity=torch.zeros(2)), frame)


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("opacity")
    scene = make_synthetic_clip(width=40, height=24, n_frames=5, seed=6)
    cfg = tiny_config(iterations=6).replace(export={"atlas_size": 32, "maps": "none"})
    out = decompose(scene.write(base / "clip"), base / "dec", cfg)
    # a half-covering wash over the whole atlas: every pixel changes, none clips
    edit = paint_disc(np.zeros((32, 32, 4), np.float32), (0.0, 0.0), 30.0, (0.6, 0.3, 0.5, 0.5))
    return out, edit


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_rendered_opacity_is_the_curve(painted, mode):
    out, edit = painted
    curve = [0.0, 0.25, 0.5, 1.0, 0.0]
    full = EditRenderer(out, {1: edit}, mode=mode)
    faded = EditRenderer(out, {1: edit}, mode=mode, opacity={"1": curve})
    sparse = EditRenderer(out, {1: edit}, mode=mode, opacity={"1": {"0": 0.0, "4": 0.0}})  # others 1
    base = EditRenderer(out, {}, mode=mode)
    for f, o in enumerate(curve):
        plate = base.frame(f)
        inside = (full.frame(f) > 0) & (full.frame(f) < 1)
        got, want = faded.frame(f) - plate, full.frame(f) - plate
        assert np.abs(want[inside]).max() > 0.01
        assert np.allclose(got[inside], o * want[inside], atol=2e-6), (f, o)
        assert np.array_equal(sparse.frame(f), plate if f in (0, 4) else full.frame(f))
    assert np.array_equal(faded.frame(0), base.frame(0)) and np.array_equal(faded.frame(4), base.frame(4))


def test_cli_opacity_file(painted, tmp_path):
    out, edit = painted
    from backend.clip import write_png16_rgba
    e = write_png16_rgba(tmp_path / "e.png", edit)
    ok = tmp_path / "o.json"
    ok.write_text(json.dumps({"1": [1, 0, 0, 0, 0]}))
    res = subprocess.run([sys.executable, "-m", "backend", "edit", str(out), "--layer", f"1={e}", "--opacity", str(ok),
                          "--out", str(tmp_path / "r"), "--format", "png", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["opacity_layers"] == [1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": [1, 0]}))
    res = subprocess.run([sys.executable, "-m", "backend", "edit", str(out), "--layer", f"1={e}", "--opacity", str(bad),
                          "--out", str(tmp_path / "r2"), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "has 2 values; the shot has 5 frames" in res.stderr
    assert not (tmp_path / "r2").exists()
