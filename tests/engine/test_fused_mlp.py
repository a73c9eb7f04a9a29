"""Fused Triton MLP kernels against the PyTorch reference (values, weight and input gradients).

On CUDA the compiled kernels run at several sizes (IEEE fp32 products: float32 rounding; TF32
separately, at TF32's tolerance). Without CUDA the same checks run through Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported) at small sizes; without triton the
module is skipped. Every check draws fresh random inputs; the seed is in the failure message.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and importlib.util.find_spec("triton") is not None and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

try:
    from backend.model import fused_mlp as fm
except ImportError as exc:  # no triton on this machine
    pytest.skip(f"triton is not importable ({exc}); the fused MLP is untested here", allow_module_level=True)

from backend.config import ModelConfig
from backend.model.mlp_backend import MLP, reference_mlp

if not CUDA and not fm.interpreting():
    pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET could be set", allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    """A kernel that fails falls back to the reference (which would pass every comparison): each
    test must leave no fallback behind unless it resets it itself."""
    fm.reset_fallback()
    yield
    assert not fm.FALLBACK, f"a kernel fell back to the reference: {fm.FALLBACK}"


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _net(in_dim: int, width: int, out_dim: int, layers: int, gen: torch.Generator, device=DEVICE):
    """Weights like nn.Linear's init, biases larger so that some ReLUs are off."""
    dims = [in_dim] + [width] * (layers - 1) + [out_dim]
    ws, bs = [], []
    for a, b in zip(dims[:-1], dims[1:]):
        ws.append(((torch.rand(b, a, generator=gen) * 2 - 1) / a ** 0.5).to(device).requires_grad_())
        bs.append(((torch.rand(b, generator=gen) * 2 - 1) * 0.3).to(device).requires_grad_())
    return ws, bs


def _reference(x, ws, bs):
    params = [t for pair in zip(ws, bs) for t in pair]
    return reference_mlp(x, "none", *params)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _off_kink(pre: list[torch.Tensor], margin: float = 1e-4) -> torch.Tensor:
    """Rows whose hidden pre-activations (``_pre_activations``) are all at least ``margin`` from 0.

    Two float32 evaluations that sum in different orders differ by ~1e-7, so a pre-activation
    within that of 0 can be on in one and off in the other: that row's input gradient then differs
    by a whole term. At 333k rows a few rows do so, and torch's own float32 input gradient is
    1.5e-4 to 7.8e-4 off the float64 one (test_relu_kinks_explain_float32_input_gradient_gaps). The
    weight gradients sum over rows, where one row is 1/B of the sum; the input gradient is compared
    on these rows (about 95 % of them at ``margin`` 1e-4)."""
    keep = torch.ones(pre[0].shape[0], dtype=torch.bool, device=pre[0].device)
    for p in pre:
        keep &= (p.abs() >= margin).all(1)
    return keep


def _pre_activations(x, ws, bs) -> list[torch.Tensor]:
    """The hidden layers' pre-activations, in float64."""
    h, out = x.detach().double(), []
    for w, b in zip(ws[:-1], bs[:-1]):
        out.append(torch.nn.functional.linear(h, w.detach().double(), b.detach().double()))
        h = torch.relu(out[-1])
    return out


def test_relu_kinks_explain_float32_input_gradient_gaps():
    """Why _off_kink: on the CPU, torch's float32 input gradient of a 4-layer ReLU network at 333k
    rows is ~1e-4 off float64 (seed 4: 7.8e-4, three rows' ReLU masks differ), and float32 rounding
    (2e-7) on the rows away from the kinks."""
    gen = torch.Generator().manual_seed(4)
    ws, bs = _net(32, 64, 3, 4, gen, device="cpu")
    B = 333_333
    x = torch.randn(B, 32, generator=gen) * 0.7
    gy = torch.randn(B, 3, generator=gen)
    x32 = x.clone().requires_grad_()
    (g32,) = torch.autograd.grad(_reference(x32, ws, bs), [x32], gy)
    xd = x.double().requires_grad_()
    (gd,) = torch.autograd.grad(_reference(xd, [w.double() for w in ws], [b.double() for b in bs]), [xd],
                                gy.double())
    rows = _off_kink(_pre_activations(x, ws, bs))
    assert _rel(g32.double(), gd) > 1e-5
    assert _rel(g32.double()[rows], gd[rows]) < 1e-6
    assert 0.9 < float(rows.float().mean()) < 0.99


def _run_against_reference(fn, x, ws, bs, gy, need_dx, tf32):
    """Forward and gradients (input where asked, weights, biases) of `fn` and of the
    reference, with TF32 products on or off for both, restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        y = fn(x, ws, bs)
        ref = _reference(x, ws, bs)
        inputs = ([x] if need_dx else []) + ws + bs
        return y, ref, torch.autograd.grad(y, inputs, gy), torch.autograd.grad(ref, inputs, gy)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _check(in_dim, width, out_dim, layers, B, need_dx=True, tol=2e-6, tf32=False):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    ws, bs = _net(in_dim, width, out_dim, layers, gen)
    x = (torch.randn(B, in_dim, generator=gen) * 0.7).to(DEVICE).requires_grad_(need_dx)
    gy = torch.randn(B, out_dim, generator=gen).to(DEVICE)
    y, ref, got, want = _run_against_reference(fm.fused_mlp, x, ws, bs, gy, need_dx, tf32)
    where = f"(in={in_dim} width={width} out={out_dim} layers={layers} B={B} seed={seed})"
    assert y.shape == ref.shape
    assert _rel(y, ref) < tol, f"forward {_rel(y, ref):.2e} {where}"
    names = (["dx"] if need_dx else []) + [f"dW{i}" for i in range(layers)] + [f"db{i}" for i in range(layers)]
    pre = _pre_activations(x, ws, bs)
    rows = _off_kink(pre)
    # the output layer's gradients are sums over the rows of terms with gy's random signs: they
    # cancel (the output bias with one output and a few hundred rows, seed 77: 8e-5 relative; the
    # output weight at 333k rows: ~1e-5 relative, 2.4e-6..4.7e-6 at 40k in the interpreter), so
    # their rounding is judged against the sum of the terms' magnitudes, as a summation's error
    # bound is; the input gradient on the rows away from the ReLU kinks (_off_kink)
    h_last = torch.relu(pre[-1]).float() if layers > 1 else x.detach().abs()  # >= 0
    magnitude = {f"dW{layers - 1}": gy.abs().t() @ h_last, f"db{layers - 1}": gy.abs().sum(0)}
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        err = _rel(g[rows], w[rows]) if name == "dx" else _rel(g, w)
        if name in magnitude:
            err = float((g - w).norm() / torch.maximum(w.norm(), magnitude[name].norm()).clamp_min(1e-30))
        assert err < tol * 4, f"{name} {err:.2e} {where}"
    # ReLUs were both on and off (the masks were exercised)
    h = torch.relu(torch.nn.functional.linear(x.detach(), ws[0].detach(), bs[0].detach()))
    assert 0.05 < float((h > 0).float().mean()) < 0.95


# interpreter sizes: the shapes the networks use (2D grid 16 levels x 2 -> 64 -> 3, alpha N-1
# outputs) plus odd sizes (partial blocks, 2-4 layers, unpadded input/output dims)
CASES = [
    (32, 64, 3, 4, 300),   # texture / residual
    (32, 64, 1, 4, 129),   # alpha of a 2-layer model
    (16, 32, 2, 3, 70),    # demo-sized, one hidden-to-hidden layer
    (3, 16, 5, 2, 65),     # no hidden-to-hidden layer, input narrower than 16
    (40, 64, 17, 4, 64),   # padded input and output
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_fused_matches_reference(case):
    _check(*case)


@pytest.mark.parametrize("opts", [dict(bwd_hoist=True), dict(bwd_hoist=True, bwd_block=16, bwd_stages=1)],
                         ids=["hoist", "hoist-b16"])
def test_launch_shapes_match_reference(opts):
    """The backward's other launch shapes (weights hoisted out of the persistent loop, smaller
    blocks) compute the same gradients."""
    old = fm.set_options(**opts)
    try:
        _check(32, 64, 3, 4, 300)
        _check(16, 32, 2, 3, 70)
        _check(32, 64, 1, 4, 129, need_dx=False)
    finally:
        fm.set_options(**old.__dict__)


@pytest.mark.parametrize("opts", [dict(fwd_block=48), dict(bwd_block=48)], ids=["forward", "backward"])
def test_launch_failure_falls_back_to_reference(opts, capsys):
    """A kernel that cannot launch (here: a block size Triton refuses, as a shape without the
    shared memory it needs is refused on a GPU) is reported once; the call that failed and every
    later one are answered by the reference, with the same values and gradients."""
    old = fm.set_options(**opts)
    fm.reset_fallback()
    try:
        torch.manual_seed(_seed() % 2 ** 31)
        net = MLP(32, 3, 64, 4, "tanh01").to(DEVICE)
        x = torch.randn(100, 32, device=DEVICE, requires_grad=True)
        out = {}
        for backend in ("triton", "triton", "torch"):
            net.backend = backend
            y = net(x)
            out[backend] = (y, *torch.autograd.grad(y.square().sum(), [x, *net.parameters()]))
        assert "fused" in fm.FALLBACK
        assert net.path(x) == "torch"
        net.backend = "triton"
        assert net.path(x) == "torch"
        for a, b in zip(out["triton"], out["torch"]):
            assert _rel(a.detach(), b.detach()) < 1e-5
        assert capsys.readouterr().err.count("failed at launch") == 1
    finally:
        fm.set_options(**old.__dict__)
        fm.reset_fallback()


def test_no_input_gradient_and_empty_batch():
    _check(32, 64, 3, 4, 100, need_dx=False)
    gen = torch.Generator().manual_seed(1)
    ws, bs = _net(32, 64, 3, 4, gen)
    x = torch.zeros(0, 32, device=DEVICE, requires_grad=True)
    y = fm.fused_mlp(x, ws, bs)
    assert y.shape == (0, 3)
    grads = torch.autograd.grad(y.sum(), [x] + ws)
    assert all(float(g.abs().sum()) == 0.0 for g in grads)


def test_unsupported_shape_is_refused():
    gen = torch.Generator().manual_seed(2)
    ws, bs = _net(3, 256, 2, 4, gen)  # the mapping network: too wide for the fused kernels
    assert not fm.supports(3, 256, 2, 2)
    with pytest.raises(ValueError, match="width=256"):
        fm.fused_mlp(torch.zeros(4, 3, device=DEVICE), ws, bs)


CHAIN_CASES = [
    (3, 256, 2, 4, 100),   # the mapping network
    (3, 64, 2, 3, 37),
    (32, 48, 3, 2, 5),     # width not a multiple of the column block
]


@pytest.mark.parametrize("case", CHAIN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_chain_matches_reference(case):
    """The wide-network path (cuBLAS products, fused ReLU backward and bias gradients)."""
    in_dim, width, out_dim, layers, B = case
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    ws, bs = _net(in_dim, width, out_dim, layers, gen)
    x = torch.randn(B, in_dim, generator=gen).to(DEVICE).requires_grad_()
    gy = torch.randn(B, out_dim, generator=gen).to(DEVICE)
    y, ref, got, want = _run_against_reference(fm.chain_mlp, x, ws, bs, gy, True, False)
    assert _rel(y, ref) < 2e-6, f"forward (seed {seed})"
    rows = _off_kink(_pre_activations(x, ws, bs))  # the input gradient (0) where no ReLU is at its kink
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape
        err = _rel(g[rows], w[rows]) if i == 0 else _rel(g, w)
        assert err < 1e-5, f"gradient {i} {err:.2e} (seed {seed})"


def test_mlp_module_paths_agree():
    """The model's MLP module gives the same values and gradients on its torch and triton paths;
    without gradients it always takes the reference."""
    cfg = ModelConfig()
    torch.manual_seed(_seed() % 2 ** 31)
    net = MLP(32, 3, cfg.texture_width, cfg.texture_layers, "tanh01").to(DEVICE)
    x = torch.randn(257, 32, device=DEVICE, requires_grad=True)
    out = {}
    for backend in ("torch", "triton"):
        net.backend = backend
        assert net.path(x) == backend
        y = net(x)
        out[backend] = (y, *torch.autograd.grad(y.square().sum(), [x, net[0].weight, net[-1].bias]))
    for a, b in zip(out["triton"], out["torch"]):
        assert _rel(a.detach(), b.detach()) < 1e-5
    with torch.no_grad():
        net.backend = "triton"
        assert net.path(x) == "torch"
    wide = MLP(3, 2, 256, 4, "tanh").to(DEVICE)
    wide.backend = "triton"
    assert wide.path(x[:, :3]) == "chain"
    state = net.state_dict()
    assert list(state) == [f"{i}.{k}" for i in (0, 2, 4, 6) for k in ("weight", "bias")]


@pytest.mark.skipif(not CUDA, reason="compiled kernels: needs CUDA")
@pytest.mark.parametrize("B", [1, 1000, 40_000, 333_333])
def test_fused_cuda_sizes(B):
    _check(32, 64, 3, 4, B)


@pytest.mark.skipif(not CUDA, reason="compiled kernels: needs CUDA")
@pytest.mark.parametrize("B", [1, 777, 360_000])
def test_chain_cuda_sizes(B):
    test_chain_matches_reference((3, 256, 2, 4, B))


def _texture_case():
    """Fresh random texture-network weights (32 -> 4 x 64 -> 3) at 100k points: (seed, ws, bs, x, gy)."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    ws, bs = _net(32, 64, 3, 4, gen)
    B = 100_000
    x = (torch.randn(B, 32, generator=gen) * 0.7).to(DEVICE).requires_grad_()
    gy = torch.randn(B, 3, generator=gen).to(DEVICE)
    return seed, ws, bs, x, gy


def _float64_truth(x, ws, bs, gy):
    """The reference network in float64: its output and the gradients (input, weights, biases)."""
    xd = x.detach().double().requires_grad_()
    wd = [w.detach().double().requires_grad_() for w in ws]
    bd = [b.detach().double().requires_grad_() for b in bs]
    yd = _reference(xd, wd, bd)
    return yd, torch.autograd.grad(yd, [xd] + wd + bd, gy.double())


def test_tf32_round_to_nearest():
    """_rna (tf32_mode "tf32rn"): each fp32 operand to the nearest TF32 value (10 mantissa bits,
    ties away from zero), the 13 low bits cleared; infinities stay; at most 2^-11 relative off."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, Y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, fm._rna(tl.load(X + i, mask=i < n)), mask=i < n)

    gen = torch.Generator().manual_seed(_seed())
    x = torch.cat([torch.randn(997, generator=gen) * 10.0 ** torch.randint(-20, 20, (997,), generator=gen),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -12])])
    xd = x.to(DEVICE)
    y = torch.empty_like(xd)
    kernel[(triton.cdiv(x.numel(), 256),)](xd, y, x.numel(), BLOCK=256)
    y = y.cpu()
    bits = x.view(torch.int32).numpy().astype("int64") & 0xFFFFFFFF
    want = torch.from_numpy(((bits + 0x1000) & 0xFFFFE000).astype("uint32").view("int32")).view(torch.float32)
    assert torch.equal(y, want)
    assert (y.view(torch.int32) & 0x1FFF == 0).all()
    finite = torch.isfinite(x) & (x != 0)
    assert ((y - x).abs()[finite] <= 2.0 ** -11 * x.abs()[finite]).all()
    assert y[-2] == 1.0 + 2.0 ** -10 and y[-1] == 1.0 + 2.0 ** -10  # ties and above round up, not down
    assert y[-4] == float("inf") and y[-3] == -float("inf")


def test_rounded_operands_path_runs_and_stays_within_tf32(monkeypatch):
    """The kernels with every product's operands rounded to TF32 (RN; forced here, on CPU through
    the interpreter, whose products are then fp32 of TF32-rounded operands): values and gradients
    within TF32's rounding of the reference."""
    monkeypatch.setattr(fm, "_prec", lambda: "tf32rn")
    gen = torch.Generator().manual_seed(_seed())
    ws, bs = _net(32, 64, 3, 4, gen)
    x = (torch.randn(300, 32, generator=gen) * 0.7).to(DEVICE).requires_grad_()
    gy = torch.randn(300, 3, generator=gen).to(DEVICE)
    y, ref, got, want = _run_against_reference(fm.fused_mlp, x, ws, bs, gy, True, False)
    assert 0 < _rel(y, ref) < 5e-3
    for g, w in zip(got, want):
        assert _rel(g, w) < 5e-2


@pytest.mark.skipif(not CUDA, reason="TF32 products: needs CUDA")
@pytest.mark.parametrize("mode, factor, floor", [("tf32rn", 1.25, 2.0 ** -11), ("tf32", 3.0, 1e-3)])
def test_fused_cuda_tf32(mode, factor, floor):
    """TF32 rounds operands to 10 mantissa bits: values move by ~1e-3 through 4 layers, and a ReLU
    whose input is within that of 0 can switch, which moves a gradient term by its whole size, so
    two TF32 paths differ by far more than 1e-3 in the gradients. The yardstick is a float64
    evaluation, against the PyTorch TF32 path's distance from it (cuBLAS rounds its operands to
    nearest). "tf32rn" (the default: operands rounded to nearest in the kernels) within 1.25x of it
    (plus a TF32 rounding where the error is tiny; measured on the H200 at 100k points: 1.0x);
    "tf32" (operands handed over unrounded: the tensor cores read their top 19 bits, a truncation
    whose bias accumulates over K) within 3x (measured: 1.6-2.2x in the worst tensor)."""
    seed, ws, bs, x, gy = _texture_case()
    old = fm.set_options(tf32_mode=mode)
    try:
        y, _, got, want = _run_against_reference(fm.fused_mlp, x, ws, bs, gy, True, True)
    finally:
        fm.set_options(**vars(old))
    yd, truth = _float64_truth(x, ws, bs, gy)
    assert _rel(y.double(), yd) < 5e-3, f"forward (seed {seed})"
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        e_fused, e_torch = _rel(g.double(), t), _rel(w.double(), t)
        assert e_fused < factor * e_torch + floor, \
            f"tensor {i}: {mode} {e_fused:.2e}, torch TF32 {e_torch:.2e} (seed {seed})"


@pytest.mark.skipif(not CUDA, reason="torch.compile of the MLPs: needs CUDA")
def test_compile_backend_matches_reference():
    torch.manual_seed(_seed() % 2 ** 31)
    net = MLP(3, 2, 256, 4, "tanh").to(DEVICE)
    x = torch.rand(5000, 3, device=DEVICE) * 2 - 1
    out = {}
    for backend in ("torch", "compile"):
        net.backend = backend
        assert net.path(x) == backend
        y = net(x)
        out[backend] = (y, *torch.autograd.grad(y.square().sum(), [net[0].weight, net[2].weight, net[-1].bias]))
    for a, b in zip(out["compile"], out["torch"]):
        assert _rel(a.detach(), b.detach()) < 1e-5


def test_layered_model_gradients_same_on_both_paths():
    """A whole model's render (mapping, textures, residuals, alpha) and every parameter's gradient
    agree between mlp_backend torch and triton (on CPU the mapping then stays on the reference)."""
    from backend.config import preset
    from backend.model import LayeredModel
    cfg = preset("demo").model
    x = torch.rand(300, 3, device=DEVICE) * 2 - 1
    grads = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        m = LayeredModel(2, cfg, DEVICE, backend="torch")
        m.set_mlp_backend(backend, DEVICE)
        r = m.render(x)
        loss = (r.color - 0.5).square().sum() + sum(u.square().sum() for u in r.uv)
        names, params = zip(*[(n, p) for n, p in m.named_parameters()])
        grads[backend] = dict(zip(names, torch.autograd.grad(loss, params)))
    for name, g in grads["torch"].items():
        assert _rel(grads["triton"][name], g) < 1e-5, name


@pytest.mark.skipif(CUDA, reason="the CUDA version is tests/engine/test_fused_mlp_train.py")
def test_a_training_step_through_the_interpreted_kernels_matches_the_reference():
    """The whole step (texture, residual and alpha networks fused; the residual's batch of
    3 x 256 + 135 consistency points ends in a partial block) through Triton's interpreter:
    losses and every parameter's gradient against the torch reference. The residual-consistency
    term is off for the gradients (its gradient at initialisation is rounding noise:
    test_train.py, test_the_residual_consistency_gradient_at_initialisation_is_ill_conditioned)."""
    from .test_fused_mlp_train import _step_grads
    from .test_train import tiny_clip, tiny_config

    clip = tiny_clip(n_frames=6, h=24, w=32)
    base = tiny_config(iterations=20).replace(model={"texture_width": 64, "residual_width": 64, "alpha_width": 64},
                                              train={"tf32": False, "device": "cpu"},
                                              losses={"residual_consistent": 0.0})
    ref_l, ref_g, ref_tr = _step_grads(clip, base.replace(model={"mlp_backend": "torch"}))
    got_l, got_g, got_tr = _step_grads(clip, base.replace(model={"mlp_backend": "triton"}))
    assert (ref_tr.model.mlp_backend, got_tr.model.mlp_backend) == ("torch", "triton")
    assert not fm.FALLBACK
    assert list(got_l) == list(ref_l)
    for k, v in ref_l.items():
        assert got_l[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert set(got_g) == set(ref_g)
    for n, g in ref_g.items():
        err = float((got_g[n] - g).norm() / g.norm().clamp_min(1e-20))
        assert err < 1e-4, f"{n}: {err:.2e}"


def test_tf32_mode_is_checked_and_used_only_where_tf32_is_allowed(monkeypatch):
    """`tf32_mode` (KernelOptions): "tf32rn" (the default), "tf32" or "tf32x3", refused otherwise
    with the options left as they were; the kernels' precision is IEEE fp32 unless TF32 is allowed
    (and on the interpreter); "tf32rn" launches TF32 products with the operands rounded (RN)."""
    assert fm.KernelOptions().tf32_mode == "tf32rn"
    before = fm.OPTIONS
    with pytest.raises(ValueError, match="tf32_mode"):
        fm.set_options(tf32_mode="bf16")
    assert fm.OPTIONS == before
    old_flag = torch.backends.cuda.matmul.allow_tf32
    old = fm.set_options(tf32_mode="tf32x3")
    try:
        monkeypatch.setattr(fm, "interpreting", lambda: False)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert fm._prec() == "tf32x3"
        fm.set_options(tf32_mode="tf32")
        assert fm._prec() == "tf32"
        fm.set_options(tf32_mode="tf32rn")
        assert fm._prec() == "tf32rn"
        w = torch.zeros(64, 32)
        meta = fm._meta(None, w, None, torch.zeros(3, 64))
        assert meta["PREC"] == "tf32" and meta["RN"] is True
        torch.backends.cuda.matmul.allow_tf32 = False
        assert fm._prec() == "ieee"
        monkeypatch.setattr(fm, "interpreting", lambda: True)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert fm._prec() == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_flag
        fm.set_options(**vars(old))


@pytest.mark.skipif(not CUDA, reason="3xTF32 products: needs CUDA")
def test_fused_cuda_tf32x3_is_close_to_fp32():
    """With `tf32_mode = "tf32x3"` the fused kernels' TF32 products are three TF32 products each
    (the operands' rounding error corrected): against a float64 evaluation each gradient must be
    within a few times the IEEE fp32 path's error, or at least 10x closer than one TF32 product
    ("tf32rn") is. Triton 3.6's 3xTF32 is not always at fp32's accuracy: on the H200 a first-layer
    weight gradient came out 4.8e-4 off, where fp32 was 2.8e-7 and TF32 2.2e-2 off."""
    seed, ws, bs, x, gy = _texture_case()
    old = fm.set_options(tf32_mode="tf32x3")
    try:
        y3, _, got3, _ = _run_against_reference(fm.fused_mlp, x, ws, bs, gy, True, True)
        fm.set_options(tf32_mode="tf32rn")
        _, _, got1, _ = _run_against_reference(fm.fused_mlp, x, ws, bs, gy, True, True)
    finally:
        fm.set_options(**vars(old))
    y, _, got, _ = _run_against_reference(fm.fused_mlp, x, ws, bs, gy, True, False)  # IEEE fp32
    yd, truth = _float64_truth(x, ws, bs, gy)
    assert _rel(y3.double(), yd) < 10 * _rel(y.double(), yd) + 1e-6, f"forward (seed {seed})"
    rows = _off_kink(_pre_activations(x, ws, bs))  # the input gradient (0) where no ReLU is at its kink
    for i, (g3, g, g1, t) in enumerate(zip(got3, got, got1, truth)):
        if i == 0:
            g3, g, g1, t = g3[rows], g[rows], g1[rows], t[rows]
        e3, e, e1 = _rel(g3.double(), t), _rel(g.double(), t), _rel(g1.double(), t)
        assert e3 < max(10 * e + 1e-4, 0.1 * e1), f"tensor {i}: tf32x3 {e3:.2e}, fp32 {e:.2e}, tf32 {e1:.2e} (seed {seed})"
