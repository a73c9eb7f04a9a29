"""decompose -> outputs -> edits, on a tiny synthetic shot; CLI errors on bad input."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backend.clip import read_image, write_png, write_png16_rgba
from backend.edit import EditRenderer, load_bake, render_edit
from backend.errors import ConfigError, NeuralAtlasError, OutputError
from backend.pipeline import decompose, prepare_output, rerender
from backend.synthetic import make_synthetic_clip, paint_disc

from .test_train import tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def decomposition(tmp_path_factory):
    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("pipe")
    scene = make_synthetic_clip(width=48, height=32, n_frames=6, seed=3)
    clip_dir = scene.write(base / "clip")
    cfg = tiny_config(iterations=40, checkpoint_every=20).replace(export={"atlas_size": 64})
    out = decompose(clip_dir, base / "dec", cfg)
    return scene, out


def test_outputs_and_report(decomposition):
    scene, out = decomposition
    rep = json.loads((out / "report.json").read_text())
    for key in ("psnr", "psnr_no_residual", "per_frame_psnr", "iterations", "seconds", "device", "layers", "config"):
        assert key in rep
    assert rep["iterations"] == 40 and len(rep["per_frame_psnr"]) == 6
    assert [l["name"] for l in rep["layers"]] == ["object0", "background"]
    assert rep["psnr"] > 10
    # the wall time covers the whole call, export included
    assert rep["total_seconds"] >= rep["seconds"] + rep["export_seconds"] + rep["flow_seconds"] > 0
    # every phase of the call is in the report: loading, flow, the trainer's setup (data on the
    # device, targets), pretraining, training, export
    phases = ("load_seconds", "flow_seconds", "setup_seconds", "pretrain_seconds", "seconds", "export_seconds")
    assert all(rep[k] > 0 for k in phases)
    assert rep["total_seconds"] >= sum(rep[k] for k in phases)
    # and the export's own phases, which account for its whole time (each rounded to 1 ms)
    ex = rep["export_phases"]
    parts = ("atlas_sizing", "atlases", "setup", "frames_device", "frames_waiting", "finish", "bake_flush")
    assert set(ex) == set(parts) | {"workers"} and ex["workers"] >= 2 and ex["frames_device"] > 0
    assert sum(ex[k] for k in parts) == pytest.approx(rep["export_seconds"], abs=0.01)
    for i in range(2):
        atlas = cv2.imread(str(out / "atlas" / f"layer_{i}.png"), cv2.IMREAD_UNCHANGED)
        assert atlas.dtype == np.uint16 and atlas.shape == (64, 64, 4)
        assert atlas[..., 3].max() > 0 and atlas[..., 3].min() == 0  # seen somewhere, not everywhere
    bake = load_bake(out)
    assert bake.uv(0).shape == (6, 32, 48, 2) and bake.alpha(1).dtype == np.float16
    alpha_sum = sum(np.asarray(bake.alpha(i), np.float32) for i in range(2))
    assert np.allclose(alpha_sum, 1.0, atol=2e-3)
    assert (out / "config.toml").exists() and (out / "checkpoints" / "latest.json").exists()
    assert len(list((out / "frames" / "reconstruction").glob("*.png"))) == 6


def test_untouched_pixels_are_bit_exact(decomposition, tmp_path):
    scene, out = decomposition
    bake = load_bake(out)
    S = bake.meta["atlas_size"]
    # paint a disc on the object layer where frame 3 sees it
    uv = np.asarray(bake.uv(0)[3])
    a = np.asarray(bake.alpha(0)[3], np.float32)
    y, x = np.unravel_index(np.argmax(a), a.shape)
    edit = paint_disc(np.zeros((S, S, 4), np.float32), uv[y, x], 3.0, (1.0, 0.0, 1.0))
    path = write_png16_rgba(tmp_path / "e0.png", edit)
    info = render_edit(out, {0: path}, out=tmp_path / "edited", formats=("png",))
    src = sorted((scene_dir(out) / "video_frames").glob("*.png"))
    changed_any = False
    r = EditRenderer(out, {0: path})
    d = r.deltas[0]
    for f in range(6):
        before = cv2.imread(str(src[f]))
        after = cv2.imread(str(Path(info["frames_dir"]) / f"{f:05d}.png"))
        # pixels whose sampled delta is exactly zero (or alpha 0) must be untouched, bit for bit
        from backend.export.atlas import sample_atlas
        uvf = torch.from_numpy(np.array(bake.uv(0)[f]))
        touched = (sample_atlas(d, uvf).abs().sum(-1) > 0).numpy() & (np.asarray(bake.alpha(0)[f]) > 0)
        assert np.array_equal(before[~touched], after[~touched])
        changed_any |= bool((before != after).any())
    assert changed_any


def scene_dir(out):
    return Path(json.loads((out / "clip.json").read_text())["source"])


def test_unchanged_atlas_copy_changes_nothing(decomposition, tmp_path):
    scene, out = decomposition
    # the artist re-saves the exported atlas untouched (RGBA with the atlas's alpha), and an RGB copy
    rgba = read_image(out / "atlas" / "layer_1.png")
    rgb_copy = write_png(tmp_path / "copy.png", read_image(out / "atlas" / "layer_0.png")[..., :3])
    r = EditRenderer(out, {1: out / "atlas" / "layer_1.png", 0: rgb_copy})
    for f in (0, 5):
        assert np.array_equal(r.frame(f), r.frame(f, edited=False))
    # painting on that copy edits: a changed patch in the RGBA copy
    painted = rgba.copy()
    painted[20:30, 20:30, :3] = [0.0, 1.0, 0.0]
    p = write_png16_rgba(tmp_path / "painted.png", painted)
    r2 = EditRenderer(out, {1: p})
    assert (r2.deltas[1].abs().sum(-1) > 0).sum().item() == 100


def test_replace_mode_reconstructs_and_frame_range(decomposition, tmp_path):
    scene, out = decomposition
    rep = json.loads((out / "report.json").read_text())
    r = EditRenderer(out, {}, mode="replace")
    frames = np.stack([r.frame(f) for f in range(6)])
    orig = np.stack([r.frame(f, edited=False) for f in range(6)])
    ps = -10 * np.log10(np.mean((frames - orig) ** 2))
    assert ps > rep["psnr"] - 3  # atlas sampling vs network evaluation: close to the reconstruction
    S = load_bake(out).meta["atlas_size"]
    edit = np.zeros((S, S, 4), np.float32)
    edit[..., :3], edit[..., 3] = 1.0, 1.0  # paint the whole background white
    path = write_png16_rgba(tmp_path / "white.png", edit)
    info = render_edit(out, {1: path}, frame_range=(2, 4), out=tmp_path / "r", formats=("png",))
    src = sorted((scene_dir(out) / "video_frames").glob("*.png"))
    for f in range(6):
        same = np.array_equal(cv2.imread(str(src[f])), cv2.imread(str(Path(info["frames_dir"]) / f"{f:05d}.png")))
        assert same == (f not in (2, 3))


def test_source_resolution_render(decomposition, tmp_path):
    scene, out = decomposition
    r = EditRenderer(out, {}, resolution="source")
    assert r.frame(0).shape == (32, 48, 3)


def test_bad_edit_requests(decomposition, tmp_path):
    scene, out = decomposition
    with pytest.raises(ConfigError, match="layer 5 does not exist"):
        EditRenderer(out, {5: tmp_path / "x.png"})
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="cannot read edit image"):
        EditRenderer(out, {0: tmp_path / "bad.png"})
    with pytest.raises(ConfigError, match="outside"):
        render_edit(out, {}, frame_range=(3, 99), out=tmp_path / "o")


def test_rerender_from_checkpoint(decomposition, tmp_path):
    scene, out = decomposition
    before = json.loads((out / "report.json").read_text())
    rerender(out)
    after = json.loads((out / "report.json").read_text())
    assert after["psnr"] == pytest.approx(before["psnr"], abs=1e-4)
    assert after["iterations"] == before["iterations"]


def test_output_folder_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        prepare_output(blocker)
    with pytest.raises(OutputError, match="not writable"):
        prepare_output(blocker / "sub")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


@pytest.mark.parametrize("case", ["empty", "single", "missing", "masks_mismatch", "range"])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, case):
    src = tmp_path / "clip"
    src.mkdir()
    extra = []
    if case == "single":
        write_png(src / "0.png", np.zeros((8, 8, 3)))
    elif case == "missing":
        src = tmp_path / "nope"
    elif case in ("masks_mismatch", "range"):
        for i in range(3):
            write_png(src / f"{i}.png", np.random.rand(8, 8, 3))
        if case == "masks_mismatch":
            m = tmp_path / "mask"
            m.mkdir()
            write_png(m / "0.png", np.ones((8, 8)))
            extra = ["--masks", str(m)]
        else:
            extra = ["--frames", "5:9"]
    out = tmp_path / "out"
    res = _cli("decompose", str(src), "--out", str(out), "--preset", "demo", *extra)
    assert res.returncode == 2, res.stderr
    assert "error: " in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() or not any(p.name not in (".write-test",) for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGTERM"], ["SIGINT", "SIGINT"]],
                         ids=["ctrl-c", "sigterm", "twice-at-once"])
def test_cli_signal_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, signals):
    """Ctrl-C or SIGTERM mid-training: exit 130 with a checkpoint; running again resumes and
    exports. The same signal twice at once (``timeout`` signals the command, then its process
    group) is one request, not an abort."""
    src = make_synthetic_clip(width=48, height=32, n_frames=6, seed=5).write(tmp_path / "clip")
    out = tmp_path / "dec"
    cmd = [sys.executable, "-m", "backend", "decompose", str(src), "--out", str(out), "--preset", "demo",
           "--device", "cpu", "--iterations", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until training runs
            if line.startswith("[train] it"):
                break
        for name in signals:
            proc.send_signal(getattr(signal, name))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "saving a checkpoint" in err and "Run the same command again" in err and "aborted" not in err
    meta = json.loads((out / "checkpoints" / "latest.json").read_text())
    done = meta["iteration"]
    assert done > 0 and not (out / "report.json").exists()
    # resume with a shorter schedule: no further steps, straight to the export
    res = subprocess.run(cmd[:-1] + ["1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"resumed from checkpoint at iteration {done}" in res.stderr
    assert json.loads((out / "report.json").read_text())["iterations"] == done


def test_export_without_baked_maps_then_render_adds_them(tmp_path):
    """export.bake = false: atlases and report, no per-frame maps; edits say how to add them."""
    scene = make_synthetic_clip(width=48, height=32, n_frames=4, seed=4)
    cfg = tiny_config(iterations=6).replace(export={"atlas_size": 32, "bake": False})
    out = decompose(scene.write(tmp_path / "clip"), tmp_path / "dec", cfg)
    assert (out / "atlas" / "layer_0.png").exists() and (out / "report.json").exists()
    assert not list((out / "bake").glob("layer_*.npy"))
    assert json.loads((out / "bake" / "meta.json").read_text())["maps"] is False
    with pytest.raises(NeuralAtlasError, match=r"without its per-frame maps.*render .* --bake"):
        load_bake(out)
    res = _cli("render", str(out), "--bake", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    bake = load_bake(out)
    assert bake.uv(0).shape == (4, 32, 48, 2) and bake.alpha(1).shape == (4, 32, 48)
    r = EditRenderer(out, {0: out / "atlas" / "layer_0.png"})
    assert np.array_equal(r.frame(2), r.frame(2, edited=False))
    # exporting again without maps removes the stale ones
    rerender(out, bake=False)
    assert not list((out / "bake").glob("layer_*.npy"))
