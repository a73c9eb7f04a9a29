"""One typed configuration for a decomposition, with presets and TOML load/save.

Defaults reproduce the seed (vllab/hashing-nvd ``config/config.py``); the
mapping from these names to the seed's config keys is in ``docs/config.md``.
A config is saved next to every output so that a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class GridConfig:
    """tiny-cuda-nn ``HashGrid`` settings (method.md 1.3)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 15
    base_resolution: int = 16
    per_level_scale: float = 1.25


@dataclass
class ModelConfig:
    # mapping MLP (x,y,t) -> (u,v): Identity encoding, plain Linear layers
    mapping_layers: int = 4
    mapping_width: int = 256
    # texture (u,v) -> RGB: 2D hash grid + MLP
    texture_layers: int = 4
    texture_width: int = 64
    # residual (u,v,t) -> RGB gain: 3D hash grid + MLP, softplus
    residual_layers: int = 4
    residual_width: int = 64
    use_residual: bool = True
    # shared alpha (x,y,t) -> N-1 logits: 3D hash grid + MLP
    alpha_layers: int = 4
    alpha_width: int = 64
    # atlas scale per layer kind: pretraining target uv = s * xy (seed: [0.9, 0.6])
    uv_scale_fg: float = 0.9
    uv_scale_bg: float = 0.6
    # how the mapping pretraining's target uv is chosen (backend/train/uvfit.py, docs/atlas.md):
    # "seed": uv = s * xy with the scales above; "fit": each object's mask track fills its atlas
    # (per-frame centre, one scale) and the background's panorama over the camera motion fills its
    uv_init: str = "seed"
    texture_grid: GridConfig = field(default_factory=GridConfig)
    xyt_grid: GridConfig = field(default_factory=GridConfig)
    # grids sized from the shot (backend/train/schedule.py, shot_grids): each hash table holds at
    # least a working frame's pixels (at most 2^21 entries) and the space-time grid's finest level
    # resolves half the frame's long edge; never smaller than texture_grid / xyt_grid
    grids_from_shot: bool = False
    # "auto" picks triton on CUDA, then tinycudann if importable, else torch
    encoding_backend: str = "auto"
    # how the MLPs are evaluated in training (backend/model/mlp_backend.py): torch (the reference),
    # compile (torch.compile / Inductor), triton (fused Triton kernels for the 64-wide networks,
    # Inductor for the mapping) or auto (the measured winner on CUDA, torch on CPU)
    mlp_backend: str = "auto"


@dataclass
class LossConfig:
    """Weights and schedules of every loss term (method.md 2.4)."""

    rgb: float = 5.0
    gradient: float = 1.0
    sparsity: float = 1.0
    alpha_bootstrapping: float = 2.0
    alpha_bootstrapping_stop: int = 10_000
    alpha_reg: float = 0.1
    flow_alpha: float = 0.05
    optical_flow: float = 0.01
    rigidity: float = 0.001
    rigidity_derivative: int = 1
    # "backward": the seed's own queries at p - d e_x, p - d e_y (2 mapping evaluations a sample);
    # "shared": the gradient loss's p + e_x, p + e_y (forward differences; needs d = 1): the same
    # pixel pairs over a uniform sample, 2 of the step's 7 mapping query groups fewer
    # (docs/deviations.md, "Rigidity from the gradient loss's neighbours")
    rigidity_stencil: str = "backward"
    global_rigidity_fg: float = 0.005
    global_rigidity_bg: float = 0.05
    global_rigidity_stop: int = 5_000
    global_rigidity_derivative: int = 100
    residual_reg: float = 0.5
    residual_consistent: float = 0.1
    # residual_consistent draws samples_batch // (9*15) border pixels, 15 frames each
    residual_consistent_frames: int = 15


@dataclass
class TrainConfig:
    # 0: derived from the shot (samples_per_pixel, clamped to min/max_iterations; backend/train/schedule.py)
    iterations: int = 50_000
    # with iterations = 0: training samples per pixel of the working-resolution shot (pixels x frames)
    samples_per_pixel: float = 0.0
    min_iterations: int = 2_000
    max_iterations: int = 200_000
    # wall-clock budget of the whole decomposition in seconds (0: none; CLI --budget 10m): the step
    # time is measured after the first steps and the iterations capped so that training and the
    # estimated export end within it
    budget_s: float = 0.0
    batch_size: int = 10_000
    grid_lr: float = 1e-2
    mlp_lr: float = 1e-4  # texture, residual and alpha MLPs
    mapping_lr: float = 1e-4  # the mapping MLPs (the seed uses mlp_lr for every MLP)
    # learning-rate schedule over ``iterations``: "constant" (the seed) or "cosine": every
    # group keeps its rate until lr_decay_start * iterations, then follows a half cosine
    # down to lr_final_factor times it at the last iteration
    lr_schedule: str = "constant"
    lr_decay_start: float = 0.5
    lr_final_factor: float = 0.1
    # mapping pretraining: pretrain_iterations * n_frames steps per layer
    pretrain_iterations: int = 100
    pretrain_batch_size: int = 10_000
    checkpoint_every: int = 5_000
    log_every: int = 500
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # GPU execution (no effect on CPU). CUDA graphs replay the whole step (same numerics);
    # tf32 lets matrix products use TF32 tensor cores (the seed is plain fp32).
    cuda_graphs: bool = True
    tf32: bool = False
    # the loss algebra (every term but the residual consistency) through torch.compile: a few
    # fused kernels instead of a few hundred small ones (same expressions; CUDA only)
    compile_losses: bool = False
    # evaluate full-frame PSNR every N iterations (0: never); its time is not training time
    eval_every: int = 0


@dataclass
class ClipConfig:
    long_edge: int = 768  # working resolution, aspect kept, never upscaled
    max_frames: int = 100  # seed's maximum_number_of_frames; 0: no cap
    flow_method: str = "dis"  # dis | raft_small | raft_large | auto (RAFT when its weights and a GPU are here)
    flow_consistency_px: float = 1.0


@dataclass
class ExportConfig:
    # square atlas, texel centres (k+0.5)/size over [-1,1]; 0: from the trained mapping, one
    # texel per median visible pixel of the most magnified layer (1000-4096, docs/config.md)
    atlas_size: int = 1000
    video_fps: float = 10.0  # seed writes fps=10; a clip's own fps wins when known
    write_videos: bool = True
    # per-frame uv/alpha/residual maps the edit path renders from (about 63 MB a frame at 1080p
    # with 2 layers); false: atlases, videos and report only, `render --bake` adds them later
    bake: bool = True
    # per-frame STMap + residual EXR sequences for Blender and Nuke (docs/atlas.md, "STMaps"):
    # "working" (maps/, the working resolution), "source" (maps_source/) or "none"
    maps: str = "working"
    workers: int = 0  # threads encoding and writing the exported frames (0: the cores, 2 to 8)


@dataclass
class Config:
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    preset: str = "seed"

    # ----------------------------------------------------------------- dicts
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _from_dict(cls, data, "config")

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """Return a copy with some fields changed, e.g. ``replace(train={"iterations": 10})``."""
        d = self.to_dict()
        for section, values in sections.items():
            if section not in d:
                raise ConfigError(f"unknown config section {section!r}")
            if isinstance(values, dict):
                _deep_update(d[section], values, section)
            else:
                d[section] = values
        return Config.from_dict(d)

    def with_settings(self, items) -> "Config":
        """Apply ``SECTION.FIELD=VALUE`` settings (the CLI's ``--set``), in order; nested tables by
        more dots (``model.texture_grid.log2_hashmap_size=20``). VALUE is a TOML value (``0.05``,
        ``true``, ``"shared"``); anything that is not one is taken as a string (``shared``)."""
        cfg = self
        for item in items:
            from neural_atlas.core.settings import nested, parse_setting  # the syntax's one definition
            try:
                parts, value, text = parse_setting(item)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            current: Any = cfg.to_dict()
            for k in parts:
                current = current.get(k) if isinstance(current, dict) else None
            if isinstance(current, str) and not isinstance(value, str):
                value = text  # a string field: `--set losses.rigidity_stencil=shared` needs no quotes
            cfg = cfg.replace(**nested(parts, value))
        return cfg

    # ------------------------------------------------------------------ toml
    def save(self, path: str | Path) -> None:
        Path(path).write_text(dumps_toml(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
        base = preset(data.pop("preset", "seed"))
        d = base.to_dict()
        _deep_update(d, data, "config")
        return cls.from_dict(d)

    def validate(self) -> "Config":
        t, m, c = self.train, self.model, self.clip
        checks = [
            (t.iterations >= 0, "train.iterations must be >= 0"),
            (t.samples_per_pixel >= 0 and math.isfinite(t.samples_per_pixel),
             "train.samples_per_pixel must be >= 0"),
            (t.iterations > 0 or t.samples_per_pixel > 0,
             "train.iterations = 0 (derived) needs train.samples_per_pixel > 0"),
            (1 <= t.min_iterations <= t.max_iterations, "train.min_iterations must be in 1..max_iterations"),
            (t.budget_s >= 0 and math.isfinite(t.budget_s), "train.budget_s must be >= 0 (0: no budget)"),
            (t.batch_size >= 16, "train.batch_size must be >= 16"),
            (t.grid_lr > 0 and t.mlp_lr > 0 and t.mapping_lr > 0, "learning rates must be > 0"),
            (t.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be constant|cosine"),
            (0.0 <= t.lr_decay_start <= 1.0, "train.lr_decay_start must be in [0, 1]"),
            (0.0 < t.lr_final_factor <= 1.0, "train.lr_final_factor must be in (0, 1]"),
            (t.pretrain_iterations >= 0, "train.pretrain_iterations must be >= 0"),
            (t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
            (m.mapping_layers >= 2 and m.texture_layers >= 2, "MLPs need >= 2 layers"),
            (m.encoding_backend in ("auto", "torch", "triton", "tcnn"),
             "model.encoding_backend must be auto|torch|triton|tcnn"),
            (m.mlp_backend in ("auto", "torch", "compile", "triton"),
             "model.mlp_backend must be auto|torch|compile|triton"),
            (m.uv_init in ("seed", "fit"), "model.uv_init must be seed|fit"),
            (self.losses.rigidity_stencil in ("backward", "shared"),
             "losses.rigidity_stencil must be backward|shared"),
            (self.losses.rigidity_stencil != "shared" or self.losses.rigidity_derivative == 1,
             "losses.rigidity_stencil = \"shared\" reuses the gradient loss's 1-pixel neighbours: it needs "
             "losses.rigidity_derivative = 1"),
            (c.long_edge >= 16, "clip.long_edge must be >= 16"),
            (c.max_frames == 0 or c.max_frames >= 2, "clip.max_frames must be 0 (no cap) or >= 2"),
            (c.flow_method in ("dis", "raft_small", "raft_large", "auto"),
             "clip.flow_method must be dis|raft_small|raft_large|auto"),
            (self.export.atlas_size == 0 or 16 <= self.export.atlas_size <= 16384,
             "export.atlas_size must be 0 (auto) or 16-16384"),
            (0 <= self.export.workers <= 256, "export.workers must be in 0..256"),
            (self.export.maps in ("working", "source", "none"),
             "export.maps must be 'working', 'source' or 'none'"),
        ]
        for grid in (m.texture_grid, m.xyt_grid):
            checks += [
                (1 <= grid.n_levels <= 32, "grid n_levels must be in 1..32"),
                (1 <= grid.n_features_per_level <= 8, "grid n_features_per_level must be in 1..8"),
                (4 <= grid.log2_hashmap_size <= 24, "grid log2_hashmap_size must be in 4..24"),
                (grid.base_resolution >= 2, "grid base_resolution must be >= 2"),
                (grid.per_level_scale >= 1.0 and math.isfinite(grid.per_level_scale),
                 "grid per_level_scale must be >= 1"),
            ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


# --------------------------------------------------------------------- presets
PRESETS = ("seed", "demo", "fast", "quality", "cpu")


def _small_cpu_model(cfg: Config) -> None:
    """What the CPU presets (``cpu``, ``demo``) share: the 64-wide mapping MLP, rates of 1e-3 for
    every MLP, a short mapping pretraining and a progress line every 100 iterations."""
    cfg.model.mapping_width = 64
    cfg.train.pretrain_iterations = 10
    cfg.train.pretrain_batch_size = 2048
    cfg.train.log_every = 100
    cfg.train.mlp_lr = 1e-3
    cfg.train.mapping_lr = 1e-3


def preset(name: str) -> Config:
    """Named starting points. ``seed`` is the reference configuration.

    * ``seed``: the reference implementation's defaults (50k iterations, 10k batch).
    * ``fast``: the seed's model and losses tuned for time to quality on a GPU (docs/benchmarks.md).
    * ``quality``: ``fast`` with a schedule from the shot's size (150 samples per pixel, meant to
      be used with a ``--budget``), atlases fitted to their layers (``model.uv_init = "fit"``) and
      sized from the mapping.
    * ``demo``: a small model for the 2-core CPU demo (see docs/deviations.md).
    * ``cpu``: real footage on a CPU: a small model at long edge 256 and a cheap export.
    """
    cfg = Config()
    if name == "seed":
        pass
    elif name == "quality":
        cfg = preset("fast")
        # everything `fast` has (2^19 tables, cosine, TF32, ...), trained for a number of samples per
        # pixel of the shot instead of a fixed 8,000 iterations (docs/config.md, "Schedules"); the
        # loss stops stay at fast's number of samples
        cfg.train.iterations = 0
        cfg.train.samples_per_pixel = 150.0
        cfg.train.checkpoint_every = 5_000
        # atlases fitted to their layer: objects from their mask track, the background from the
        # camera motion (docs/atlas.md, docs/deviations.md)
        cfg.model.uv_init = "fit"
        # hash tables and the space-time grid's finest level from the shot's size: unchanged at
        # tennis's 448x256 or at long edge 768; at 1080p 2^21 tables and a finest space-time level
        # of 960 (car-turn, 150 s budget: +0.58 dB, atlas-only +0.21 dB, docs/benchmarks.md)
        cfg.model.grids_from_shot = True
        cfg.export.atlas_size = 0  # sized from the mapping: sharp atlases at any resolution
    elif name == "fast":
        # time to quality on a GPU (docs/deviations.md, docs/benchmarks.md): 4x the seed's batch with
        # the bootstrapping/global-rigidity stops at the same number of samples, 8k iterations with a
        # cosine decay over the second half, MLP rates 1e-3 (mapping 5e-4), hash tables of 2^19
        # entries (the texture's finest level at 2006 instead of 455), TF32 matrix products,
        # shorter mapping pretraining
        cfg.model.texture_grid = GridConfig(log2_hashmap_size=19, per_level_scale=1.38)
        cfg.model.xyt_grid = GridConfig(log2_hashmap_size=19)
        cfg.train.batch_size = 40_000
        cfg.train.iterations = 8_000
        cfg.train.mlp_lr = 1e-3
        cfg.train.mapping_lr = 5e-4
        cfg.train.lr_schedule = "cosine"
        cfg.train.pretrain_iterations = 25
        cfg.train.checkpoint_every = 2_000
        cfg.train.log_every = 250
        cfg.train.tf32 = True
        cfg.losses.alpha_bootstrapping_stop = 2_500
        cfg.losses.global_rigidity_stop = 1_250
        # 5x the method's flow weight: edits stick to the footage (tennis, against RAFT: 0.59x the
        # background's per-frame error, 0.42x over 10 frames; 1080p synthetic demo: drift 0.66 ->
        # 0.26 px) for -0.45 dB of reconstruction on tennis and +1.1 dB atlas-only
        # (docs/deviations.md, "Optical-flow weight")
        cfg.losses.optical_flow = 0.05
        cfg.export.atlas_size = 0  # sized from the mapping: sharp atlases at any resolution
    elif name == "cpu":
        # real footage on a CPU (docs/config.md, docs/deviations.md): long edge 256, the demo's
        # 64-wide mapping, 12-level grids with larger tables and a finer finest texture level, a
        # 2k batch for a number of samples per pixel (use --budget to bound the time), a cheap
        # export (512^2 atlases, no videos or EXR maps: `render DIR` / `render DIR --maps` add them)
        _small_cpu_model(cfg)
        cfg.clip.long_edge = 256
        cfg.model.texture_grid = GridConfig(n_levels=12, log2_hashmap_size=16, base_resolution=16,
                                            per_level_scale=1.4)
        cfg.model.xyt_grid = GridConfig(n_levels=12, log2_hashmap_size=16, base_resolution=4,
                                        per_level_scale=1.35)
        cfg.train.iterations = 0
        cfg.train.samples_per_pixel = 2.0
        cfg.train.min_iterations = 300
        cfg.train.max_iterations = 20_000
        cfg.train.batch_size = 2048
        cfg.train.checkpoint_every = 500
        cfg.train.lr_schedule = "cosine"
        cfg.losses.alpha_bootstrapping_stop = 800
        cfg.losses.global_rigidity_stop = 400
        cfg.export.atlas_size = 512
        cfg.export.write_videos = False
        cfg.export.maps = "none"
    elif name == "demo":
        # the 2-core CPU demo (docs/deviations.md): a narrower mapping MLP, 8-level grids,
        # 1k batch, 400 iterations with the schedules scaled to them, 256^2 atlases
        _small_cpu_model(cfg)
        cfg.clip.long_edge = 128
        cfg.model.texture_grid = GridConfig(n_levels=8, log2_hashmap_size=14, base_resolution=8,
                                            per_level_scale=1.4)
        cfg.model.xyt_grid = GridConfig(n_levels=8, log2_hashmap_size=14, base_resolution=4,
                                        per_level_scale=1.4)
        cfg.train.iterations = 400
        cfg.train.batch_size = 1024
        cfg.train.checkpoint_every = 200
        cfg.losses.alpha_bootstrapping_stop = 300
        cfg.losses.global_rigidity_stop = 150
        cfg.export.atlas_size = 256
    else:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg.preset = name
    return cfg.validate()


# ------------------------------------------------------------------- helpers
def _deep_update(dst: dict, src: dict, where: str) -> None:
    for k, v in src.items():
        if k not in dst:
            raise ConfigError(f"unknown config field {where}.{k}")
        if isinstance(dst[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config field {where}.{k} must be a table")
            _deep_update(dst[k], v, f"{where}.{k}")
        else:
            dst[k] = v


def _from_dict(cls: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"unknown config field {where}.{k}")
        f = fields[k]
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                   else f.default)
        if dataclasses.is_dataclass(default):
            kwargs[k] = _from_dict(type(default), v, f"{where}.{k}")
        else:
            kwargs[k] = _coerce(v, default, f"{where}.{k}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def dumps_toml(d: dict[str, Any]) -> str:
    """Write nested dicts of scalars as TOML (tables for dicts)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise ConfigError(f"cannot write {type(v).__name__} to TOML")

    def emit(table: dict[str, Any], prefix: str) -> None:
        plain = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
        nested = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if prefix and plain:
            lines.append(f"[{prefix}]")
        for k, v in plain:
            lines.append(f"{k} = {scalar(v)}")
        if plain:
            lines.append("")
        for k, v in nested:
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(d, "")
    return "\n".join(lines).rstrip() + "\n"
