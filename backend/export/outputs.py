"""Everything a decomposition writes after training: atlases, videos, baked maps, report.

One pass over the frames evaluates every network once per pixel and produces at the same
time the reconstructions (with and without the residual), per-layer alpha and residual
frames, the baked per-frame maps used by the edit renderer, the per-texel "seen" alpha of
each atlas and the per-frame PSNR.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..clip import Clip, write_json, write_png16_rgba
from ..clip.video import writer_library
from ..config import Config
from ..progress import CancelToken, Progress, ProgressFn, null_progress
from .atlas import coverage, layer_size, pixel_footprints, render_atlas, size_for_footprints, splat_max
from .sinks import FrameWriters, VideoSink, png_job, store_job
from .stmap import MAP_FOLDERS, INSTALL_HINT, MapSequenceWriter, exr_library, maps_to_host, remove_stale_maps

ATLAS_CONVENTION = ("atlas image S x S covers u,v in [-1,1]; texel (row r, col c) centre at "
                    "u = -1 + (2c+1)/S, v = -1 + (2r+1)/S; u along columns (x), v along rows (y), "
                    "row 0 at the top of the PNG")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ..hostinfo import cpu_model
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"


def layer_names(clip: Clip) -> list[str]:
    return list(clip.mask_names) + ["background"]


@torch.no_grad()
def evaluate_frame(model, geom, f: int, chunk: int = 1 << 17) -> dict[str, torch.Tensor]:
    """Every network at every pixel of frame ``f`` -> uv (N,H,W,2), alpha (N,H,W), residual and rgb (N,H,W,3)."""
    H, W, N = geom.height, geom.width, model.n_layers
    dev = next(model.parameters()).device
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32),
                            torch.arange(W, device=dev, dtype=torch.float32), indexing="ij")
    xyt = geom.xyt(xs.reshape(-1), ys.reshape(-1), torch.full((H * W,), float(f), device=dev))
    parts = [model.render(xyt[i:i + chunk]) for i in range(0, H * W, chunk)]
    uv = torch.stack([torch.cat([p.uv[i] for p in parts]) for i in range(N)]).view(N, H, W, 2)
    rgb = torch.stack([torch.cat([p.rgb[i] for p in parts]) for i in range(N)]).view(N, H, W, 3)
    res = torch.stack([torch.cat([p.residual[i] for p in parts]) for i in range(N)]).view(N, H, W, 3)
    alpha = torch.cat([p.alpha for p in parts]).view(H, W, N).permute(2, 0, 1)
    return {"uv": uv, "rgb": rgb, "residual": res, "alpha": alpha}


def _atlas_jobs(out: Path, bake_dir: Path, i: int, atlas: torch.Tensor, seen: torch.Tensor) -> list:
    """Write jobs for layer ``i``'s atlas: the 16-bit RGBA PNG (alpha = seen) and the bake's arrays."""
    rgb = atlas.float().cpu().numpy()
    seen_np = seen.float().cpu().numpy()
    rgba = np.concatenate([rgb, seen_np[..., None]], -1).clip(0, 1)
    return [lambda: write_png16_rgba(out / "atlas" / f"layer_{i}.png", rgba),
            lambda: np.save(bake_dir / f"atlas_{i}.npy", rgb),
            lambda: np.save(bake_dir / f"atlas_{i}_seen.npy", seen_np)]


@torch.no_grad()
def auto_atlas_size(model, geom, n_frames: int = 8) -> tuple[list[int], list]:
    """Each layer's atlas size from the trained mapping: one texel per median visible pixel of
    that layer, from ``n_frames`` frames spread over the clip (:func:`~backend.export.atlas.layer_size`
    of :func:`~backend.export.atlas.size_for_footprints`'s per-layer sizes); with the unrounded sizes."""
    F_ = geom.n_frames
    frames = sorted({round(k * (F_ - 1) / max(1, n_frames - 1)) for k in range(min(n_frames, F_))})
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.n_layers)]
    for f in frames:
        ev = evaluate_frame(model, geom, f)
        for i in range(model.n_layers):
            per_layer[i].append(pixel_footprints(ev["uv"][i], ev["alpha"][i]))
    _, raw = size_for_footprints([torch.cat(v) for v in per_layer])
    return [layer_size(v) for v in raw], raw


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8 on the tensor's device, exactly as the PNG writers round
    (NaN -> 0, clipped, ``x * 255 + 0.5`` truncated)."""
    x = torch.nan_to_num(img.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return x.mul(255.0).add(0.5).to(torch.uint8)


def _mse64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).pow(2).mean()


def _psnr_of(mse: float) -> float:
    return float("inf") if mse == 0 else -10.0 * math.log10(float(mse))


def export_all(trainer, clip: Clip, out_dir: Path, cfg: Config, *, progress: Optional[ProgressFn] = None,
               cancel: Optional[CancelToken] = None, extra_report: Optional[dict] = None,
               started: Optional[float] = None) -> dict:
    """Write atlas/, video/, bake/ and report.json for a trained model; returns the report.

    ``started``: a ``time.perf_counter()`` reading; the report's ``total_seconds`` is the time
    from it to the written report."""
    progress = progress or null_progress
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    out = Path(out_dir)
    model, geom = trainer.model, trainer.geom
    model.eval()
    N, F_, H, W = model.n_layers, geom.n_frames, geom.height, geom.width
    dev = trainer.device
    # each layer's own atlas size S_i (docs/atlas.md); export.atlas_size > 0 gives every layer that size
    sizes, auto_sizes = [int(cfg.export.atlas_size)] * N, None
    phases: dict[str, float] = {}  # report.json "export_phases": where the export's time went

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - since
        return now

    if cfg.export.atlas_size == 0:
        sizes, auto_sizes = auto_atlas_size(model, geom)
    t_phase = lap("atlas_sizing", t0)
    S = max(sizes)  # report.json / bake meta "atlas_size": the largest, for readers of one size
    names = layer_names(clip)
    (out / "atlas").mkdir(parents=True, exist_ok=True)
    bake_dir = out / "bake"
    bake_dir.mkdir(parents=True, exist_ok=True)
    frames_dir = out / "frames"

    atlases = [render_atlas(lambda uv, i=i: model.texture(i, uv), sizes[i], dev) for i in range(N)]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_phase = lap("atlases", t_phase)
    seen = [torch.zeros(sizes[i], sizes[i], device=dev) for i in range(N)]
    mm = np.lib.format.open_memmap
    bake_maps = bool(cfg.export.bake)  # the per-frame maps the edit path renders from
    map_specs = {"uv": (np.float32, (F_, H, W, 2)), "alpha": (np.float16, (F_, H, W)),
                 "residual": (np.float16, (F_, H, W, 3))}
    if not bake_maps:  # no stale maps of an earlier export next to the new atlases
        for i in range(N):
            for kind in map_specs:
                (bake_dir / f"layer_{i}_{kind}.npy").unlink(missing_ok=True)
    uv_maps, alpha_maps, res_maps = ([mm(bake_dir / f"layer_{i}_{kind}.npy", "w+", dtype, shape)
                                      for i in range(N if bake_maps else 0)]
                                     for kind, (dtype, shape) in map_specs.items())

    streams = ["reconstruction", "reconstruction_no_residual"] + [f"alpha_{i}" for i in range(N)] + \
              ([f"residual_{i}" for i in range(N)] if model.residuals is not None else [])
    fps = float(clip.fps or cfg.export.video_fps)
    videos: dict[str, str] = {}
    sinks: dict[str, VideoSink] = {}
    if cfg.export.write_videos:
        if writer_library() is not None:  # encode each stream as its frames come
            sinks = {name: VideoSink(out / "video" / f"{name}.mp4", fps) for name in streams}
        else:  # no H.264 encoder here: the PNG frames are the stream (write_video would copy them)
            videos = {name: f"frames/{name}" for name in streams}
    maps, maps_note = _map_writer(out, cfg.export.maps, N, F_, (W, H), clip.source_size)
    if maps_note:
        progress(Progress("export", message=maps_note))
    writers = FrameWriters(cfg.export.workers or None)
    phases["workers"] = writers.workers
    psnrs = []
    try:
        t_phase = lap("setup", t_phase)  # the baked maps' files, the writers, the video sinks
        for f in range(F_):
            cancel.raise_if_cancelled()
            ev = evaluate_frame(model, geom, f)
            a = ev["alpha"]  # (N, H, W)
            recon = (ev["rgb"] * ev["residual"] * a[..., None]).sum(0)
            recon_nores = (ev["rgb"] * a[..., None]).sum(0)
            gt = trainer.data.frame(f)
            psnrs.append(torch.stack([_mse64(recon, gt), _mse64(recon_nores, gt)]))
            for i in range(N):
                splat_max(seen[i], ev["uv"][i].reshape(-1, 2), a[i].reshape(-1))
            # one device-to-host copy per array, 8-bit images converted on the device
            jobs = []
            if bake_maps:
                uv = ev["uv"].cpu().numpy()
                alpha16 = a.half().cpu().numpy()
                res16 = ev["residual"].half().cpu().numpy()
                jobs = [store_job(m[f], v) for dst, arr in ((uv_maps, uv), (alpha_maps, alpha16), (res_maps, res16))
                        for m, v in zip(dst, arr)]
            if maps is not None:  # the same values as STMap/residual EXRs, maybe at the source size
                size = None if maps.resolution == "working" else (maps.width, maps.height)
                jobs += maps.jobs(f, *maps_to_host(ev["uv"], a, ev["residual"], size))
            if cfg.export.write_videos:
                images = {"reconstruction": recon, "reconstruction_no_residual": recon_nores}
                for i in range(N):
                    images[f"alpha_{i}"] = a[i]
                    if model.residuals is not None:  # R = 1 is mid grey, as in the seed
                        images[f"residual_{i}"] = ev["residual"][i] * 0.5
                for name, img in images.items():
                    u8 = to_uint8(img).cpu().numpy()
                    jobs.append(png_job(frames_dir / name / f"{f:05d}.png", u8))
                    if name in sinks:
                        sinks[name].put(u8)
            t_phase = lap("frames_device", t_phase)  # evaluation and the copies to the host
            writers.submit(jobs)
            t_phase = lap("frames_waiting", t_phase)  # blocked on the writers (frames in flight)
            progress(Progress("export", fraction=0.9 + 0.08 * (f + 1) / F_, message=f"frame {f + 1}/{F_}"))
        # the atlases (complete now that every frame has splatted into ``seen``) on the same pool
        atlas_files = [str((out / "atlas" / f"layer_{i}.png").relative_to(out)) for i in range(N)]
        writers.submit([job for i in range(N) for job in _atlas_jobs(out, bake_dir, i, atlases[i], seen[i])])
        writers.close()
        if maps is not None:
            maps.finish([{"index": i, "name": names[i], "kind": "background" if i == N - 1 else "object",
                          "atlas": atlas_files[i], "atlas_size": int(atlases[i].shape[0])} for i in range(N)])
        for name, sink in sinks.items():
            videos[name] = str(Path(sink.close()).relative_to(out))
        t_phase = lap("finish", t_phase)  # the atlases' files, the last frames' jobs, the videos
    except BaseException:
        writers.abort()
        for sink in sinks.values():
            sink.abort()
        raise
    for arr in uv_maps + alpha_maps + res_maps:
        arr.flush()
    del uv_maps, alpha_maps, res_maps
    mse = torch.stack(psnrs).cpu().numpy() if psnrs else np.zeros((0, 2))
    per_frame = [_psnr_of(m) for m in mse[:, 0]]
    per_frame_nores = [_psnr_of(m) for m in mse[:, 1]]

    st = trainer.state
    layers = [{"index": i, "name": names[i], "kind": "background" if i == N - 1 else "object",
               "atlas": atlas_files[i], "atlas_size": sizes[i], "uv_scale": model.uv_scales[i],
               "coverage": coverage(seen[i])} for i in range(N)]
    bake_meta = {"frames": F_, "height": H, "width": W, "layers": N, "atlas_sizes": sizes, "atlas_size": S,
                 "maps": bake_maps,
                 "atlas_convention": ATLAS_CONVENTION, "uv": "layer_<i>_uv.npy float32 (F,H,W,2)",
                 "alpha": "layer_<i>_alpha.npy float16 (F,H,W)",
                 "residual": "layer_<i>_residual.npy float16 (F,H,W,3)",
                 "atlas": "atlas_<i>.npy float32 (S_i,S_i,3): the texture network at texel centres",
                 "seen": "atlas_<i>_seen.npy float32 (S_i,S_i): max alpha mapped to each texel"}
    write_json(bake_dir / "meta.json", bake_meta)
    t_end = lap("bake_flush", t_phase)  # the baked maps flushed, PSNR, coverage, the bake's meta.json
    report = {
        "version": __version__,
        "psnr": float(np.mean(per_frame)),
        "psnr_no_residual": float(np.mean(per_frame_nores)),
        "per_frame_psnr": per_frame,
        "per_frame_psnr_no_residual": per_frame_nores,
        "iterations": st.iteration,
        "seconds": round(st.seconds, 3),
        "pretrain_seconds": round(st.pretrain_seconds, 3),
        "export_seconds": round(t_end - t0, 3),  # the sum of export_phases' seconds
        "export_phases": {k: round(v, 3) if isinstance(v, float) else v for k, v in phases.items()},
        "iterations_per_second": round(st.iteration / st.seconds, 3) if st.seconds > 0 else None,
        "device": device_name(dev),
        "grid_backend": model.grid_backend,
        "layers": layers,
        "clip": {"source": clip.source, "frame_range": list(clip.frame_range), "frames": F_,
                 "width": W, "height": H, "source_size": list(clip.source_size), "fps": clip.fps,
                 "fingerprint": clip.fingerprint(), "frame_names": list(clip.frame_names)},
        "atlas_sizes": sizes,  # S_i, one per layer (layers[i]["atlas_size"])
        "atlas_size": S,  # the largest S_i (one number, for older readers)
        # with export.atlas_size = 0: each layer's unrounded size for one texel per median visible pixel
        "atlas_size_auto": None if auto_sizes is None else [None if v is None else round(v, 1)
                                                            for v in auto_sizes],
        "atlas_convention": ATLAS_CONVENTION,
        "outputs": {"atlases": atlas_files, "videos": videos, "bake": "bake",
                    "maps": {} if maps is None else {maps.resolution: MAP_FOLDERS[maps.resolution]},
                    **({"maps_note": maps_note} if maps_note else {}),
                    "frames": {s: f"frames/{s}" for s in streams} if cfg.export.write_videos else {}},
        "history": st.history,
        "config": cfg.to_dict(),
    }
    if dev.type == "cuda":
        report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 3)
    if extra_report:
        report.update(extra_report)
    if started is not None:
        report["total_seconds"] = round(time.perf_counter() - started, 3)
    write_report(out, report)
    model.train()
    return report


def export_maps(out_dir: Path, resolution: str, frames, n_frames: int, layers: list[dict],
                size: tuple[int, int], workers: int = 0, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> Path:
    """Write only the EXR maps of one resolution (``render --maps``) from ``frames``: an iterable
    of (uv, alpha, residual) torch tensors per frame, (N, h, w, ...) at the working size; ``size``
    (W, H) of the maps to write. ``layers`` as in :meth:`MapSequenceWriter.finish`. Returns the folder."""
    progress = progress or null_progress
    cancel = cancel or CancelToken()
    maps = MapSequenceWriter(Path(out_dir), resolution, len(layers), n_frames, size)
    writers = FrameWriters(workers or None)
    try:
        for f, (uv, alpha, residual) in enumerate(frames):
            cancel.raise_if_cancelled()
            scaled = None if resolution == "working" else size
            writers.submit(maps.jobs(f, *maps_to_host(uv, alpha, residual, scaled)))
            progress(Progress("export", fraction=(f + 1) / n_frames, message=f"maps: frame {f + 1}/{n_frames}"))
        writers.close()
    except BaseException:
        writers.abort()
        raise
    maps.finish(layers)
    return maps.folder


def _map_writer(out: Path, choice: str, n_layers: int, n_frames: int, working: tuple[int, int],
                source: tuple[int, int]) -> tuple[Optional[MapSequenceWriter], str]:
    """The EXR map writer ``export.maps`` asks for, after removing the maps of earlier exports it
    will not rewrite (they would not match the new atlases); with no EXR writer installed the
    export goes on without maps and says so (``render --maps`` adds them later)."""
    for resolution, folder in MAP_FOLDERS.items():
        if resolution != choice:
            remove_stale_maps(out / folder)
    if choice == "none":
        return None, ""
    if exr_library() is None:
        remove_stale_maps(out / MAP_FOLDERS[choice])
        return None, (f"export.maps = {choice!r} but no EXR writer is installed ({INSTALL_HINT}); "
                      f"add the maps with `python -m backend render {out} --maps`")
    size = working if choice == "working" else tuple(int(v) for v in source)
    return MapSequenceWriter(out, choice, n_layers, n_frames, size), ""


def write_report(out_dir: Path, report: dict) -> None:
    write_json(Path(out_dir) / "report.json", report)
