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
