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


@pytest.mark.parametrize("stencil,groups", [("backward", (9, 7)), ("shared", (7, 5))])
def test_rigidity_stencil_query_groups(stencil, groups):
    """The shared stencil takes the rigidity's neighbours from the gradient loss's p + e_x, p + e_y
    (docs/deviations.md): 2 mapping query groups fewer a step, the same loss of the same outputs."""
    from backend import losses as L
    clip = tiny_clip()
    cfg = tiny_config().replace(losses={"rigidity_stencil": stencil})
    tr = Trainer(clip, compute_flow(clip), cfg, torch.device("cpu"))
    B, rez, lc = cfg.train.batch_size, tr.geom.rez, cfg.losses
    mapping, seen = tr.model.mapping, []

    def spy(i, xyt):
        out = mapping(i, xyt)
        seen.append((xyt.detach(), out.detach()))
        return out

    tr.model.mapping = spy
    for it, n_groups in zip((1, 10), groups):  # with the global rigidity, then past its stop
        seen.clear()
        losses = tr.compute_losses(it)
        xyt, uv = seen[0]  # layer 0's main call (the consistency term's calls come after)
        assert xyt.shape[0] == n_groups * B
        q, uv = xyt.view(n_groups, B, 3), uv.view(n_groups, B, 2)
        step = 2.0 / rez  # one pixel in the mapping's normalised coordinates
        gx, gy = (1, 2) if stencil == "shared" else (5, 6)
        sign = 1.0 if stencil == "shared" else -1.0
        assert torch.allclose(q[gx, :, 0] - q[0, :, 0], torch.full((B,), sign * step), atol=1e-6)
        assert torch.equal(q[gx, :, 1:], q[0, :, 1:])
        assert torch.allclose(q[gy, :, 1] - q[0, :, 1], torch.full((B,), sign * step), atol=1e-6)
        s = tr.model.uv_scales[0]
        expected = lc.rigidity * L.rigidity_loss(uv[0], uv[gx], uv[gy], rez, s, 1.0)
        assert torch.allclose(losses["rigidity_0"].detach(), expected, rtol=1e-5)
        if it == 1:
            D = float(lc.global_rigidity_derivative)
            expected = tr.global_rigidity_weight(0) * L.rigidity_loss(uv[0], uv[-2], uv[-1], rez, s, D)
            assert torch.allclose(losses["global_rigidity_0"].detach(), expected, rtol=1e-5)
            assert torch.allclose(q[-2, :, 0] - q[0, :, 0], torch.full((B,), -D * step), atol=1e-5)


def test_rigidity_loss_is_the_same_for_either_stencil_of_an_affine_map():
    """J -> -J leaves the loss unchanged: a forward difference of an affine map gives the backward one's
    value exactly, so the shared stencil changes which pixel pairs a batch holds, not the loss."""
    from backend import losses as L
    A = torch.tensor([[0.7, -0.2], [0.3, 1.1]])
    p = torch.rand(64, 2)
    f = lambda q: q @ A.T  # noqa: E731
    e = torch.eye(2)
    back = L.rigidity_loss(f(p), f(p - e[0]), f(p - e[1]), 20, 0.8, 1.0)
    fwd = L.rigidity_loss(f(p), f(p + e[0]), f(p + e[1]), 20, 0.8, 1.0)
    assert torch.allclose(back, fwd, rtol=1e-6)


def test_shared_rigidity_stencil_needs_one_pixel():
    from backend.errors import ConfigError
    with pytest.raises(ConfigError, match="rigidity_derivative = 1"):
        preset("fast").replace(losses={"rigidity_stencil": "shared", "rigidity_derivative": 2}).validate()
    with pytest.raises(ConfigError, match="backward|shared"):
        preset("fast").replace(losses={"rigidity_stencil": "central"}).validate()


def _signature(args):
    """What torch.compile's guards see of a call: tensor shapes/strides/dtypes and the constants."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), a.stride(), a.dtype, a._base is not None)
        if isinstance(a, (list, tuple)):
            return tuple(one(v) for v in a)
        return a if isinstance(a, (int, float, bool, str, type(None))) else type(a).__name__
    return tuple(one(a) for a in args)


@pytest.mark.parametrize("stencil", ["backward", "shared"])
def test_every_phase_calls_the_compiled_loss_algebra_with_the_same_shapes(stencil):
    """`train.compile_losses` compiles core_loss_terms once: its inputs keep their shapes, views
    and constants from the first iteration (bootstrapping, global rigidity) past both stops, so
    the stops trigger no recompilation (docs/benchmarks.md, "Run fused-3"); the early terms
    come from phase_loss_terms, and the step's terms equal the reference loss_terms of the same
    network outputs."""
    from backend.train import trainer as T
    clip = tiny_clip()
    cfg = tiny_config().replace(losses={"rigidity_stencil": stencil})
    tr = Trainer(clip, compute_flow(clip), cfg, torch.device("cpu"))
    calls = []

    def recorder(*args):
        calls.append((_signature(args), args))
        return T.core_loss_terms(*args)

    tr._core_terms = lambda: recorder
    keys = [set(tr.compute_losses(it)) for it in (1, 4, 10)]  # both on, global stopped, both stopped
    assert "alpha_bootstrapping" in keys[0] and "global_rigidity_0" in keys[0]
    assert "alpha_bootstrapping" in keys[1] and "global_rigidity_0" not in keys[1]
    assert not any(k.startswith(("alpha_bootstrapping", "global_rigidity")) for k in keys[2])
    assert len(calls) == 3 and calls[0][0] == calls[1][0] == calls[2][0]
    # the split is the reference: core + phase terms of the same outputs == loss_terms
    (lc, scales, rez, residuals, uv, rgb, res, alpha, gt, dx, dy, ok_fw, ok_bw, cons, weighted, rig) = calls[0][1]
    assert all(u._base is not None for u in uv)  # a view of the full (G, B, 2) outputs
    full = [u._base.view(-1, u.shape[1], 2) for u in uv]
    ref = T.loss_terms(lc, scales, tuple(tr.global_rigidity_weight(i) for i in range(len(uv))), rez, True,
                       residuals, full, rgb, res, alpha, gt, dx, dy, None, ok_fw, ok_bw, cons, weighted,
                       T.rigidity_groups(stencil))
    core = T.core_loss_terms(*calls[0][1])
    for k, v in core.items():
        assert torch.equal(v, ref[k]), k
    assert {k for k in ref if k.startswith("global_rigidity")} == {f"global_rigidity_{i}" for i in range(2)}


def test_the_stops_trigger_no_recompilation_of_the_loss_algebra():
    """The guard-level check of the test above, through TorchDynamo itself (a counting backend,
    no Inductor): one compilation of core_loss_terms for all three schedule phases."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from backend.train import trainer as T
    clip = tiny_clip()
    tr = Trainer(clip, compute_flow(clip), tiny_config(), torch.device("cpu"))
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(T.core_loss_terms, backend=counter, dynamic=False)
    tr._core_terms = lambda: compiled
    try:
        for it in (1, 2, 4, 5, 10, 11):  # both early terms on, global stopped, both stopped
            losses = tr.compute_losses(it)
            assert all(torch.isfinite(v) for v in losses.values())
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_a_loss_compiler_that_fails_leaves_training_on_the_eager_algebra():
    """`fast` turns `train.compile_losses` on: where Inductor cannot compile (no Triton, no host
    compiler) the first call falls back to the eager core_loss_terms with the same values and a
    progress line that says why, and later calls do not try again; a working backend keeps the
    compiled function."""
    import torch._dynamo

    from backend.train import trainer as T
    clip = tiny_clip()
    tr = Trainer(clip, compute_flow(clip), tiny_config(), torch.device("cpu"))
    notes = []
    calls = {"backend": 0}

    def broken(gm, example_inputs):
        calls["backend"] += 1
        raise RuntimeError("no C compiler found")

    torch._dynamo.reset()
    try:
        guarded = T.CompiledOrEager(T.core_loss_terms, notes.append, backend=broken)
        tr._core_terms = lambda: guarded
        torch.manual_seed(0)
        first = tr.compute_losses(1)
        assert guarded.state == "eager" and "no C compiler found" in guarded.error
        assert len(notes) == 1 and "eager" in notes[0] and "no C compiler found" in notes[0]
        tr2 = Trainer(clip, compute_flow(clip), tiny_config(), torch.device("cpu"))
        reference = tr2.compute_losses(1)  # the default path on a CPU: eager
        assert first.keys() == reference.keys()
        for k in first:
            assert torch.allclose(first[k], reference[k], rtol=1e-6, atol=0), k
        tried = calls["backend"]
        tr.compute_losses(2)
        assert calls["backend"] == tried and len(notes) == 1  # not tried again

        working = T.CompiledOrEager(T.core_loss_terms, notes.append, backend="eager")
        tr._core_terms = lambda: working
        losses = tr.compute_losses(3)
        assert working.state == "compiled" and all(torch.isfinite(v) for v in losses.values())
        assert len(notes) == 1
    finally:
        torch._dynamo.reset()


def test_the_residual_consistency_gradient_at_initialisation_is_ill_conditioned():
    """Why the fused-MLP step tests compare gradients with `losses.residual_consistent` off: at
    initialisation the residual is nearly constant over a 3x3 patch, and the term's 1 - Pearson rho
    (method.md 2.5, the seed's formula) divides by the patches' tiny standard deviations. A 1e-6
    relative change of the residual MLP's weights then moves the residual grid's gradient by a
    large fraction, with the term on, and by float32 rounding with it off."""
    clip = tiny_clip(n_frames=6, h=24, w=32)

    def residual_grid_grads(rc, eps):
        cfg = tiny_config(iterations=20, seed=1).replace(
            model={"texture_width": 64, "residual_width": 64, "alpha_width": 64},
            losses={"residual_consistent": rc})
        tr = Trainer(clip, None, cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if n.startswith("residuals") and ".mlp." in n:
                    p.mul_(1 + eps * torch.randn(p.shape, generator=gen))
        losses = tr.compute_losses(1)
        tr.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters()
                 if n.startswith("residuals") and n.endswith("grid.params")}
        return grads, [float(losses[k]) for k in losses if k.startswith("residual_consistent")]

    def change(rc):
        a, values = residual_grid_grads(rc, 0.0)
        b, _ = residual_grid_grads(rc, 1e-6)
        return [float((b[n] - a[n]).norm() / a[n].norm()) for n in a], values

    on, values = change(0.1)
    off, _ = change(0.0)
    assert all(v > 0 for v in values)  # both layers' terms see off-screen points here
    assert min(on) > 0.1, on
    assert max(off) < 1e-4, off
