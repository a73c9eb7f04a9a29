"""The CUDA-graph training step on a GPU (skipped without CUDA)."""

import pytest
import torch

from backend.train import Trainer

from .test_train import tiny_clip, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_step_trains_like_eager(backend):
    clip = tiny_clip(n_frames=6, h=24, w=32)
    cfg = tiny_config(iterations=30).replace(model={"encoding_backend": backend})
    curves = {}
    for graphs in (False, True):
        tr = Trainer(clip, None, cfg.replace(train={"cuda_graphs": graphs, "device": "cuda"}))
        assert tr.use_graphs == graphs
        rgb = []
        tr.pretrain()
        for it in range(1, 31):
            rgb.append(float(tr.step(it)["rgb"]))
        curves[graphs] = rgb
        if graphs:  # the phases seen: (boot, global), (boot, no global), (no boot, no global)
            assert len(tr._graphs) == 1
    # same kernels and schedule; the random batches may differ (graph-safe RNG offsets), so the
    # two runs must agree statistically, not bit for bit
    eager, graphed = sum(curves[False][-10:]) / 10, sum(curves[True][-10:]) / 10
    assert graphed == pytest.approx(eager, rel=0.3)
    assert graphed < sum(curves[True][:5]) / 5


def test_graph_replay_follows_the_lr_schedule():
    """The captured Adam reads the scheduled rate from a device tensor: replays late in a cosine
    schedule move the parameters by about lr_final_factor of what the early replays did."""
    clip = tiny_clip(n_frames=6, h=24, w=32)
    cfg = tiny_config(iterations=40, lr_schedule="cosine", lr_decay_start=0.5, lr_final_factor=0.01)
    tr = Trainer(clip, None, cfg.replace(train={"device": "cuda"}))
    assert tr.use_graphs and torch.is_tensor(tr.optimizer.param_groups[0]["lr"])
    tr.pretrain()
    table = tr.model.textures[0].grid.params

    def moved(it):
        before = table.detach().clone()
        tr.step(it)
        return float((table.detach() - before).abs().mean())

    for it in range(1, 10):
        tr.step(it)
    early = sum(moved(it) for it in range(10, 14)) / 4  # factor 1, graph replays
    for it in range(14, 40):
        tr.step(it)
    late = moved(40)  # factor 0.01
    assert float(tr.optimizer.param_groups[0]["lr"]) == pytest.approx(cfg.train.grid_lr * 0.01, rel=1e-5)
    assert late < 0.05 * early


def test_graph_pretraining_reaches_the_eager_distance():
    """The pretraining step captured once and replayed per frame (the frame index in a device
    tensor, the samples from the registered generator) trains as the eager step does."""
    from backend.train.pretrain import MappingPretraining

    clip = tiny_clip(n_frames=6, h=24, w=32, objects=2)
    cfg = tiny_config(pretrain_iterations=30, pretrain_batch_size=512, mapping_lr=3e-3)
    out = {}
    for graphs in (False, True):
        tr = Trainer(clip, None, cfg.replace(train={"cuda_graphs": graphs, "device": "cuda"}))
        init = tr.uv_init()
        tr.model.uv_scales = [float(s) for s in init.scales]
        run = MappingPretraining(tr.model, tr.geom, init, 512, 3e-3, tr.gen, tr.device, graphs)
        start = run.distance()
        for _ in range(30):
            for f in range(tr.geom.n_frames):
                run.step(f)
        assert (run._graph is not None) == graphs
        out[graphs] = (start, run.distance())
    (s0, eager), (s1, graphed) = out[False], out[True]
    assert s0 == pytest.approx(s1, rel=1e-5)  # the same initial weights and targets
    assert eager < 0.3 * s0 and graphed < 0.3 * s1
    assert graphed == pytest.approx(eager, rel=0.5)
