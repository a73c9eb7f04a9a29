"""The engine's public entry points: decompose a clip, re-export from a checkpoint, render an edit."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .clip import Clip, load_clip, write_json
from .config import Config
from .edit.apply import render_edit
from .edit.paint import paint_frame
from .errors import CheckpointError, ConfigError, OutputError
from .export.outputs import export_all
from .preprocess.flow import compute_flow
from .progress import CancelToken, Progress, ProgressFn, null_progress
from .train import Trainer, load_checkpoint, read_meta

__all__ = ["decompose", "rerender", "write_maps", "render_edit", "paint_frame", "prepare_output"]


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
                     max_frames=cfg.clip.max_frames or None)  # 0: no cap


def _detected_masks(clip: Clip, out: Path, detect: dict, progress: ProgressFn) -> list[str]:
    """Detect and track objects once per output folder and attach them to ``clip``.

    The masks are kept at the working resolution as ``out/masks/<object>/<i>.png`` (i counts
    frames of the decomposed range), so a resumed or re-rendered run uses the same layers.
    """
    from .preprocess.masks import attach_masks, detect_masks, write_masks
    folder = out / "masks"
    done = folder / "detected.json"
    if done.exists():
        names = json.loads(done.read_text(encoding="utf-8"))["objects"]
        _attach_mask_folders(clip, [folder / n for n in names])
    else:
        progress(Progress("load", message=f"detecting {', '.join(detect.get('classes', []))} "
                                          f"with {detect.get('detector', 'torchvision')}"))
        objs = detect_masks(clip, **detect)
        attach_masks(clip, objs)
        write_masks(objs, folder, [f"{i:05d}.png" for i in range(clip.n_frames)], overwrite=True)
        names = list(objs.names)
        write_json(done, {"objects": names, "options": {k: str(v) for k, v in detect.items()}})
    return names


def _attach_mask_folders(clip: Clip, folders: list[Path]) -> None:
    """Attach working-resolution mask folders written by :func:`_detected_masks`."""
    import cv2
    import numpy as np
    if not folders:
        clip.masks, clip.mask_names = None, []
        return
    m = np.zeros((clip.n_frames, clip.height, clip.width, len(folders)), np.float32)
    for k, d in enumerate(folders):
        for i in range(clip.n_frames):
            img = cv2.imread(str(d / f"{i:05d}.png"), cv2.IMREAD_GRAYSCALE)
            if img is None or img.shape != (clip.height, clip.width):
                raise CheckpointError(f"detected mask {d / f'{i:05d}.png'} is missing or damaged; "
                                      f"delete {d.parent} to detect again")
            m[i, ..., k] = img > 127
    clip.masks, clip.mask_names = m, [d.name for d in folders]


def decompose(source: str | Path, out_dir: str | Path, config: Config,
              masks: Optional[Sequence[str | Path]] = None,
              frame_range: Optional[tuple[int, Optional[int]]] = None,
              progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
              resume: bool = True, clip: Optional[Clip] = None,
              detect: Optional[dict] = None, flow_options: Optional[dict] = None) -> Path:
    """Decompose ``source`` into layered atlases in ``out_dir`` (see docs/architecture.md).

    With ``resume`` a compatible checkpoint in ``out_dir/checkpoints`` is continued; an
    incompatible one raises CheckpointError rather than being overwritten. ``detect`` holds
    ``backend.preprocess.masks.detect_masks`` options: object masks are then detected and
    tracked (and written to ``out_dir/masks/<object>/``, reused on resume) instead of read.
    ``flow_options`` go to ``compute_flow`` (RAFT weights, flow resolution).
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
    load_seconds = time.perf_counter() - t_start
    detected = _detected_masks(clip, out, detect, progress) if detect is not None else None
    cfg.save(out / "config.toml")
    write_json(out / "clip.json", {
        "source": clip.source or str(Path(source).expanduser().resolve()),
        "masks": None if masks is None else [str(Path(m).expanduser().resolve()) for m in masks],
        "detected_masks": detected,
        "frame_range": list(clip.frame_range)})
    cancel.raise_if_cancelled()
    progress(Progress("flow", fraction=0.0, message=f"optical flow ({cfg.clip.flow_method})"))
    t_flow = time.perf_counter()
    flow = compute_flow(clip, method=cfg.clip.flow_method, cache_dir=out / "cache",
                        consistency_px=cfg.clip.flow_consistency_px, **(flow_options or {}),
                        progress=lambda d, n: progress(Progress("flow", fraction=0.0,
                                                                message=f"optical flow {d}/{n}")))
    flow_seconds = time.perf_counter() - t_flow
    cancel.raise_if_cancelled()
    t_setup = time.perf_counter()
    trainer = Trainer(clip, flow, cfg, progress=progress, cancel=cancel)
    setup_seconds = time.perf_counter() - t_setup
    trainer.deadline = t_start + cfg.train.budget_s  # a budget counts from loading the clip
    ckpt = out / "checkpoints"
    if resume and read_meta(ckpt) is not None:
        it = load_checkpoint(ckpt, trainer)
        progress(Progress("train", iteration=it, iterations=trainer.horizon,
                          message=f"resumed from checkpoint at iteration {it}"))
    elif not resume and read_meta(ckpt) is not None:
        raise CheckpointError(f"{ckpt} holds a checkpoint; pass resume=True (CLI: drop --no-resume) "
                              "or choose another output folder")
    from .train.memory import HostMemorySampler
    with HostMemorySampler() as host_memory:
        trainer.train(checkpoint_dir=ckpt)
    memory = {"host": host_memory.report()}  # during training (and pretraining)
    if trainer.device.type == "cuda":
        import torch
        memory["gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2 ** 30, 3)
        memory["gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved(trainer.device) / 2 ** 30, 3)
    # total_seconds: this call's wall time, loading to the written report (a resumed run counts
    # only its own part)
    cancel.note = "stopping the export (the trained model is in its checkpoint: run again to export)"
    export_all(trainer, clip, out, cfg, progress=progress, cancel=cancel, started=t_start,
               extra_report={"load_seconds": round(load_seconds, 3), "setup_seconds": round(setup_seconds, 3),
                             "flow_seconds": round(flow_seconds, 3),
                             "flow_method": getattr(flow, "method", cfg.clip.flow_method),
                             "schedule": trainer.plan.to_dict(), "grids": trainer.grids_report(),
                             "training_memory": memory})
    progress(Progress("done", fraction=1.0, message=f"wrote {out}"))
    return out


def _restore(out: Path, device: Optional[str], progress: Optional[ProgressFn] = None,
             **export) -> tuple[Config, Clip, Trainer]:
    """The configuration, clip and trained model of the decomposition in ``out`` (its checkpoint)."""
    cfg_path = out / "config.toml"
    if not cfg_path.exists():
        raise CheckpointError(f"{out} has no config.toml: not a decomposition folder")
    cfg = Config.load(cfg_path)
    if device:
        cfg = cfg.replace(train={"device": device})
    if export:
        cfg = cfg.replace(export=export)
    if read_meta(out / "checkpoints") is None:
        raise CheckpointError(f"{out / 'checkpoints'} holds no checkpoint to render from")
    info_path = out / "clip.json"
    if not info_path.exists():
        raise CheckpointError(f"{out} has no clip.json: cannot tell which clip was decomposed")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    detected = info.get("detected_masks")
    clip = _load(info["source"], cfg, [] if detected is not None else info["masks"], tuple(info["frame_range"]))
    if detected is not None:
        _attach_mask_folders(clip, [out / "masks" / n for n in detected])
    trainer = Trainer(clip, None, cfg, progress=progress)  # flow is not needed to export
    load_checkpoint(out / "checkpoints", trainer)
    return cfg, clip, trainer


def rerender(out_dir: str | Path, progress: Optional[ProgressFn] = None,
             device: Optional[str] = None, bake: Optional[bool] = None,
             maps: Optional[str] = None) -> Path:
    """Re-export atlases, videos, bake and report of ``out_dir`` from its saved checkpoint.

    ``bake`` overrides the saved ``export.bake`` (True: write the per-frame maps edits need);
    ``maps`` the saved ``export.maps`` (working, source or none)."""
    out = Path(out_dir)
    export = {k: v for k, v in (("bake", None if bake is None else bool(bake)), ("maps", maps)) if v is not None}
    cfg, clip, trainer = _restore(out, device, progress, **export)
    export_all(trainer, clip, out, cfg, progress=progress)
    return out


def write_maps(out_dir: str | Path, resolution: str = "working", progress: Optional[ProgressFn] = None,
               device: Optional[str] = None) -> Path:
    """Write only the STMap/residual EXR sequences of ``out_dir`` (``maps/`` or, with
    ``resolution="source"``, ``maps_source/``; docs/atlas.md). They come from the baked maps when
    the decomposition has them (the values edits render from), else from the checkpoint."""
    import numpy as np
    import torch
    from .export.outputs import evaluate_frame, export_maps
    from .export.stmap import MAP_FOLDERS, require_exr_library
    if resolution not in MAP_FOLDERS:
        raise ConfigError(f"map resolution must be one of {', '.join(MAP_FOLDERS)}, got {resolution!r}")
    out = Path(out_dir)
    require_exr_library()
    rep_path = out / "report.json"
    if not rep_path.exists():
        raise CheckpointError(f"{out} is not a finished decomposition (no report.json); run `decompose` first")
    report = json.loads(rep_path.read_text(encoding="utf-8"))
    info = report["clip"]
    layers = [{"index": l["index"], "name": l["name"], "kind": l["kind"], "atlas": l["atlas"],
               "atlas_size": int(np.load(out / "bake" / f"atlas_{l['index']}.npy", mmap_mode="r").shape[0])}
              for l in report["layers"]]
    n_frames, N = int(info["frames"]), len(layers)
    size = (int(info["width"]), int(info["height"])) if resolution == "working" else tuple(info["source_size"])
    meta_path = out / "bake" / "meta.json"
    baked = meta_path.exists() and json.loads(meta_path.read_text(encoding="utf-8")).get("maps", True) and all(
        (out / "bake" / f"layer_{i}_uv.npy").exists() for i in range(N))
    if baked:
        from .edit.apply import load_bake
        b = load_bake(out)
        frames = ((torch.from_numpy(np.stack([np.asarray(b.uv(i)[f]) for i in range(N)])),
                   torch.from_numpy(np.stack([np.asarray(b.alpha(i)[f]) for i in range(N)])),
                   torch.from_numpy(np.stack([np.asarray(b.residual(i)[f]) for i in range(N)])))
                  for f in range(n_frames))
        workers = 0
    else:
        cfg, _clip, trainer = _restore(out, device, progress)
        trainer.model.eval()

        def evaluated():
            for f in range(n_frames):
                ev = evaluate_frame(trainer.model, trainer.geom, f)
                yield ev["uv"], ev["alpha"], ev["residual"]
        frames, workers = evaluated(), cfg.export.workers
    folder = export_maps(out, resolution, frames, n_frames, layers, size, workers=workers, progress=progress)
    outputs = report.setdefault("outputs", {})
    outputs.setdefault("maps", {})[resolution] = MAP_FOLDERS[resolution]
    outputs.pop("maps_note", None)
    write_json(rep_path, report)
    return folder
