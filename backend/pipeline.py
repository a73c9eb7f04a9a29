"""The engine's public entry points: decompose a clip, re-export from a checkpoint, render an edit."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .clip import Clip, load_clip
from .config import Config
from .edit.apply import render_edit
from .errors import CheckpointError, OutputError
from .export.outputs import export_all
from .preprocess.flow import compute_flow
from .progress import CancelToken, Progress, ProgressFn, null_progress
from .train import Trainer, load_checkpoint, read_meta

__all__ = ["decompose", "rerender", "render_edit", "prepare_output"]


def prepare_output(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) and check it is writable, before any work starts."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output folder {out} is not writable: {e.strerror or e}") from None
    return out


def _load(source, cfg: Config, masks, frame_range) -> Clip:
    return load_clip(source, masks=masks, frame_range=frame_range, long_edge=cfg.clip.long_edge,
                     max_frames=cfg.clip.max_frames)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def decompose(source: str | Path, out_dir: str | Path, config: Config,
              masks: Optional[Sequence[str | Path]] = None,
              frame_range: Optional[tuple[int, Optional[int]]] = None,
              progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
              resume: bool = True, clip: Optional[Clip] = None) -> Path:
    """Decompose ``source`` into layered atlases in ``out_dir`` (see docs/architecture.md).

    With ``resume`` a compatible checkpoint in ``out_dir/checkpoints`` is continued; an
    incompatible one raises CheckpointError rather than being overwritten.
    """
    progress = progress or null_progress
    cancel = cancel or CancelToken()
    cfg = config.validate()
    t_start = time.perf_counter()
    created = not Path(out_dir).expanduser().exists()
    out = prepare_output(out_dir)
    progress(Progress("load", message=f"reading {source}"))
    if clip is None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                clip = _load(source, cfg, masks, frame_range)
        except BaseException:
            if created and not any(out.iterdir()):
                out.rmdir()  # bad input leaves nothing behind
            raise
        for w in caught:
            progress(Progress("load", message=str(w.message)))
    cfg.save(out / "config.toml")
    _write_json(out / "clip.json", {
        "source": clip.source or str(Path(source).expanduser().resolve()),
        "masks": None if masks is None else [str(Path(m).expanduser().resolve()) for m in masks],
        "frame_range": list(clip.frame_range)})
    cancel.raise_if_cancelled()
    progress(Progress("flow", fraction=0.0, message=f"optical flow ({cfg.clip.flow_method})"))
    t_flow = time.perf_counter()
    flow = compute_flow(clip, method=cfg.clip.flow_method, cache_dir=out / "cache",
                        consistency_px=cfg.clip.flow_consistency_px,
                        progress=lambda d, n: progress(Progress("flow", fraction=0.0,
                                                                message=f"optical flow {d}/{n}")))
    flow_seconds = time.perf_counter() - t_flow
    cancel.raise_if_cancelled()
    trainer = Trainer(clip, flow, cfg, progress=progress, cancel=cancel)
    ckpt = out / "checkpoints"
    if resume and read_meta(ckpt) is not None:
        it = load_checkpoint(ckpt, trainer)
        progress(Progress("train", iteration=it, iterations=cfg.train.iterations,
                          message=f"resumed from checkpoint at iteration {it}"))
    elif not resume and read_meta(ckpt) is not None:
        raise CheckpointError(f"{ckpt} holds a checkpoint; pass resume=True (CLI: drop --no-resume) "
                              "or choose another output folder")
    trainer.train(checkpoint_dir=ckpt)
    export_all(trainer, clip, out, cfg, progress=progress, cancel=cancel,
               extra_report={"flow_seconds": round(flow_seconds, 3),
                             "total_seconds": round(time.perf_counter() - t_start, 3),
                             "flow_method": cfg.clip.flow_method})
    progress(Progress("done", fraction=1.0, message=f"wrote {out}"))
    return out


def rerender(out_dir: str | Path, progress: Optional[ProgressFn] = None,
             device: Optional[str] = None) -> Path:
    """Re-export atlases, videos, bake and report of ``out_dir`` from its saved checkpoint."""
    out = Path(out_dir)
    cfg_path = out / "config.toml"
    if not cfg_path.exists():
        raise CheckpointError(f"{out} has no config.toml: not a decomposition folder")
    cfg = Config.load(cfg_path)
    if device:
        cfg = cfg.replace(train={"device": device})
    if read_meta(out / "checkpoints") is None:
        raise CheckpointError(f"{out / 'checkpoints'} holds no checkpoint to render from")
    info_path = out / "clip.json"
    if not info_path.exists():
        raise CheckpointError(f"{out} has no clip.json: cannot tell which clip was decomposed")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    clip = _load(info["source"], cfg, info["masks"], tuple(info["frame_range"]))
    trainer = Trainer(clip, None, cfg, progress=progress)  # flow is not needed to export
    load_checkpoint(out / "checkpoints", trainer)
    export_all(trainer, clip, out, cfg, progress=progress)
    return out
