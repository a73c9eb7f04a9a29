"""model.uv_init = "fit": atlases fitted to their layer (backend/train/uvfit.py, docs/atlas.md)."""

import numpy as np
import pytest
import torch

from backend import losses as L
from backend.config import preset
from backend.errors import ConfigError
from backend.preprocess.flow import compute_flow
from backend.synthetic import make_synthetic_clip
from backend.train import Trainer, load_checkpoint, save_checkpoint
from backend.train.data import TrainingData
from backend.train.uvfit import OBJECT_FILL, fit_init, seed_init

from .test_train import tiny_config


@pytest.fixture
def one_thread():
    """The tiny networks here run ~30x faster on one thread than on two on a loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def span(uv: torch.Tensor) -> tuple[float, float]:
    """Fraction of the atlas's width and height (uv in [-1, 1]) that points (n, 2) span."""
    return tuple(float(uv[:, k].max() - uv[:, k].min()) / 2 for k in (0, 1))


def test_fit_targets_on_the_synthetic_clip():
    scene = make_synthetic_clip(width=64, height=36, n_frames=8, seed=0)
    clip = scene.clip
    data = TrainingData(clip, compute_flow(clip), torch.device("cpu"))
    g = data.geometry
    fit = fit_init(data.targets, data.flow_fw, data.ok_fw, g.width, g.height, 0.9, 0.6)
    seed = seed_init(2, g.n_frames, 0.9, 0.6)
    ys, xs = torch.meshgrid(torch.arange(g.height).float(), torch.arange(g.width).float(), indexing="ij")

    def targets(init, layer):
        pts = []
        for f in range(g.n_frames):
            m = data.targets[f, ..., layer]
            xy = g.xyt(xs[m], ys[m], torch.zeros(int(m.sum())))[:, :2]
            pts.append(init.target(layer, xy, f))
        return torch.cat(pts)

    w, h = span(targets(fit, 0))
    assert w >= 0.6 and max(w, h) == pytest.approx(OBJECT_FILL, abs=0.06)  # the object fills its atlas
    assert fit.scales[0] > 2 * seed.scales[0]  # magnified: the seed's object spans its share of the frame
    # the background's panorama over the camera's pan fits the atlas, larger than the seed's
    bw, bh = span(targets(fit, 1))
    assert 0.8 <= max(bw, bh) <= 0.95 and bw > span(targets(seed, 1))[0]
    # one scene point keeps its target uv over the shot (per-frame centring / the camera's motion)
    for layer, tol in ((0, 0.12), (1, 0.05)):
        c = np.array([g.width / 2, g.height / 2])
        tex = scene.unproject(layer, c[None], 0)
        if layer == 0:  # a point of the object: its texture point at the mask's centroid in frame 0
            yy, xx = np.nonzero(clip.mask_data[0, ..., 0] > 0.5)
            tex = scene.unproject(0, np.array([[xx.mean(), yy.mean()]]), 0)
        drift = {}
        for name, init in (("fit", fit), ("seed", seed)):
            uvs = []
            for f in range(g.n_frames):
                p = torch.from_numpy(scene.project(layer, tex, f)).float()
                uvs.append(init.target(layer, g.xyt(p[:, 0], p[:, 1], torch.zeros(1))[:, :2], f))
            uvs = torch.cat(uvs)
            drift[name] = float((uvs - uvs[0]).norm(dim=1).max())
        assert drift["fit"] < tol and drift["fit"] < drift["seed"], (layer, drift)


def test_fit_pretraining_fills_the_atlas_and_resumes(tmp_path, one_thread):
    scene = make_synthetic_clip(width=48, height=32, n_frames=4, seed=0)
    clip = scene.clip
    cfg = tiny_config(pretrain_iterations=40, pretrain_batch_size=512, mapping_lr=3e-3).replace(
        model={"uv_init": "fit"})
    tr = Trainer(clip, compute_flow(clip), cfg, torch.device("cpu"))
    tr.pretrain()
    assert tr.model.uv_scales[0] > 1.5 and tr.alpha_weighted_rigidity() == (0,)
    g = tr.geom
    ys, xs = torch.meshgrid(torch.arange(g.height).float(), torch.arange(g.width).float(), indexing="ij")
    with torch.no_grad():
        uv = torch.cat([tr.model.mapping(0, g.xyt(xs[m], ys[m], torch.full((int(m.sum()),), float(f))))
                        for f in range(g.n_frames) for m in [tr.data.targets[f, ..., 0]]])
    assert span(uv)[0] >= 0.6  # the pretrained object fills >= 60 % of its atlas's width
    # the fitted scales go with the checkpoint (the losses measure the mapping in them)
    save_checkpoint(tmp_path / "ck", tr)
    again = Trainer(clip, None, cfg, torch.device("cpu"))
    assert again.model.uv_scales == [0.9, 0.6]
    load_checkpoint(tmp_path / "ck", again)
    assert again.model.uv_scales == tr.model.uv_scales
    # a checkpoint written before model.uv_init existed (trained as "seed") still resumes
    import json
    meta = json.loads((tmp_path / "ck" / "latest.json").read_text())
    del meta["config"]["model"]["uv_init"], meta["uv_scales"]
    (tmp_path / "ck" / "latest.json").write_text(json.dumps(meta))
    old = Trainer(clip, None, tiny_config(pretrain_iterations=40, pretrain_batch_size=512, mapping_lr=3e-3),
                  torch.device("cpu"))
    load_checkpoint(tmp_path / "ck", old)
    assert old.model.uv_scales == [0.9, 0.6]


def test_alpha_weighted_rigidity_and_config():
    g = torch.Generator().manual_seed(0)
    uv, a, b = (torch.rand(64, 2, generator=g) for _ in range(3))
    plain = L.rigidity_loss(uv, a, b, 32, 0.9, 1.0)
    assert torch.allclose(L.rigidity_loss(uv, a, b, 32, 0.9, 1.0, torch.ones(64)), plain)
    w = torch.zeros(64)
    w[:10] = 1.0  # only the points where the layer is seen count
    assert torch.allclose(L.rigidity_loss(uv, a, b, 32, 0.9, 1.0, w),
                          L.rigidity_loss(uv[:10], a[:10], b[:10], 32, 0.9, 1.0))
    assert preset("fast").model.uv_init == "seed"
    with pytest.raises(ConfigError, match="uv_init"):
        preset("seed").replace(model={"uv_init": "magic"}).validate()
