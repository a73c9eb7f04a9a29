"""The training loop of Hashing-NVD (method.md section 2), faithful to the seed's schedule.

One iteration samples ``batch_size`` pixels uniformly over all (x, y, t) on the device,
evaluates every network once per group of query points (main, x+1, y+1, flow targets,
rigidity neighbours; concatenated so each network runs once per step), sums the weighted
loss terms and takes one Adam step with two learning-rate groups. Mapping networks are
pretrained towards uv = s * xy first. Progress, cancellation and checkpoints are handled
here; the caller decides where checkpoints live.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import losses as L
from ..clip import Clip
from ..config import Config
from ..errors import Cancelled
from ..model import LayeredModel
from ..progress import CancelToken, Progress, ProgressFn, null_progress
from .data import TrainingData
from . import schedule as S
from .pretrain import MappingPretraining
from .uvfit import UVInit, fit_init, seed_init


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    return dev


@dataclass
class TrainState:
    iteration: int = 0
    pretrained: bool = False
    seconds: float = 0.0  # training wall time, summed over resumes
    pretrain_seconds: float = 0.0
    history: list = field(default_factory=list)  # [iteration, seconds, batch psnr]
    evals: list = field(default_factory=list)  # [iteration, seconds, psnr, psnr_no_residual]


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    losses: dict


def loss_terms(lc, uv_scales: tuple, global_weights: tuple, rez: int, use_global: bool, residuals: bool,
               uv: list, rgb: list, res: list, alpha: torch.Tensor, gt: torch.Tensor, dx_gt: torch.Tensor,
               dy_gt: torch.Tensor, target: Optional[torch.Tensor], ok_fw: torch.Tensor,
               ok_bw: torch.Tensor, consistency: Optional[list] = None,
               alpha_weighted: tuple = (), groups: tuple = ((5, 6), (7, 8))) -> dict[str, torch.Tensor]:
    """Every weighted loss term of one step, from the networks' outputs.

    uv: N x (G, B, 2) mapping outputs per query group (0 main, 1 x+1, 2 y+1, 3 flow fw, 4 flow bw,
    then the rigidity and global-rigidity neighbours at ``groups``: ((5, 6), (7, 8)) by default,
    ((1, 2), (5, 6)) with the shared stencil, see :func:`rigidity_groups`); rgb, res: N x (3, B, 3)
    at groups 0-2; alpha (5, B, N) at groups 0-4; ``target`` the bootstrapping masks (None: that
    term is off); ``consistency`` the unweighted residual-consistency loss per layer (None: off);
    ``alpha_weighted``: layers whose rigidity terms are weighted by their (detached) alpha at the
    main points. The terms of every phase (:func:`core_loss_terms`) and the two that stop early
    (:func:`phase_loss_terms`)."""
    out = core_loss_terms(lc, uv_scales, rez, residuals, uv, rgb, res, alpha, gt, dx_gt, dy_gt, ok_fw, ok_bw,
                          consistency, alpha_weighted, groups[0])
    out.update(phase_loss_terms(lc, uv_scales, global_weights, rez, use_global, uv, alpha, target,
                                alpha_weighted, groups[1]))
    return out


def core_loss_terms(lc, uv_scales: tuple, rez: int, residuals: bool, uv: list, rgb: list, res: list,
                    alpha: torch.Tensor, gt: torch.Tensor, dx_gt: torch.Tensor, dy_gt: torch.Tensor,
                    ok_fw: torch.Tensor, ok_bw: torch.Tensor, consistency: Optional[list] = None,
                    alpha_weighted: tuple = (), rigidity: tuple = (5, 6)) -> dict[str, torch.Tensor]:
    """The loss terms of every schedule phase (all but the alpha bootstrapping and the global
    rigidity, which stop early), with the rigidity neighbours at groups ``rigidity``. A pure
    function of tensors and constants whose inputs keep their shapes over the whole schedule, so
    that torch.compile (``train.compile_losses``) compiles it once, not again at each stop."""
    N = len(uv)
    d = float(lc.rigidity_derivative)
    color = sum(rgb[i] * res[i] * alpha[:3, :, i:i + 1] for i in range(N))  # (3, B, 3)
    out: dict[str, torch.Tensor] = {}
    out["rgb"] = lc.rgb * L.rgb_loss(color[0], gt)
    if lc.gradient:
        out["gradient"] = lc.gradient * L.gradient_loss(color[0], color[1], color[2], dx_gt, dy_gt)
    if N > 1:
        if lc.sparsity:
            out["sparsity"] = lc.sparsity * L.sparsity_loss([r[0] for r in rgb], alpha[0])
        if lc.alpha_reg:
            out["alpha_reg"] = lc.alpha_reg * L.alpha_reg_loss(alpha[0])
        if lc.flow_alpha:
            out["flow_alpha"] = lc.flow_alpha * L.flow_alpha_loss(alpha[0], alpha[3], ok_fw, alpha[4], ok_bw)
    gx, gy = rigidity
    for i in range(N):
        s = uv_scales[i]
        w = alpha[0][:, i].detach() if i in alpha_weighted else None
        if lc.optical_flow:
            out[f"optical_flow_{i}"] = lc.optical_flow * L.flow_mapping_loss(
                uv[i][0], uv[i][3], ok_fw, uv[i][4], ok_bw, alpha[0][:, i], rez, s)
        if lc.rigidity:
            out[f"rigidity_{i}"] = lc.rigidity * L.rigidity_loss(uv[i][0], uv[i][gx], uv[i][gy], rez, s, d, w)
        if residuals and lc.residual_reg:
            out[f"residual_reg_{i}"] = lc.residual_reg * L.residual_reg_loss(res[i][0])
        if consistency is not None:
            out[f"residual_consistent_{i}"] = lc.residual_consistent * consistency[i]
    return out


def phase_loss_terms(lc, uv_scales: tuple, global_weights: tuple, rez: int, use_global: bool, uv: list,
                     alpha: torch.Tensor, target: Optional[torch.Tensor], alpha_weighted: tuple = (),
                     global_groups: tuple = (7, 8)) -> dict[str, torch.Tensor]:
    """The two terms of the first iterations: the alpha bootstrapping (``target`` None: stopped)
    and the global rigidity (``use_global``), a few small kernels, run eagerly."""
    N = len(uv)
    out: dict[str, torch.Tensor] = {}
    if N > 1 and target is not None:
        out["alpha_bootstrapping"] = lc.alpha_bootstrapping * L.alpha_bootstrapping_loss(alpha[0], target)
    if use_global:
        D = float(lc.global_rigidity_derivative)
        gx, gy = global_groups
        for i in range(N):
            if global_weights[i]:
                w = alpha[0][:, i].detach() if i in alpha_weighted else None
                out[f"global_rigidity_{i}"] = global_weights[i] * L.rigidity_loss(
                    uv[i][0], uv[i][gx], uv[i][gy], rez, uv_scales[i], D, w)
    return out


def rigidity_groups(stencil: str) -> tuple:
    """Query groups of the rigidity and global-rigidity neighbours (x, y) in a step.

    ``backward`` (the seed's): p - d e_x and p - d e_y are groups 5 and 6 of their own, the global
    rigidity's 7 and 8. ``shared``: the rigidity reuses the gradient loss's p + e_x, p + e_y
    (groups 1, 2; d = 1), so the global rigidity's move to 5 and 6. A forward difference is the
    backward difference of the next pixel: over a uniform sample of pixels the two stencils see
    the same pairs, and the loss is even in J (J -> -J leaves J^T J unchanged), so
    :func:`losses.rigidity_loss` takes either order."""
    if stencil == "shared":
        return (1, 2), (5, 6)
    return (5, 6), (7, 8)


class CompiledOrEager:
    """``torch.compile(fn)`` that falls back to ``fn`` itself when compiling fails.

    Inductor needs a working Triton (and its host C compiler) at the first call; a workstation
    without them still trains, eagerly, with one line saying why. Only the first call may fall
    back: it runs outside CUDA-graph capture (the warm-up steps), and an error that the eager
    function raises too is the caller's, raised as it is."""

    def __init__(self, fn, note=None, backend="inductor") -> None:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False, backend=backend)
        self.note = note or (lambda text: None)
        self.state = "untried"  # -> "compiled" | "eager"
        self.error = ""

    def __call__(self, *args):
        if self.state == "compiled":
            return self.compiled(*args)
        if self.state == "eager":
            return self.fn(*args)
        try:
            out = self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; eager re-raises real errors
            out = self.fn(*args)
            root = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # dynamo wraps the cause
            text = str(root).strip().splitlines()
            self.state, self.error = "eager", f"{type(root).__name__}: {text[0] if text else ''}"
            self.note(f"compiled loss algebra unavailable ({self.error[:200]}); training with the eager one")
            return out
        self.state = "compiled"
        return out


class Trainer:
    def __init__(self, clip: Clip, flow, config: Config, device: Optional[torch.device] = None,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> None:
        self.cfg = config.validate()
        self.device = device or resolve_device(self.cfg.train.device)
        self.progress = progress or null_progress
        self.cancel = cancel or CancelToken()
        torch.manual_seed(self.cfg.train.seed)  # Linear-layer initialisation
        self.data = TrainingData(clip, flow, self.device)
        self.geom = self.data.geometry
        self.grids_reason = None
        if self.cfg.model.grids_from_shot:  # the resolved grids are this trainer's config (checkpoints)
            tex, xyt, self.grids_reason = S.shot_grids(self.cfg.model.texture_grid, self.cfg.model.xyt_grid,
                                                       self.geom.width, self.geom.height)
            self.cfg = self.cfg.replace(model={"texture_grid": asdict(tex), "xyt_grid": asdict(xyt)})
        self.model = LayeredModel(self.data.n_layers, self.cfg.model, self.device, seed=self.cfg.train.seed)
        t = self.cfg.train
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
        self.use_graphs = cuda and t.cuda_graphs and hasattr(torch.cuda.CUDAGraph, "register_generator_state")
        # fused Adam: one kernel for every parameter; capturable: its step count lives on the
        # device so the update can be replayed inside a CUDA graph
        self.optimizer = torch.optim.Adam(self.model.param_groups(t.grid_lr, t.mlp_lr, t.mapping_lr),
                                          **({"fused": True, "capturable": True} if cuda else {}))
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._lr_factor = 1.0
        self.install_lr_tensors()
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(t.seed)
        self.state = TrainState()
        # the schedule (backend/train/schedule.py): horizon, loss stops, budget; a checkpoint's wins
        self.plan = S.initial_plan(t, self.cfg.losses, self.geom.width, self.geom.height, self.geom.n_frames)
        self.deadline = time.perf_counter() + t.budget_s  # the pipeline counts from its own start
        warm = (10, 40) if cuda else (3, 10)  # CUDA: graph capture and compilation in the first steps
        self._timer = S.StepTimer(*warm)
        self._graphs: dict[tuple, _Graph] = {}
        self._eager_in_phase: dict[tuple, int] = {}
        self._compiled_terms = None
        # constants used inside the step (no host-to-device copies while a graph is captured)
        self._patch_offsets = torch.tensor([[0, 0], [-1, -1], [-1, 0], [-1, 1], [0, 1], [1, 1], [1, 0], [1, -1],
                                            [0, -1]], device=self.device)

    # ---------------------------------------------------------------- helpers
    def grids_report(self) -> dict:
        """The hash grids this trainer built (report.json ``grids``), and why."""
        m = self.cfg.model
        return {"from_shot": m.grids_from_shot, "texture": asdict(m.texture_grid), "xyt": asdict(m.xyt_grid),
                "reason": self.grids_reason or "grids as configured"}

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    def _randint(self, low: int, high: int, shape: tuple) -> torch.Tensor:
        return torch.randint(low, high, shape, device=self.device, generator=self.gen)

    # ------------------------------------------------------------ schedule
    @property
    def horizon(self) -> int:
        """The planned iterations: the learning-rate horizon and where training ends."""
        return self.plan.iterations if self.plan.scheduled else self.cfg.train.iterations

    @property
    def stops(self) -> tuple[int, int]:
        """(alpha bootstrapping, global rigidity): the last iteration each term is on."""
        if self.plan.scheduled:
            return self.plan.alpha_bootstrapping_stop, self.plan.global_rigidity_stop
        return self.cfg.losses.alpha_bootstrapping_stop, self.cfg.losses.global_rigidity_stop

    def lr_factor(self, iteration: int) -> float:
        """The schedule's multiplier of every group's learning rate at ``iteration`` (1-based)."""
        t, n = self.cfg.train, self.horizon
        if t.lr_schedule == "constant" or n <= 0:
            return 1.0
        start = t.lr_decay_start * n
        if iteration <= start:
            return 1.0
        p = min((iteration - start) / max(n - start, 1.0), 1.0)
        return t.lr_final_factor + (1.0 - t.lr_final_factor) * 0.5 * (1.0 + math.cos(math.pi * p))

    def install_lr_tensors(self) -> None:
        """A scheduled rate must change between CUDA-graph replays: the captured (fused, capturable)
        Adam then reads it from a device tensor, updated in place. The constant schedule keeps the
        seed's plain floats."""
        if self.use_graphs and self.cfg.train.lr_schedule != "constant":
            for g, base in zip(self.optimizer.param_groups, self._base_lrs):
                g["lr"] = torch.tensor(base * self._lr_factor, dtype=torch.float32, device=self.device)

    def restore_lr(self, iteration: int) -> None:
        """After loading optimizer state saved at ``iteration`` (whose groups hold float rates)."""
        self._lr_factor = self.lr_factor(iteration)
        for g, base in zip(self.optimizer.param_groups, self._base_lrs):
            g["lr"] = base * self._lr_factor
        self.install_lr_tensors()

    def _apply_lr(self, iteration: int) -> None:
        k = self.lr_factor(iteration)
        if k == self._lr_factor:
            return
        self._lr_factor = k
        for g, base in zip(self.optimizer.param_groups, self._base_lrs):
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(base * k)
            else:
                g["lr"] = base * k

    def global_rigidity_weight(self, layer: int) -> float:
        lc = self.cfg.losses
        return lc.global_rigidity_bg if layer == self.n_layers - 1 else lc.global_rigidity_fg

    # ------------------------------------------------------------ pretraining
    def uv_init(self) -> UVInit:
        """The pretraining target of every layer (``model.uv_init``, backend/train/uvfit.py)."""
        m, d, g = self.cfg.model, self.data, self.geom
        if m.uv_init == "fit":
            return fit_init(d.targets, d.flow_fw, d.ok_fw, g.width, g.height, m.uv_scale_fg, m.uv_scale_bg)
        return seed_init(self.n_layers, g.n_frames, m.uv_scale_fg, m.uv_scale_bg, self.device)

    def alpha_weighted_rigidity(self) -> tuple:
        """Layers whose rigidity terms are alpha-weighted: the fitted objects (docs/deviations.md)."""
        return tuple(range(self.n_layers - 1)) if self.cfg.model.uv_init == "fit" else ()

    def pretrain(self) -> None:
        """Each mapping towards its target uv = s_i * (xy + o_i(f)) (uvfit.py; the seed's s_i * xy):
        pretrain_iterations passes over the frames, one Adam step of every layer per frame
        (backend/train/pretrain.py; a CUDA graph on CUDA). Sets the model's per-layer scales s_i.
        Under a time budget pretraining stops after the pass that ends past its share
        (``schedule.PRETRAIN_SHARE`` of the budget)."""
        t, g = self.cfg.train, self.geom
        init = self.uv_init()
        self.model.uv_scales = [float(s) for s in init.scales]
        run = MappingPretraining(self.model, g, init, t.pretrain_batch_size, t.mapping_lr, self.gen,
                                 self.device, self.use_graphs)
        limit = S.PRETRAIN_SHARE * t.budget_s if t.budget_s > 0 else None
        passes, t0 = 0, time.perf_counter()
        for _ in range(t.pretrain_iterations):
            for f in range(g.n_frames):
                run.step(f)
            passes += 1
            if self.cancel.cancelled:
                raise Cancelled(self.cancel.reason or "cancelled")
            self.progress(Progress("pretrain", fraction=0.05 * passes / max(t.pretrain_iterations, 1),
                                   message=f"mapping pretraining, {self.n_layers} layers",
                                   elapsed_s=time.perf_counter() - t0))
            if limit is not None:
                if self.device.type == "cuda":  # replays are queued: the time is the device's
                    torch.cuda.synchronize(self.device)
                if time.perf_counter() - t0 > limit:
                    break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if limit is not None:
            self.plan.pretrain_passes = [passes] * self.n_layers
        self.state.pretrained = True
        self.state.pretrain_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------- step
    def compute_losses(self, iteration: int) -> dict[str, torch.Tensor]:
        cfg, lc, m, g, data = self.cfg, self.cfg.losses, self.model, self.geom, self.data
        B, N, rez = cfg.train.batch_size, self.n_layers, g.rez
        b = data.sample(B, self.gen)
        x, y, f = b.x.float(), b.y.float(), b.f.float()
        fw, bw, ok_fw, ok_bw = data.flow_at(b)
        d, D = float(lc.rigidity_derivative), float(lc.global_rigidity_derivative)
        boot_stop, global_stop = self.stops
        use_global = iteration <= global_stop and (lc.global_rigidity_fg > 0 or lc.global_rigidity_bg > 0)
        # query groups: 0 main, 1 x+1, 2 y+1, 3 flow fw, 4 flow bw, then the rigidity neighbours
        # (5/6, or 1/2 with the shared stencil) and the global rigidity's (the next two)
        xs = [x, x + 1, x, x + fw[:, 0], x + bw[:, 0]]
        ys = [y, y, y + 1, y + fw[:, 1], y + bw[:, 1]]
        fs = [f, f, f, f + 1, f - 1]
        groups = rigidity_groups(lc.rigidity_stencil)
        if groups[0] != (1, 2):
            xs += [x - d, x]
            ys += [y, y - d]
            fs += [f, f]
        n_core = len(xs)  # the groups of every phase; the early-stopping terms' come after
        if use_global:
            xs += [x - D, x]
            ys += [y, y - D]
            fs += [f, f]
        G = len(xs)
        xyt = g.xyt(torch.cat(xs), torch.cat(ys), torch.cat(fs))
        uv = [m.mapping(i, xyt).view(G, B, 2) for i in range(N)]
        xyt3 = xyt[:3 * B]
        t3 = xyt3[:, 2:3]
        rgb = [m.texture(i, uv[i][:3].reshape(-1, 2)).view(3, B, 3) for i in range(N)]
        # each layer's residual once per step: groups 0-2 and the consistency term's queries together
        rc_on = m.residuals is not None and bool(lc.residual_consistent)
        queries = [self.consistency_queries(i, B) for i in range(N)] if rc_on else None
        res, others = [], []
        for i in range(N):
            uv3 = uv[i][:3].reshape(-1, 2)
            if rc_on:
                q = queries[i]
                r = m.residual(i, torch.cat([uv3, q["uv"]]), torch.cat([t3, q["t"]]))
                res.append(r[:3 * B].view(3, B, 3))
                others.append(r[3 * B:].view(q["shape"]))
            else:
                res.append(m.residual(i, uv3, t3).view(3, B, 3))
        alpha = m.alpha(xyt[:5 * B]).view(5, B, N)

        gt = data.color(b)
        dx_gt, dy_gt = data.color_gradients(b)
        bootstrap = N > 1 and bool(lc.alpha_bootstrapping) and iteration <= boot_stop
        target = data.targets[b.f, b.y, b.x].float() if bootstrap else None
        consistency = [L.residual_consistency_loss(queries[i]["target"], others[i], queries[i]["invisible"])
                       for i in range(N)] if rc_on else None
        scales, weighted = tuple(m.uv_scales), self.alpha_weighted_rigidity()
        # the every-phase terms see the same shapes from the first iteration to the last (the
        # first n_core groups of each mapping output, always as a view), so a compiled version is
        # built once; the early terms read the later groups
        out = self._core_terms()(lc, scales, rez, m.residuals is not None, [u[:n_core] for u in uv], rgb, res,
                                 alpha, gt, dx_gt, dy_gt, ok_fw, ok_bw, consistency, weighted, groups[0])
        out.update(phase_loss_terms(lc, scales, tuple(self.global_rigidity_weight(i) for i in range(N)), rez,
                                    use_global, uv, alpha, target, weighted, groups[1]))
        return out

    def _core_terms(self):
        """:func:`core_loss_terms`, through torch.compile (one fused graph for the loss algebra,
        forward and backward) when ``train.compile_losses`` is set on CUDA."""
        if not (self.cfg.train.compile_losses and self.device.type == "cuda"):
            return core_loss_terms
        if self._compiled_terms is None:
            self._compiled_terms = CompiledOrEager(
                core_loss_terms, lambda text: self.progress(Progress("train", message=text)))
        return self._compiled_terms

    def consistency_queries(self, layer: int, batch: int) -> dict:
        """method.md 2.5, the sampling half: residual patches at the frame border and the frames at
        which their atlas points are compared. Everything here is without gradient (one mapping
        pass for the patches and the test points, one residual pass for the targets); the residual
        at ``uv``/``t`` is what the loss differentiates, evaluated by the caller (batched with the
        step's main residual evaluation in :meth:`compute_losses`)."""
        g, m, T = self.geom, self.model, self.cfg.losses.residual_consistent_frames
        W, H, F_ = g.width, g.height, g.n_frames
        n = max(batch // (9 * T), 1)
        split = self._randint(0, n, (3,)).sort().values
        k = torch.arange(n, device=self.device)
        group = (k >= split[0]).long() + (k >= split[1]).long() + (k >= split[2]).long()
        ry = self._randint(1, H, (n,))
        rx = self._randint(1, W - 1, (n,))
        x = torch.where(group == 0, 1, torch.where(group == 1, W - 2, rx))
        y = torch.where(group <= 1, ry, torch.where(group == 2, 1, H - 2))
        f = self._randint(0, F_, (n,))
        off = self._patch_offsets
        px = (x[:, None] + off[:, 0]).reshape(-1).float()
        py = (y[:, None] + off[:, 1]).reshape(-1).float()
        pf = f[:, None].expand(n, 9).reshape(-1).float()
        xyt_patch = g.xyt(px, py, pf)
        tn = self._randint(0, F_, (T, n))
        xyt_test = g.xyt(x.float().expand(T, n).reshape(-1), y.float().expand(T, n).reshape(-1),
                         tn.reshape(-1).float())
        with torch.no_grad():  # no gradient reaches the mapping or the targets
            uv_both = m.mapping(layer, torch.cat([xyt_patch, xyt_test]))
            uv_patch, uv_test = uv_both[:9 * n], uv_both[9 * n:].view(T, n, 2)
            target = m.residual(layer, uv_patch, xyt_patch[:, 2:3]).view(n, 9, 3)
        t_rep = g.t(tn.float())[:, :, None].expand(T, n, 9).reshape(-1, 1)
        uv_rep = uv_patch.view(1, n * 9, 2).expand(T, n * 9, 2).reshape(-1, 2)
        centre = uv_patch.view(n, 9, 2)[:, 0]
        du = uv_test[..., 0] - centre[:, 0]
        dv = uv_test[..., 1] - centre[:, 1]
        invisible = torch.where(group == 0, du > 0, torch.where(group == 1, du < 0,
                                torch.where(group == 2, dv > 0, dv < 0)))
        return {"uv": uv_rep, "t": t_rep, "target": target, "invisible": invisible, "shape": (T, n, 9, 3)}

    def _eager_step(self, iteration: int) -> dict[str, torch.Tensor]:
        losses = self.compute_losses(iteration)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return losses

    def phase(self, iteration: int) -> tuple[bool, bool]:
        """Which scheduled terms are active: (alpha bootstrapping, global rigidity)."""
        boot_stop, global_stop = self.stops
        return iteration <= boot_stop, iteration <= global_stop

    def step(self, iteration: int) -> dict[str, torch.Tensor]:
        """One optimisation step. On CUDA each schedule phase is captured once as a CUDA graph
        after two eager warm-up steps, then replayed: the same kernels without launch overhead."""
        self._apply_lr(iteration)
        if not self.use_graphs:
            return self._eager_step(iteration)
        key = self.phase(iteration)
        g = self._graphs.get(key)
        if g is not None:
            g.graph.replay()
            return g.losses
        n = self._eager_in_phase.get(key, 0)
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:  # warm-up runs on a side stream by design (PyTorch's graph recipe)
            quiet(False)
        if n < 2:
            self._eager_in_phase[key] = n + 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                losses = self._eager_step(iteration)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return losses
        self._graphs.clear()  # phases only move forward; free the previous phase's graph
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.gen)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            losses = self.compute_losses(iteration)
            sum(losses.values()).backward()
            self.optimizer.step()
        self._graphs[key] = g = _Graph(graph, losses)
        graph.replay()  # capture records without running: this is the step itself
        return g.losses

    # ------------------------------------------------------------------- loop
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Mean full-frame PSNR over the clip, with and without the residual (unclipped, as the seed)."""
        from ..export.outputs import evaluate_frame
        g = self.geom
        ps, ps_nr = [], []
        for f in range(g.n_frames):
            ev = evaluate_frame(self.model, g, f)
            a = ev["alpha"][..., None]
            gt = self.data.frame(f)
            rec = (ev["rgb"] * ev["residual"] * a).sum(0)
            nr = (ev["rgb"] * a).sum(0)
            ps.append(-10 * torch.log10(((rec - gt) ** 2).mean().clamp_min(1e-12)))
            ps_nr.append(-10 * torch.log10(((nr - gt) ** 2).mean().clamp_min(1e-12)))
        return float(torch.stack(ps).mean()), float(torch.stack(ps_nr).mean())

    def train(self, iterations: Optional[int] = None, checkpoint_dir: Optional[Path] = None,
              stop_after_s: Optional[float] = None) -> TrainState:
        """Train up to ``iterations`` (default: the config's); ``stop_after_s`` ends earlier once that
        much training time has passed (benchmarks)."""
        from .checkpoint import save_checkpoint

        total = self.horizon if iterations is None else iterations
        st = self.state
        # the plan is said up front; phases never go back (docs/protocol.md), so before the
        # pretraining it is said in that phase
        phase = "train" if st.pretrained else "pretrain"
        self.progress(Progress(phase, iteration=st.iteration, iterations=total,
                               message="[schedule] " + self.plan.reason()))
        if self.grids_reason:
            self.progress(Progress(phase, iteration=st.iteration, iterations=total,
                                   message="[grids] " + self.grids_reason))
        if not st.pretrained:
            self.progress(Progress("pretrain", message="mapping pretraining"))
            self.pretrain()
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, self)
        report_every = max(1, min(self.cfg.train.log_every // 10, 50))
        every_ckpt = self.cfg.train.checkpoint_every
        every_eval = self.cfg.train.eval_every
        t_last = time.perf_counter()
        it0, sec0 = st.iteration, st.seconds
        self._loop_start = (it0, t_last)
        while st.iteration < total:
            if self.cancel.cancelled:
                if checkpoint_dir is not None:
                    save_checkpoint(checkpoint_dir, self)
                raise Cancelled(self.cancel.reason or "cancelled")
            it = st.iteration + 1
            losses = self.step(it)
            st.iteration = it
            if iterations is None and self.plan.budget_s > 0 and not self.plan.final:
                self._budget_tick(it)
                total = self.horizon
            now = time.perf_counter()
            st.seconds += now - t_last
            t_last = now
            if it % report_every == 0 or it == total:
                self._report(losses, total, it0, sec0)
            if every_eval and (it % every_eval == 0 or it == total):
                self._sync()
                st.seconds += time.perf_counter() - t_last
                p, p_nr = self.evaluate()
                st.evals.append([it, round(st.seconds, 3), round(p, 3), round(p_nr, 3)])
                self.progress(Progress("train", iteration=it, iterations=total, psnr=p,
                                       message=f"eval: psnr {p:.2f} dB ({p_nr:.2f} without residual)",
                                       elapsed_s=st.seconds))
                t_last = time.perf_counter()
            if checkpoint_dir is not None and it % every_ckpt == 0 and it < total:
                save_checkpoint(checkpoint_dir, self)
                t_last = time.perf_counter()
            if stop_after_s is not None and st.seconds >= stop_after_s:
                break
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, self)
        return st

    def _budget_tick(self, it: int) -> None:
        """Measure the step time in a window and cap the plan to the budget (schedule.py). Two
        windows: after the run's first steps, and after the last loss stop (cheaper steps) when
        that is still before the learning rate starts to decay."""
        p, timer = self.plan, self._timer
        if not timer.armed and not p.replans:
            timer.arm(it - 1)
        g = self.geom
        step_s = timer.tick(it, lambda: (self._sync(), time.perf_counter())[1])
        known = step_s if step_s is not None else (p.step_ms / 1e3 if p.step_ms else None)
        export_s = S.estimate_export_s(g.width, g.height, g.n_frames, self.n_layers, self.device.type,
                                       known, self.cfg.train.batch_size)
        left = self.deadline - time.perf_counter() - export_s - S.budget_margin_s(p.budget_s)
        if step_s is None:
            if left > 0:
                return
            # the budget ran out before the window closed (a slow or loaded machine): stop here
            step_s = ((time.perf_counter() - self._loop_start[1]) / max(it - self._loop_start[0], 1)
                      if p.step_ms is None else p.step_ms / 1e3)
            timer.begin = None
        new = S.budget_iterations(it, p.target_iterations, step_s, left)
        if p.scheduled:
            S.with_iterations(p, new, self.cfg.losses, done=it)
        p.capped_by = "budget" if new < p.target_iterations else p.capped_by
        p.step_ms, p.export_estimate_s = round(step_s * 1e3, 3), round(export_s, 1)
        p.replans.append([it, new, p.step_ms, round(left, 1)])
        last_stop = max(self.stops)
        second = timer.warmup + timer.window
        if len(p.replans) == 1 and it < last_stop and last_stop + second < self.cfg.train.lr_decay_start * p.iterations:
            timer.arm(last_stop)
        else:
            p.final = True
        self.progress(Progress("train", iteration=it, iterations=self.horizon,
                               message=f"[schedule] re-planned at iteration {it}: {p.reason()}"))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _report(self, losses: dict[str, torch.Tensor], total: int, it0: int, sec0: float) -> None:
        st = self.state
        keys = list(losses)
        vals = dict(zip(keys, torch.stack([losses[k].detach().float() for k in keys]).tolist()))
        mse = vals["rgb"] / (3.0 * self.cfg.losses.rgb) if self.cfg.losses.rgb else float("nan")
        psnr = -10.0 * math.log10(max(mse, 1e-12))
        st.history.append([st.iteration, round(st.seconds, 3), round(psnr, 3)])
        rate = (st.iteration - it0) / max(st.seconds - sec0, 1e-9)
        eta = (total - st.iteration) / rate if rate > 0 else None
        self.progress(Progress("train", fraction=0.05 + 0.85 * st.iteration / max(total, 1),
                               iteration=st.iteration, iterations=total, eta_s=eta, psnr=psnr,
                               losses=vals, elapsed_s=st.seconds,
                               message=f"{rate:.1f} it/s"))
