"""export.atlas_size = 0: the atlas sized from the trained mapping (one texel per visible pixel)."""

import json
import math

import numpy as np
import pytest
import torch

from backend.clip import read_image, write_png16_rgba
from backend.config import preset
from backend.edit import EditRenderer, load_bake
from backend.errors import ConfigError
from backend.export.atlas import (AUTO_ATLAS_MAX, AUTO_ATLAS_MIN, pixel_footprints,
                                  size_for_footprints)
from backend.export.outputs import auto_atlas_size
from backend.pipeline import decompose
from backend.preprocess.flow import compute_flow
from backend.synthetic import make_synthetic_clip
from backend.train import Trainer

from .test_train import tiny_clip, tiny_config


def linear_map(h, w, jac, alpha_box=None):
    """uv = J @ (x, y) + offset for every pixel, alpha 1 inside ``alpha_box`` (y0, y1, x0, x1)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    J = torch.tensor(jac, dtype=torch.float32)
    uv = torch.stack([J[0, 0] * xs + J[0, 1] * ys, J[1, 0] * xs + J[1, 1] * ys], -1) - 0.3
    alpha = torch.zeros(h, w)
    y0, y1, x0, x1 = alpha_box or (0, h, 0, w)
    alpha[y0:y1, x0:x1] = 1.0
    return uv, alpha


def test_footprints_and_size_of_known_linear_maps():
    # layer 0: 0.002 uv per px -> 1000 texels for one per pixel; layer 1 anisotropic and rotated
    uv0, a0 = linear_map(40, 60, [[0.002, 0.0], [0.0, 0.002]], (5, 30, 10, 50))
    c, s = math.cos(0.4), math.sin(0.4)
    uv1, a1 = linear_map(40, 60, [[0.002 * c, -0.001 * s], [0.002 * s, 0.001 * c]], (0, 40, 0, 20))
    f0, f1 = pixel_footprints(uv0, a0), pixel_footprints(uv1, a1)
    # inside the box only, less the last row and column (forward differences need alpha there too)
    assert f0.numel() == 24 * 39 and f1.numel() == 39 * 19
    assert torch.allclose(f0, torch.full_like(f0, 4e-6), rtol=1e-3)
    size, per_layer = size_for_footprints([f0, f1])
    assert per_layer[0] == pytest.approx(1000, rel=1e-3)
    assert per_layer[1] == pytest.approx(2 / math.sqrt(2e-6), rel=1e-3)  # 1414.2
    assert size == 1424  # the larger, rounded up to a multiple of 16


def test_size_bounds_unseen_layers_and_edges():
    uv, a = linear_map(30, 30, [[0.2, 0.0], [0.0, 0.2]])  # 10 texels: clamped up
    assert size_for_footprints([pixel_footprints(uv, a)])[0] == AUTO_ATLAS_MIN
    uv, a = linear_map(30, 30, [[1e-5, 0.0], [0.0, 1e-5]])
    assert size_for_footprints([pixel_footprints(uv, a)])[0] == AUTO_ATLAS_MAX
    empty = pixel_footprints(uv, torch.zeros(30, 30))
    assert empty.numel() == 0
    assert size_for_footprints([empty, empty]) == (AUTO_ATLAS_MIN, [None, None])
    # a fold (uv jumps) at the layer's edge does not move the median
    uv, a = linear_map(40, 40, [[0.002, 0.0], [0.0, 0.002]])
    uv[:, 20:] += 0.5
    assert size_for_footprints([pixel_footprints(uv, a)])[1][0] == pytest.approx(1000, rel=1e-3)
    # subsampling keeps at most max_samples values
    assert pixel_footprints(uv, a, max_samples=100).numel() <= 100


def test_auto_size_of_the_initial_mapping():
    """Pretrained towards uv = s * xy (xy in [-1, 1] over the long edge), a layer needs rez / s texels."""
    clip = tiny_clip(n_frames=4, h=32, w=48)
    cfg = tiny_config(pretrain_iterations=150)
    tr = Trainer(clip, compute_flow(clip), cfg, torch.device("cpu"))
    tr.pretrain()
    sizes, per_layer = auto_atlas_size(tr.model, tr.geom)
    # alpha is not trained yet: the object layer is nowhere above 0.5, the background everywhere
    assert per_layer[0] is None
    assert per_layer[1] == pytest.approx(48 / tr.model.uv_scales[1], rel=0.15)  # 0.6 -> 80 texels
    assert sizes == [AUTO_ATLAS_MIN, AUTO_ATLAS_MIN]  # each layer its own size; this clip is tiny


def test_atlas_size_validation_and_presets():
    assert preset("fast").export.atlas_size == 0 and preset("quality").export.atlas_size == 0
    assert preset("seed").export.atlas_size == 1000 and preset("demo").export.atlas_size == 256
    for bad in (-1, 8, 20000):
        with pytest.raises(ConfigError, match="export.atlas_size"):
            preset("seed").replace(export={"atlas_size": bad}).validate()


def test_decompose_with_per_layer_auto_atlas_sizes(tmp_path, monkeypatch):
    """Each layer gets its own automatic size S_i; the atlases, bake, maps and report carry it, the
    edit renderer takes each layer's edit at its own size (another size is resampled), and
    paint-frame writes each layer's edit image at its own size."""
    from backend.edit.paint import paint_frame
    from backend.export import atlas as atlas_mod
    monkeypatch.setattr(atlas_mod, "AUTO_ATLAS_MIN", 16)  # a tiny clip's own sizes, not the 1000 floor
    scene = make_synthetic_clip(width=48, height=32, n_frames=5, seed=2)
    cfg = tiny_config(iterations=10).replace(export={"atlas_size": 0}, model={"uv_init": "fit"})
    out = decompose(scene.write(tmp_path / "clip"), tmp_path / "dec", cfg)
    rep = json.loads((out / "report.json").read_text())
    sizes = rep["atlas_sizes"]
    assert len(sizes) == 2 and sizes[0] != sizes[1] and rep["atlas_size"] == max(sizes)
    assert all(v % 16 == 0 and 16 <= v <= AUTO_ATLAS_MAX for v in sizes)
    assert len(rep["atlas_size_auto"]) == 2 and all(v is None or v > 0 for v in rep["atlas_size_auto"])
    assert [l["atlas_size"] for l in rep["layers"]] == sizes
    assert all(0.0 <= l["coverage"]["width"] <= 1.0 for l in rep["layers"])
    bake = load_bake(out)
    assert bake.meta["atlas_sizes"] == sizes
    for i, S in enumerate(sizes):
        assert bake.atlases[i].shape == (S, S, 3) and bake.seen[i].shape == (S, S)
        assert read_image(out / "atlas" / f"layer_{i}.png").shape == (S, S, 4)
    maps = json.loads((out / "maps" / "meta.json").read_text())
    assert [l["atlas_size"] for l in maps["layers"]] == sizes
    # an edit per layer at its own size changes frames; layer 0's edit at layer 1's size is resampled
    edits = {}
    for i, S in enumerate(sizes):
        img = np.zeros((S, S, 4), np.float32)
        img[..., :3], img[..., 3] = [1.0, 0.0, 1.0], 1.0
        edits[i] = write_png16_rgba(tmp_path / f"edit_{i}.png", img)
    r = EditRenderer(out, edits)
    assert [r.deltas[i].shape[:2] for i in (0, 1)] == [(S, S) for S in sizes]
    assert not np.array_equal(r.frame(2), r.frame(2, edited=False))
    # the exported atlas handed back changes nothing
    r = EditRenderer(out, {1: out / "atlas" / "layer_1.png"})
    assert all(np.array_equal(r.frame(f), r.frame(f, edited=False)) for f in (0, 4))
    wrong = EditRenderer(out, {0: edits[1]})
    assert wrong.deltas[0].shape[:2] == (sizes[0], sizes[0])
    # painting on a frame: each layer's edit image at its own size
    paint = np.zeros((32, 48, 4), np.float32)
    paint[..., :3], paint[..., 3] = [0.0, 1.0, 0.0], 1.0
    res = paint_frame(out, 1, paint, out_edits=tmp_path / "painted")
    for i, S in enumerate(sizes):
        if str(i) in res["layers"]:
            assert res["layers"][str(i)]["atlas_size"] == S
            assert read_image(tmp_path / "painted" / f"layer_{i}.png").shape == (S, S, 4)
