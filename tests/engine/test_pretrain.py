"""The mapping pretraining (backend/train/pretrain.py): one joint Adam step per frame over every
layer's mapping is each layer's own step; a budget cuts it after a whole pass."""

import copy

import torch

from backend.train import Trainer
from backend.train.pretrain import MappingPretraining

from .test_train import tiny_clip, tiny_config


def test_a_joint_step_is_each_layers_own_step():
    """The layers' parameters are disjoint and Adam is per parameter: one step on the sum of the
    layers' losses moves each mapping exactly as a step on its own loss alone does."""
    clip = tiny_clip(n_frames=4, objects=2)
    tr = Trainer(clip, None, tiny_config(), torch.device("cpu"))
    init = tr.uv_init()
    tr.model.uv_scales = [float(s) for s in init.scales]
    state = tr.gen.get_state()
    start = copy.deepcopy(tr.model)
    joint = MappingPretraining(tr.model, tr.geom, init, 128, 1e-2, tr.gen, tr.device, graphs=False)
    alone = []
    for i in range(tr.n_layers):  # layer i's own step: the same samples, the others' losses cut off
        model = copy.deepcopy(start)
        gen = torch.Generator()
        gen.set_state(state)
        run = MappingPretraining(model, tr.geom, init, 128, 1e-2, gen, tr.device, graphs=False)
        run.frame.fill_(2)
        real = model.mapping
        model.mapping = lambda layer, xyt, real=real, i=i: real(layer, xyt) if layer == i else real(layer, xyt).detach()
        loss = run.loss()
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        alone.append(model)
    joint.step(2)
    for i, model in enumerate(alone):
        for j in range(tr.n_layers):
            moved = tr.model if j == i else start  # layer i as the joint step moved it, the others not at all
            for a, b in zip(moved.mappings[j].parameters(), model.mappings[j].parameters()):
                assert torch.equal(a, b), (i, j)
    assert not all(torch.equal(a, b) for a, b in zip(start.mappings[0].parameters(), tr.model.mappings[0].parameters()))


def test_pretraining_reaches_its_targets_and_a_budget_stops_it_after_a_pass():
    clip = tiny_clip(n_frames=4, objects=2)
    cfg = tiny_config(pretrain_iterations=30, pretrain_batch_size=512, mapping_lr=3e-3)
    tr = Trainer(clip, None, cfg, torch.device("cpu"))
    probe = MappingPretraining(tr.model, tr.geom, tr.uv_init(), 1024, 0.0, tr.gen, tr.device, graphs=False)
    before = probe.distance()
    tr.pretrain()
    after = probe.distance()
    assert after < 0.3 * before, (before, after)
    assert tr.state.pretrained and tr.plan.pretrain_passes == []  # no budget: every pass
    cut = Trainer(clip, None, cfg.replace(train={"budget_s": 1e-6}), torch.device("cpu"))
    cut.pretrain()
    assert cut.plan.pretrain_passes == [1, 1, 1]  # one pass of every layer, then past its share
