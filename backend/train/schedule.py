"""Training schedules that scale with the shot (docs/config.md, "Schedules").

A :class:`Plan` says how many iterations a run trains, at which batch, and where the
step-based loss stops fall. It comes from the configuration and the shot's size:

* ``train.iterations > 0``: that many iterations (the seed's behaviour), unless a budget caps it.
* ``train.iterations = 0`` ("derived"): ``train.samples_per_pixel`` samples for every pixel of
  the working-resolution shot (width x height x frames): ``iterations = spp * pixels / batch``,
  clamped to ``[train.min_iterations, train.max_iterations]``.
* ``train.budget_s > 0``: the trainer measures its real step time once the first steps (CUDA
  graph capture, compilation) are behind it and caps the iterations so that training plus the
  estimated export ends within the budget, counted from the start of the decomposition
  (:func:`budget_iterations`). It measures again once the scheduled loss terms have stopped
  (the steps get cheaper), as long as the learning rate has not started to decay.

The cosine learning-rate horizon follows the planned iterations. The loss stops
(``alpha_bootstrapping_stop``, ``global_rigidity_stop``) are given for the configured batch; a
derived plan keeps them at the same number of samples for the plan's batch and at most a
fixed share of the planned iterations (``STOP_SHARE``), so a short budgeted run still spends
most of its steps without them. Everything here but :class:`BudgetClock` is a pure function
of numbers, so it can be tested without training.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from ..errors import ConfigError

#: Largest share of the planned iterations each loss stop may take in a derived or budgeted
#: plan (``fast``: bootstrapping 2,500 and global rigidity 1,250 of 8,000 iterations).
STOP_SHARE = {"alpha_bootstrapping_stop": 0.3125, "global_rigidity_stop": 0.15625}

#: Largest share of a time budget the mapping pretraining may take (whole passes over the frames;
#: on a GPU it takes a few seconds and never reaches it).
PRETRAIN_SHARE = 0.1

#: Rough export time per pixel-frame of a two-layer shot (evaluation, PSNR, PNG frames, baked maps;
#: more layers cost proportionally more), seconds, and a fixed part per layer for the atlases.
#: GPU: an H200 machine exported 100 frames of 1080p in 10.1-12.1 s (docs/benchmarks.md); CPU:
#: the 2-core machine took 71 s for tennis at long edge 256 (70 frames) under load.
EXPORT_S_PER_PIXEL_FRAME = {"cuda": 5.5e-8, "cpu": 2.7e-5, "mps": 2e-6}
EXPORT_S_PER_LAYER = {"cuda": 2.0, "cpu": 3.0, "mps": 3.0}
#: On a CPU the export's speed follows the machine's load as the training step's does, so once
#: the step time is measured the estimate scales from it: the export evaluates every pixel of
#: every frame once, forward only, at this fraction of a training step's cost per sample. The
#: 2-core machine, quiet: tennis at 256 (2.6 M pixel-frames) exported in 24 s at 166 ms per step of
#: 2,048 samples (0.07 beside 6 s for the atlases; 0.10 keeps a margin).
EXPORT_STEP_FRACTION = 0.10


def parse_budget(text: str | float | int) -> float:
    """``"10m"``, ``"90s"``, ``"1h"``, ``"1h30m"``, ``"600"`` (seconds) -> seconds; 0 or ``"none"``: no budget."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or not math.isfinite(text):
            raise ConfigError(f"a time budget must be >= 0 seconds, got {text!r}")
        return float(text)
    s = str(text).strip().lower()
    if s in ("", "0", "none", "off"):
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|min|s)", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(h|m|min|s)", "", s).strip():
        raise ConfigError(f"cannot read the time budget {text!r}; write e.g. 90s, 10m, 1h or 1h30m")
    unit = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0}
    return sum(float(v) * unit[u] for v, u in parts)


@dataclass
class Plan:
    iterations: int
    batch_size: int
    alpha_bootstrapping_stop: int
    global_rigidity_stop: int
    pixels: int  # width * height * frames of the working-resolution shot
    derived: bool  # iterations came from samples_per_pixel (train.iterations = 0)
    target_iterations: int  # before any budget cap
    samples_per_pixel_target: float = 0.0
    budget_s: float = 0.0
    capped_by: str = ""  # "", "min_iterations", "max_iterations", "budget"
    step_ms: Optional[float] = None  # the measured step time the budget used
    export_estimate_s: Optional[float] = None
    final: bool = False  # no more re-planning (budget measured twice, or restored from a checkpoint)
    replans: list = field(default_factory=list)  # [iteration, iterations, step_ms, seconds left]
    pretrain_passes: list = field(default_factory=list)  # per layer, when a budget cut pretraining short

    @property
    def samples_per_pixel(self) -> float:
        return self.iterations * self.batch_size / max(self.pixels, 1)

    @property
    def scheduled(self) -> bool:
        """True when the plan, not ``train.iterations``, sets the horizon and the stops."""
        return self.derived or self.budget_s > 0

    def reason(self) -> str:
        spp = f"{self.samples_per_pixel:.1f} samples/pixel over {self.pixels:,} pixel-frames"
        if self.derived:
            why = f"target {self.samples_per_pixel_target:g} spp -> {self.target_iterations:,} iterations"
        else:
            why = f"train.iterations = {self.target_iterations:,}"
        if self.capped_by in ("min_iterations", "max_iterations"):
            why += f" (clamped to train.{self.capped_by})"
        if self.budget_s > 0:
            if self.step_ms is None:
                why += f"; budget {fmt_seconds(self.budget_s)}: step time not measured yet"
            else:
                why += (f"; budget {fmt_seconds(self.budget_s)} at {self.step_ms:.2f} ms/step, export "
                        f"~{fmt_seconds(self.export_estimate_s or 0)}" +
                        (" -> capped" if self.capped_by == "budget" else " -> fits"))
        return (f"{self.iterations:,} iterations of {self.batch_size:,} samples ({spp}); {why}; "
                f"stops: bootstrapping {self.alpha_bootstrapping_stop:,}, global rigidity "
                f"{self.global_rigidity_stop:,}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["samples_per_pixel"] = round(self.samples_per_pixel, 3)
        d["reason"] = self.reason()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        names = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in d.items() if k in names})


def fmt_seconds(s: float) -> str:
    s = float(s)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.2f}h"


def scaled_stop(stop: int, config_batch: int, batch: int, iterations: int, share: float) -> int:
    """A loss stop given for ``config_batch``, at the same number of samples for ``batch`` and at
    most ``share`` of ``iterations`` (never below 1)."""
    same_samples = round(stop * config_batch / max(batch, 1))
    return max(1, min(same_samples, math.ceil(share * iterations)))


def initial_plan(train, losses, width: int, height: int, frames: int) -> Plan:
    """The plan before any step time is known (``train``/``losses``: the config sections)."""
    pixels = int(width) * int(height) * int(frames)
    B = int(train.batch_size)
    derived = train.iterations == 0
    capped = ""
    if derived:
        target = math.ceil(train.samples_per_pixel * pixels / B)
        if target < train.min_iterations:
            target, capped = train.min_iterations, "min_iterations"
        elif target > train.max_iterations:
            target, capped = train.max_iterations, "max_iterations"
    else:
        target = int(train.iterations)
    plan = Plan(iterations=target, batch_size=B, alpha_bootstrapping_stop=losses.alpha_bootstrapping_stop,
                global_rigidity_stop=losses.global_rigidity_stop, pixels=pixels, derived=derived,
                target_iterations=target, samples_per_pixel_target=float(train.samples_per_pixel) if derived else 0.0,
                budget_s=float(train.budget_s), capped_by=capped)
    return with_iterations(plan, target, losses) if plan.scheduled else plan


def with_iterations(plan: Plan, iterations: int, losses, done: int = 0) -> Plan:
    """``plan`` with a new iteration count and the loss stops that follow it; a stop already
    passed (``<= done``) stays where it was, so a term that has stopped never restarts."""
    plan.iterations = int(iterations)
    for name, share in STOP_SHARE.items():
        if done > 0 and getattr(plan, name) <= done:
            continue
        new = scaled_stop(getattr(losses, name), plan.batch_size, plan.batch_size, max(plan.iterations, 1), share)
        setattr(plan, name, max(new, done) if done > 0 else new)
    return plan


def budget_iterations(done: int, target: int, step_s: float, seconds_left: float) -> int:
    """Iterations in all (at least ``done``, at most ``target``) when ``seconds_left`` remain for
    training at ``step_s`` a step."""
    if seconds_left <= 0:
        return int(done)
    if step_s <= 0:
        return target
    more = math.floor(max(seconds_left, 0.0) / step_s)
    return int(max(done, min(target, done + more)))


def estimate_export_s(width: int, height: int, frames: int, layers: int, device_type: str,
                      step_s: Optional[float] = None, batch_size: int = 0) -> float:
    """Seconds the export will take. On a CPU with the measured step time (``step_s`` for
    ``batch_size`` samples) it scales from that (``EXPORT_STEP_FRACTION``), so a quiet machine is
    not charged a loaded one's export; otherwise from the per-pixel constants."""
    kind = device_type if device_type in EXPORT_S_PER_PIXEL_FRAME else "cpu"
    fixed = EXPORT_S_PER_LAYER[kind] * max(layers, 1)
    if kind == "cpu" and step_s and batch_size > 0:
        return EXPORT_STEP_FRACTION * width * height * frames / batch_size * step_s + fixed
    return EXPORT_S_PER_PIXEL_FRAME[kind] * width * height * frames * max(layers, 1) / 2.0 + fixed


#: Shot-sized grids (``model.grids_from_shot``): the largest hash table (2^21 entries x 16 levels x
#: 2 float32 features is 256 MiB a grid, three times that with Adam's moments).
MAX_SHOT_LOG2_TABLE = 21
#: ... and the space-time (residual, alpha) grid's finest level resolves this share of the working
#: frame's long edge.
XYT_FINEST_SHARE = 0.5


def shot_grids(texture, xyt, width: int, height: int) -> tuple:
    """``(texture, xyt, reason)``: the hash grids (``GridConfig``) grown to the working frame.

    Each table gets at least as many entries as a frame has pixels (rounded up to a power of two,
    at most ``2^MAX_SHOT_LOG2_TABLE``); the space-time grid's per-level scale puts its finest level
    at ``XYT_FINEST_SHARE`` x the long edge. Neither ever shrinks below the configured grid, so
    tennis (448x256) and long edge 768 keep the ``fast`` grids (2^19; scale 1.25); 1920x1080 gets
    2^21 tables and a space-time scale of 1.314 (finest level 960)."""
    log2 = min(math.ceil(math.log2(max(width * height, 2))), MAX_SHOT_LOG2_TABLE)
    finest = XYT_FINEST_SHARE * max(width, height)
    levels = max(xyt.n_levels - 1, 1)
    scale = round((finest / xyt.base_resolution) ** (1.0 / levels), 3) if finest > xyt.base_resolution else 0.0
    tex = replace(texture, log2_hashmap_size=max(texture.log2_hashmap_size, log2))
    st = replace(xyt, log2_hashmap_size=max(xyt.log2_hashmap_size, log2),
                 per_level_scale=max(xyt.per_level_scale, scale))
    if (tex, st) == (texture, xyt):
        reason = f"grids as configured (at least a {width}x{height} frame's pixels already)"
    else:
        reason = (f"grids from the shot ({width}x{height}): texture 2^{tex.log2_hashmap_size}, space-time "
                  f"2^{st.log2_hashmap_size} at scale {st.per_level_scale:g} (finest level "
                  f"{st.base_resolution * st.per_level_scale ** levels:.0f})")
    return tex, st, reason


def budget_margin_s(budget_s: float) -> float:
    """Time kept free of the budget for what the estimate misses (checkpoints, the last sync)."""
    return max(2.0, 0.03 * budget_s)


class StepTimer:
    """Times ``window`` steps that start ``warmup`` steps after :meth:`arm`'s iteration; ``clock``
    (given to :meth:`tick`) synchronises the device and returns a time, so only the two ends of a
    window wait for the device."""

    def __init__(self, warmup: int, window: int) -> None:
        self.warmup, self.window = max(int(warmup), 0), max(int(window), 1)
        self.begin: Optional[int] = None
        self.t0: Optional[float] = None

    @property
    def armed(self) -> bool:
        return self.begin is not None

    def arm(self, after_iteration: int) -> None:
        self.begin, self.t0 = int(after_iteration) + self.warmup, None

    def end(self) -> Optional[int]:
        return None if self.begin is None else self.begin + self.window

    def tick(self, iteration: int, clock) -> Optional[float]:
        """Call after each step; returns the mean step time in seconds when a window closes."""
        if self.begin is None:
            return None
        if iteration == self.begin:
            self.t0 = clock()
        elif iteration >= self.begin + self.window and self.t0 is not None:
            dt = (clock() - self.t0) / (iteration - self.begin)
            self.begin, self.t0 = None, None
            return dt
        elif iteration > self.begin and self.t0 is None:  # armed late: start now
            self.begin, self.t0 = iteration, clock()
        return None
