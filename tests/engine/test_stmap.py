"""Per-frame STMap / residual EXR maps: convention, values against the bake, orientation, writers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from backend.edit import load_bake
from backend.errors import OutputError
from backend.export import stmap as stmap_mod
from backend.export.atlas import sample_atlas
from backend.export.stmap import read_exr, stmap_from_uv, uv_from_stmap, write_exr
from backend.pipeline import decompose, rerender, write_maps
from backend.synthetic import make_synthetic_clip

from .test_train import tiny_config

pytest.importorskip("OpenEXR", reason="the OpenEXR package (a dependency) writes and reads the maps")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dec(tmp_path_factory):
    """A tiny decomposition with the default export.maps = "working": source 64x40, working 32x20."""
    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("stmap")
    scene = make_synthetic_clip(width=64, height=40, n_frames=4, seed=5)
    cfg = tiny_config(iterations=6).replace(export={"atlas_size": 24}, clip={"long_edge": 32})
    return decompose(scene.write(base / "clip"), base / "dec", cfg)


def test_worked_example_of_the_convention():
    """docs/atlas.md's example: S = 8, texel (row 2, col 5)."""
    S, row, col = 8, 2, 5
    u, v = -1 + (2 * col + 1) / S, -1 + (2 * row + 1) / S  # 0.375, -0.375
    st = stmap_from_uv(np.array([[[u, v]]], np.float32), np.array([[0.5]], np.float32))[0, 0]
    assert st.tolist() == [0.6875, 0.6875, 0.0, 0.5]
    assert st[0] * S - 0.5 == col and (1 - st[1]) * S - 0.5 == row
    assert np.allclose(uv_from_stmap(st), [u, v])


def test_maps_hold_the_bake_exactly(dec):
    bake = load_bake(dec)
    meta = json.loads((dec / "maps" / "meta.json").read_text())
    F_, H, W = bake.meta["frames"], bake.meta["height"], bake.meta["width"]
    assert (meta["frames"], meta["width"], meta["height"], meta["resolution"]) == (F_, W, H, "working")
    assert meta["colour"] == "raw encoded plate values, load every map as Non-Color"
    assert [l["atlas_size"] for l in meta["layers"]] == [a.shape[0] for a in bake.atlases]
    assert [l["kind"] for l in meta["layers"]] == ["object", "background"]
    assert meta["stmap"] == "layer_{layer}/stmap.%05d.exr"
    rep = json.loads((dec / "report.json").read_text())
    assert rep["outputs"]["maps"] == {"working": "maps"}
    for i in range(bake.n_layers):
        files = sorted(p.name for p in (dec / "maps" / f"layer_{i}").iterdir())
        assert files == [f"residual.{f:05d}.exr" for f in range(F_)] + [f"stmap.{f:05d}.exr" for f in range(F_)]
        for f in range(F_):
            st = read_exr(dec / "maps" / f"layer_{i}" / f"stmap.{f:05d}.exr")
            uv = np.asarray(bake.uv(i)[f])
            assert st.shape == (H, W, 4) and st.dtype == np.float32
            assert np.array_equal(st[..., 0], (uv[..., 0] + np.float32(1)) * np.float32(0.5))  # R = s
            assert np.array_equal(st[..., 1], (np.float32(1) - uv[..., 1]) * np.float32(0.5))  # G = t
            assert not st[..., 2].any()
            assert np.array_equal(st[..., 3], np.asarray(bake.alpha(i)[f], np.float32))  # A = the bake's alpha
            res = read_exr(dec / "maps" / f"layer_{i}" / f"residual.{f:05d}.exr")
            assert res.shape == (H, W, 3) and np.array_equal(res, np.asarray(bake.residual(i)[f], np.float32))


def test_map_uv_lookup_of_the_atlas_image_is_the_renderers_sample(dec):
    """What Blender's Map UV / Nuke's STMap do with (s, t) - bilinear lookup at pixel
    (s * S - 0.5, t * S - 0.5) of the image stored bottom row first - is sample_atlas at uv."""
    bake = load_bake(dec)
    atlas = torch.from_numpy(bake.atlases[0])
    S = atlas.shape[0]
    st = torch.from_numpy(read_exr(dec / "maps" / "layer_0" / "stmap.00002.exr"))
    bottom_up = atlas.flip(0).permute(2, 0, 1)[None]  # image.pixels order: row 0 = bottom
    x, y = st[..., 0] * S - 0.5, st[..., 1] * S - 0.5  # pixel coordinates from the bottom-left
    grid = torch.stack([(x + 0.5) / S * 2 - 1, (y + 0.5) / S * 2 - 1], -1)[None]
    looked_up = F.grid_sample(bottom_up, grid, mode="bilinear", padding_mode="border",
                              align_corners=False)[0].permute(1, 2, 0)
    expected = sample_atlas(atlas, torch.from_numpy(np.array(bake.uv(0)[2])))
    assert torch.allclose(looked_up, expected, atol=1e-5)


def test_source_resolution_maps_and_maps_from_the_checkpoint(dec):
    res = subprocess.run([sys.executable, "-m", "backend", "render", str(dec), "--maps", "--resolution", "source",
                          "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    meta = json.loads((dec / "maps_source" / "meta.json").read_text())
    assert (meta["width"], meta["height"], meta["resolution"]) == (64, 40, "source")
    bake = load_bake(dec)
    # the source-resolution edit render's upsampling of the bake (EditRenderer._maps)
    from backend.edit.fused import upsample_maps
    uv, a, r = upsample_maps(torch.from_numpy(np.asarray(bake.uv(0)[1]))[None],
                             torch.from_numpy(np.asarray(bake.alpha(0)[1], np.float32))[None],
                             torch.from_numpy(np.asarray(bake.residual(0)[1], np.float32))[None], (40, 64))
    st = read_exr(dec / "maps_source" / "layer_0" / "stmap.00001.exr")
    assert np.array_equal(st, stmap_from_uv(uv[0].numpy(), a[0].numpy()))
    assert np.array_equal(read_exr(dec / "maps_source" / "layer_0" / "residual.00001.exr"),
                          r[0].half().float().numpy())
    assert json.loads((dec / "report.json").read_text())["outputs"]["maps"] == {"working": "maps",
                                                                                 "source": "maps_source"}
    # without the bake the maps come from the checkpoint: the same numbers
    before = read_exr(dec / "maps" / "layer_1" / "stmap.00003.exr")
    for p in (dec / "bake").glob("layer_*.npy"):
        p.rename(p.with_suffix(".hidden"))
    try:
        write_maps(dec, "working")
    finally:
        for p in (dec / "bake").glob("layer_*.hidden"):
            p.rename(p.with_suffix(".npy"))
    assert np.array_equal(read_exr(dec / "maps" / "layer_1" / "stmap.00003.exr"), before)


def test_no_maps_removes_stale_ones_and_a_missing_writer_is_explained(dec, monkeypatch):
    rerender(dec, maps="none")
    assert not (dec / "maps").exists() and not (dec / "maps_source").exists()
    assert (dec / "bake" / "layer_0_uv.npy").exists()
    monkeypatch.setattr(stmap_mod, "exr_library", lambda: None)
    with pytest.raises(OutputError, match=r"EXR writer.*pip install OpenEXR"):
        write_maps(dec)
    assert not (dec / "maps").exists()
    import backend.export.outputs as outputs
    monkeypatch.setattr(outputs, "exr_library", lambda: None)
    rerender(dec, maps="working")  # the export goes on and says how to add the maps
    rep = json.loads((dec / "report.json").read_text())
    assert rep["outputs"]["maps"] == {} and "render" in rep["outputs"]["maps_note"]
    monkeypatch.undo()
    write_maps(dec)
    assert (dec / "maps" / "meta.json").exists()


def test_opencv_writer_matches_when_available(tmp_path):
    """OpenCV's EXR codec (where the build has one) writes the same channels, in RGB(A) order."""
    import os
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    import cv2
    if not cv2.haveImageWriter("x.exr"):
        pytest.skip(f"OpenCV {cv2.__version__} has no EXR codec")
    rng = np.random.default_rng(0)
    st = stmap_from_uv(rng.random((5, 7, 2), np.float32) * 2 - 1, rng.random((5, 7), np.float32))
    write_exr(tmp_path / "a.exr", st, False, "opencv")
    assert np.array_equal(read_exr(tmp_path / "a.exr"), st)  # read with OpenEXR: R = s, A = alpha
    r = (rng.random((5, 7, 3)) + 0.5).astype(np.float16)
    write_exr(tmp_path / "r.exr", r, True, "opencv", "piz")
    assert np.array_equal(read_exr(tmp_path / "r.exr"), r.astype(np.float32))
