"""The training step with the fused/compiled MLPs and the compiled loss algebra (CUDA only):
same losses and gradients as the reference step on the same batch, and the CUDA-graph step
captures and replays them."""

import math

import pytest
import torch

from backend.train import Trainer

from .test_train import tiny_clip, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _step_grads(clip, cfg):
    tr = Trainer(clip, None, cfg)
    losses = tr.compute_losses(1)
    tr.optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in losses.items()}, grads, tr


@pytest.mark.parametrize("backend,compile_losses", [("triton", False), ("compile", False), ("triton", True)])
def test_step_matches_reference(backend, compile_losses):
    """Losses and gradients of one step against the torch reference at float32 rounding. The
    gradients are compared with the residual-consistency term off: at initialisation it is
    1 - Pearson rho over 3x3 patches of a residual that is still nearly constant, and its gradient
    is rounding noise of whichever MLP path evaluates it (a 1e-6 change of the residual's weights
    moves the residual grid's gradient by 50-500 %: test_train.py's
    test_the_residual_consistency_gradient_at_initialisation_is_ill_conditioned); its value is
    compared at that scale."""
    clip = tiny_clip(n_frames=6, h=24, w=32)
    # 64-wide texture/residual/alpha networks so that the fused kernels take them
    base = tiny_config(iterations=20).replace(model={"texture_width": 64, "residual_width": 64, "alpha_width": 64},
                                              train={"device": "cuda", "tf32": False})
    ref_l, _, _ = _step_grads(clip, base.replace(model={"mlp_backend": "torch"}))
    cfg = base.replace(model={"mlp_backend": backend}, train={"compile_losses": compile_losses})
    got_l, _, tr = _step_grads(clip, cfg)
    assert tr.model.mlp_backend == backend
    assert list(got_l) == list(ref_l)
    for k, v in ref_l.items():
        tol = {"rel": 1e-3, "abs": 1e-4} if k.startswith("residual_consistent") else {"rel": 1e-4, "abs": 1e-6}
        assert got_l[k] == pytest.approx(v, **tol), k
    quiet = {"losses": {"residual_consistent": 0.0}}
    _, ref_g, _ = _step_grads(clip, base.replace(model={"mlp_backend": "torch"}, **quiet))
    _, got_g, _ = _step_grads(clip, cfg.replace(**quiet))
    assert set(got_g) == set(ref_g)
    for n, g in ref_g.items():
        err = float((got_g[n] - g).norm() / g.norm().clamp_min(1e-20))
        assert err < 1e-3, f"{n}: {err:.2e}"
    # the graph step: captured after two eager steps, then replayed
    for it in range(2, 8):
        losses = tr.step(it)
    assert len(tr._graphs) == 1
    assert all(math.isfinite(float(v)) for v in losses.values())
