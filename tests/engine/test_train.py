"""Model structure, the training step and exact checkpoint/resume."""

import json

import numpy as np
import pytest
import torch

from backend.clip import Clip
from backend.config import GridConfig, preset
from backend.errors import Cancelled, CheckpointError
from backend.model import LayeredModel, hierarchical_alpha
from backend.preprocess.flow import compute_flow
from backend.progress import CancelToken
from backend.train import Trainer, load_checkpoint, read_meta, save_checkpoint

TINY_GRID = GridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.5)


def tiny_config(**train):
    cfg = preset("demo")
    t = {"iterations": 6, "batch_size": 256, "pretrain_iterations": 1, "pretrain_batch_size": 256,
         "checkpoint_every": 3, "log_every": 10}
    t.update(train)
    return cfg.replace(model={"mapping_width": 16, "texture_width": 16, "residual_width": 16, "alpha_width": 16,
                              "texture_grid": vars(TINY_GRID), "xyt_grid": vars(TINY_GRID)},
                       train=t, losses={"global_rigidity_stop": 3, "alpha_bootstrapping_stop": 4})


def tiny_clip(n_frames=4, h=16, w=24, objects=1):
    rng = np.random.default_rng(0)
    frames = rng.random((n_frames, h, w, 3)).astype(np.float32)
    masks = np.zeros((n_frames, h, w, objects), np.float32)
    for f in range(n_frames):
        masks[f, 4:10, 3 + f:9 + f, 0] = 1
    return Clip(frames, masks, [f"o{k}" for k in range(objects)], source="tiny")


def test_hierarchical_alpha_partition_of_unity():
    a = torch.rand(50, 3)
    alpha = hierarchical_alpha(a)
    assert alpha.shape == (50, 4)
    assert torch.allclose(alpha.sum(1), torch.ones(50), atol=4e-5)
    assert torch.allclose(alpha[:, 0], a[:, 0].clamp(1e-5, 1 - 1e-5))
    assert torch.allclose(alpha[:, 3], ((1 - a).prod(1)).clamp(1e-5, 1 - 1e-5))


def test_model_layout_and_param_groups():
    cfg = preset("seed").model
    m = LayeredModel(2, cfg)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    # method.md 1.4: mapping 133,122; texture 452,128 + 10,627; residual 907,424 + 10,627; alpha 907,424 + 10,497
    assert n(m.mappings[0]) == 133_122
    assert n(m.textures[0]) == 452_128 + 10_627
    assert n(m.residuals[0]) == 907_424 + 10_627
    assert n(m.alpha_net) == 907_424 + 10_497
    groups = m.param_groups(1e-2, 1e-4, 3e-4)
    assert [g["lr"] for g in groups] == [1e-2, 1e-4, 3e-4]
    assert [g["name"] for g in groups] == ["grid", "mlp", "mapping"]
    assert sum(p.numel() for p in groups[0]["params"]) == 2 * (452_128 + 907_424) + 907_424
    assert sum(p.numel() for p in groups[2]["params"]) == 2 * 133_122
    assert sum(p.numel() for g in groups for p in g["params"]) == n(m)
    assert [g["lr"] for g in m.param_groups(1e-2, 1e-4)] == [1e-2, 1e-4, 1e-4]  # the seed: one MLP rate
    assert m.uv_scales == [0.9, 0.6]


def test_render_composite_matches_formula():
    m = LayeredModel(3, tiny_config().model)
    xyt = torch.rand(40, 3) * 2 - 1
    r = m.render(xyt)
    manual = sum(r.rgb[i] * r.residual[i] * r.alpha[:, i:i + 1] for i in range(3))
    assert torch.allclose(r.color, manual)
    assert all(u.abs().max() < 1 for u in r.uv)
    assert (torch.stack(r.residual) > 0).all()


def test_single_layer_without_masks_trains():
    clip = tiny_clip()
    clip.masks, clip.mask_names = None, []
    tr = Trainer(clip, None, tiny_config(iterations=2), torch.device("cpu"))
    assert tr.n_layers == 1
    losses = tr.step(1)
    assert "sparsity" not in losses and "rgb" in losses
    assert all(torch.isfinite(v) for v in losses.values())


def test_step_has_every_loss_of_the_method():
    clip = tiny_clip()
    flow = compute_flow(clip)
    tr = Trainer(clip, flow, tiny_config(), torch.device("cpu"))
    names = set(tr.compute_losses(1))
    expected = {"rgb", "gradient", "sparsity", "alpha_bootstrapping", "alpha_reg", "flow_alpha"}
    for i in range(2):
        expected |= {f"optical_flow_{i}", f"rigidity_{i}", f"global_rigidity_{i}", f"residual_reg_{i}",
                     f"residual_consistent_{i}"}
    assert names == expected
    later = set(tr.compute_losses(10))  # past the bootstrapping and global-rigidity stops
    assert later == expected - {"alpha_bootstrapping", "global_rigidity_0", "global_rigidity_1"}


def _params(tr):
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


def test_cosine_schedule_shape_and_applied_rates():
    cfg = tiny_config(iterations=100, lr_schedule="cosine", lr_decay_start=0.5, lr_final_factor=0.1,
                      grid_lr=1e-2, mlp_lr=1e-3, mapping_lr=2e-4)
    tr = Trainer(tiny_clip(), None, cfg, torch.device("cpu"))
    k = [tr.lr_factor(i) for i in range(1, 101)]
    assert k[:50] == [1.0] * 50  # constant up to lr_decay_start * iterations
    assert all(a > b for a, b in zip(k[50:], k[51:]))  # then strictly decreasing
    assert abs(k[74] - 0.55) < 1e-12 and abs(k[99] - 0.1) < 1e-12  # half-way: the mean; the end: final
    assert tr.lr_factor(10_000) == pytest.approx(0.1)  # past the horizon it stays at the final rate
    tr.step(75)
    assert [g["lr"] for g in tr.optimizer.param_groups] == pytest.approx([1e-2 * 0.55, 1e-3 * 0.55, 2e-4 * 0.55])
    assert [g["name"] for g in tr.optimizer.param_groups] == ["grid", "mlp", "mapping"]
    seed = Trainer(tiny_clip(), None, tiny_config(iterations=100), torch.device("cpu"))
    assert {seed.lr_factor(i) for i in (1, 60, 100)} == {1.0}  # the seed's schedule is constant


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_continues_bit_for_bit(tmp_path, schedule):
    torch.set_num_threads(1)
    clip = tiny_clip()
    flow = compute_flow(clip)
    cfg = tiny_config(iterations=6, checkpoint_every=3, lr_schedule=schedule, lr_decay_start=0.3)
    straight = Trainer(clip, flow, cfg, torch.device("cpu"))
    straight.train()
    a = _params(straight)

    first = Trainer(clip, flow, cfg, torch.device("cpu"))
    first.train(iterations=3, checkpoint_dir=tmp_path / "ck")
    meta = read_meta(tmp_path / "ck")
    assert meta["iteration"] == 3 and len(list((tmp_path / "ck").glob("ckpt_*.safetensors"))) == 1
    second = Trainer(clip, flow, cfg, torch.device("cpu"))
    assert load_checkpoint(tmp_path / "ck", second) == 3
    second.train(checkpoint_dir=tmp_path / "ck")
    b = _params(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_meta(tmp_path / "ck")["iteration"] == 6
    # the checkpoint holds no pickle: it is safetensors + JSON
    assert json.loads((tmp_path / "ck" / "latest.json").read_text())["tensors"].endswith(".safetensors")


def test_checkpoint_refuses_other_model(tmp_path):
    clip = tiny_clip()
    tr = Trainer(clip, None, tiny_config(), torch.device("cpu"))
    save_checkpoint(tmp_path, tr)
    other = Trainer(clip, None, tiny_config().replace(model={"mapping_width": 32}), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="model"):
        load_checkpoint(tmp_path, other)
    (tmp_path / json.loads((tmp_path / "latest.json").read_text())["tensors"]).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path, tr)


def test_checkpoint_resumes_across_mlp_backends(tmp_path):
    """model.mlp_backend changes how the MLPs are evaluated, not the model: a run resumes across it
    (and a checkpoint written before the field existed still loads)."""
    clip = tiny_clip()
    tr = Trainer(clip, None, tiny_config(), torch.device("cpu"))
    save_checkpoint(tmp_path, tr)
    meta_path = tmp_path / "latest.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["model"]["mlp_backend"]
    meta_path.write_text(json.dumps(meta))
    other = Trainer(clip, None, tiny_config().replace(model={"mlp_backend": "compile"}), torch.device("cpu"))
    assert load_checkpoint(tmp_path, other) == 0


def test_cancel_saves_a_checkpoint_and_raises(tmp_path):
    clip = tiny_clip()
    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p.iteration)
        if p.iteration >= 2:
            token.cancel("stop")

    tr = Trainer(clip, None, tiny_config(iterations=50, log_every=10), torch.device("cpu"),
                 progress=progress, cancel=token)
    with pytest.raises(Cancelled):
        tr.train(checkpoint_dir=tmp_path)
    it = read_meta(tmp_path)["iteration"]
    assert 2 <= it < 50
