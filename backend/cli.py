"""``python -m backend``: argument parsing and wiring only.

Exit codes: 0 success, 1 unexpected error, 2 bad input or settings (the message says what),
130 interrupted by Ctrl-C or SIGTERM (a checkpoint was saved; run the same command again
to resume).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import PRESETS, Config, preset
from .errors import Cancelled, NeuralAtlasError
from .progress import CancelToken, Progress

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


# ------------------------------------------------------------------ helpers
def _fmt_eta(s: Optional[float]) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ConsoleProgress:
    """Prints one line per phase change or every couple of seconds."""

    def __init__(self, quiet: bool = False, json_lines: bool = False) -> None:
        self.quiet, self.json_lines = quiet, json_lines
        self.last_phase, self.last_t = "", 0.0

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        plan = p.message.startswith("[schedule]")  # what the schedule chose and why: never dropped
        if (p.phase == self.last_phase and now - self.last_t < 2.0 and p.phase not in ("done",)
                and not plan):
            return
        self.last_phase, self.last_t = p.phase, now
        if self.json_lines:
            print(json.dumps({"progress": p.to_dict()}), flush=True)
            return
        if plan:
            msg = p.message
        elif p.phase == "train":
            psnr = "  -  " if p.psnr is None else f"{p.psnr:.2f}"  # None right after a resume
            msg = (f"[train] it {p.iteration}/{p.iterations}  psnr {psnr} dB  {p.message}  "
                   f"eta {_fmt_eta(p.eta_s)}")
        else:
            msg = f"[{p.phase}] {p.message}"
        print(msg, file=sys.stderr, flush=True)


#: A second signal this soon after the first is the same request delivered twice (``timeout``
#: signals the command and then its whole process group), not a human's second Ctrl-C.
_REPEAT_S = 1.0


def _cancel_on_signals() -> CancelToken:
    """Ctrl-C (SIGINT) or SIGTERM (a job scheduler, ``timeout``, a render farm's preemption):
    stop at the next step and save a checkpoint. A second one a second or more later aborts."""
    token = CancelToken()
    first: list[float] = []

    def handler(signum, frame):  # noqa: ARG001
        now = time.monotonic()
        if token.cancelled:
            if first and now - first[0] < _REPEAT_S:
                return
            raise KeyboardInterrupt
        first.append(now)
        name = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"\n{name}: {token.note} (Ctrl-C again to abort)", file=sys.stderr, flush=True)
        token.cancel(name)

    # a native library (libtriton's LLVM at the first Triton compile) may replace the C-level
    # handlers mid-run: the token's polls re-arm them (backend/signals.py)
    from .signals import SignalGuard
    guard = SignalGuard(handler, [signal.SIGINT, getattr(signal, "SIGTERM", None)])
    token.on_poll = guard.check
    token.signal_guard = guard  # type: ignore[attr-defined]
    return token


def _config(args) -> Config:
    name = getattr(args, "preset", None) or getattr(args, "preset_default", "seed")
    cfg = Config.load(args.config) if getattr(args, "config", None) else preset(name)
    overrides: dict = {}
    if getattr(args, "iterations", None) is not None:
        overrides.setdefault("train", {})["iterations"] = args.iterations
    if getattr(args, "spp", None) is not None:  # a derived schedule: iterations from the shot's size
        overrides.setdefault("train", {}).update(iterations=0, samples_per_pixel=args.spp)
    if getattr(args, "budget", None) is not None:
        from .train.schedule import parse_budget
        overrides.setdefault("train", {})["budget_s"] = parse_budget(args.budget)
    if getattr(args, "device", None):
        overrides.setdefault("train", {})["device"] = args.device
    if getattr(args, "max_frames", None) is not None:
        overrides.setdefault("clip", {})["max_frames"] = args.max_frames
    if getattr(args, "long_edge", None) is not None:
        overrides.setdefault("clip", {})["long_edge"] = args.long_edge
    if getattr(args, "flow", None):
        overrides.setdefault("clip", {})["flow_method"] = args.flow
    if getattr(args, "grid_backend", None):
        overrides.setdefault("model", {})["encoding_backend"] = args.grid_backend
    if overrides:
        cfg = cfg.replace(**overrides)
    return cfg.with_settings(getattr(args, "settings", None) or []).validate()


def _frames(text: Optional[str]):
    if not text:
        return None
    from .clip import parse_frame_range
    return parse_frame_range(text)


#: Rough training throughput (samples a second, any preset: per sample the small demo model
#: costs about what the seed's does on a CPU) used only for the up-front notice of a run's
#: length. GPU: one H200 ran the seed settings at 108-115 it/s of 10k samples and `fast` at
#: ~61 it/s of 40k (docs/benchmarks.md); CPU: about 3k samples/s per idle core (2-core demo).
_SAMPLES_PER_S = {"cuda": 1.5e6, "mps": 1e5, "cpu_per_core": 3e3}
_LONG_S = 30 * 60  # a run longer than this on its device names the faster preset


def _fmt_duration(s: float) -> str:
    if s < 90:
        return f"{max(1, round(s))} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    return f"{s / 3600:.1f} h" if s < 48 * 3600 else f"{s / 86400:.1f} days"


def run_notice(cfg: Config, preset_name: Optional[str], preset_given: bool) -> Optional[str]:
    """One line saying what a decompose will run (preset, iterations, batch, device) with a rough
    estimate of its training time and, when that is long for the device, the faster preset.
    None when the run was chosen explicitly and is not long."""
    import os
    t = cfg.train
    dev = t.device
    if dev == "auto":
        try:
            import torch
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            dev = "cpu"
    kind = dev.split(":")[0]
    cores = os.cpu_count() or 1
    rate = _SAMPLES_PER_S.get(kind) or _SAMPLES_PER_S["cpu_per_core"] * cores
    est = t.iterations * t.batch_size / rate
    if t.budget_s > 0 and (t.iterations == 0 or est > t.budget_s):
        est = t.budget_s
    where = f"{kind} ({cores} cores)" if kind == "cpu" else kind
    default_note = " (the default, the reference's schedule)" if preset_name == "seed" else " (the default)"
    what = (f"preset {preset_name}" + ("" if preset_given else default_note)
            if preset_name else "the --config file")
    if t.iterations == 0:  # derived from the shot (backend/train/schedule.py): known once it is loaded
        line = (f"[plan] {what}: iterations from the shot's size ({t.samples_per_pixel:g} samples/pixel, "
                f"{t.min_iterations:,}-{t.max_iterations:,}) of {t.batch_size:,} samples on {where}")
        line += (f", within a budget of {_fmt_duration(t.budget_s)}" if t.budget_s > 0 else "")
    else:
        line = (f"[plan] {what}: {t.iterations:,} iterations of {t.batch_size:,} samples on {where}, "
                f"roughly {_fmt_duration(est)} of training")
    faster = "cpu" if kind == "cpu" else "fast"
    long = est > _LONG_S and preset_name not in (faster, "demo")
    if long or (not preset_given and preset_name != faster):
        other = preset(faster).train
        if faster == "cpu":  # its length comes from the shot: say how to bound it
            line += (f"; --preset cpu (real footage on a CPU: a small model, {other.samples_per_pixel:g} "
                     f"samples/pixel of the shot at long edge {preset('cpu').clip.long_edge}) with e.g. "
                     f"--budget 10m (docs/config.md)")
        else:
            other_s = other.iterations * other.batch_size / rate
            line += (f"; --preset fast (tuned for time to quality on a GPU, {other.iterations:,} iterations) "
                     f"takes roughly {_fmt_duration(other_s)} (docs/config.md)")
    elif not preset_given:
        line += "; pick one with --preset seed|fast|quality|cpu|demo (docs/config.md)"
    return line if (long or not preset_given) else None


# ----------------------------------------------------------------- commands
def cmd_decompose(args) -> int:
    from .pipeline import decompose
    from .preprocess.cli import flow_options, mask_options
    cfg = _config(args)
    if not args.quiet:
        given = args.preset is not None or args.config is not None
        note = run_notice(cfg, None if args.config else (args.preset or "seed"), given)
        if note:
            print(note, file=sys.stderr, flush=True)
    detect = mask_options(args)
    if detect is not None and args.masks:
        raise NeuralAtlasError("give either --masks folders or a --detector, not both")
    out = decompose(args.clip, args.out, cfg, masks=args.masks, frame_range=_frames(args.frames),
                    progress=ConsoleProgress(args.quiet), cancel=_cancel_on_signals(), resume=not args.no_resume,
                    detect=detect, flow_options=flow_options(args))
    rep = json.loads((out / "report.json").read_text())
    print(json.dumps({"out": str(out), "psnr": rep["psnr"], "psnr_no_residual": rep["psnr_no_residual"],
                      "iterations": rep["iterations"], "seconds": rep["seconds"], "device": rep["device"],
                      "atlases": [str(out / a) for a in rep["outputs"]["atlases"]]}))
    return EXIT_OK


def cmd_edit(args) -> int:
    from .edit import render_edit
    edits = {}
    for spec in args.layer:
        if "=" not in spec:
            raise NeuralAtlasError(f"--layer expects INDEX=EDIT.png, got {spec!r}")
        k, path = spec.split("=", 1)
        try:
            edits[int(k)] = Path(path)
        except ValueError:
            raise NeuralAtlasError(f"--layer index must be an integer, got {k!r}") from None
    info = render_edit(args.dir, edits, mode=args.mode, frame_range=_frames(args.frames), out=args.out,
                       formats=tuple(args.format.split(",")), resolution=args.resolution,
                       progress=ConsoleProgress(args.quiet), cancel=_cancel_on_signals(), device=args.device,
                       opacity=_opacity_file(args.opacity))
    print(json.dumps(info))
    return EXIT_OK


def _opacity_file(path: Optional[Path]):
    """``edit --opacity FILE``: {"<layer>": [o_0, ...]} or {"<layer>": {"<frame>": o}} (docs/atlas.md)."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise NeuralAtlasError(f"cannot read the opacity file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise NeuralAtlasError(f"the opacity file {path} is not JSON: {e}") from None


def cmd_paint_frame(args) -> int:
    from .edit.paint import paint_frame
    info = paint_frame(args.dir, args.frame, args.image, layer=args.layer, out_edits=args.out_edits,
                       progress=ConsoleProgress(args.quiet))
    print(json.dumps(info))
    return EXIT_OK


def cmd_render(args) -> int:
    from .pipeline import rerender, write_maps
    if args.maps:  # only the EXR maps (docs/atlas.md, "STMaps")
        folder = write_maps(args.dir, resolution=args.resolution or "working",
                            progress=ConsoleProgress(args.quiet), device=args.device)
        print(json.dumps({"out": str(args.dir), "maps": str(folder)}))
        return EXIT_OK
    if args.resolution:
        raise NeuralAtlasError("--resolution goes with --maps (the resolution of the EXR maps to write)")
    out = rerender(args.dir, progress=ConsoleProgress(args.quiet), device=args.device,
                   bake=True if args.bake else None)
    rep = json.loads((out / "report.json").read_text())
    print(json.dumps({"out": str(out), "psnr": rep["psnr"], "psnr_no_residual": rep["psnr_no_residual"]}))
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    cfg = _config(args)
    rep = run_demo(args.out, cfg, width=args.width, height=args.height, n_frames=args.n_frames,
                   seed=args.seed, progress=ConsoleProgress(args.quiet), cancel=_cancel_on_signals(),
                   n_objects=args.objects)
    summary = {k: rep[k] for k in ("psnr", "psnr_no_residual", "alpha_iou", "iterations",
                                   "train_seconds", "total_seconds", "device")}
    summary["edit_drift_px"] = {k: rep["edit_drift_px"][k] for k in ("mean", "max")}
    summary["frame_paint_drift_px"] = {k: rep["frame_paint_drift_px"][k] for k in ("mean", "max", "owner_ok")}
    summary["edited_video"] = rep["edited"].get("video")
    summary["report"] = str(Path(args.out) / "report.json")
    print(json.dumps(summary, indent=1))
    return EXIT_OK


def cmd_measure(args) -> int:
    from .demo import measure
    rep = measure(args.dir, args.ground_truth, device=args.device)
    print(json.dumps({"edit_drift_px": {k: rep["edit_drift_px"][k] for k in ("mean", "max")},
                      "alpha_iou": rep["alpha_iou"],
                      "per_layer": [{k: m[k] for k in ("layer", "mean_px", "max_px", "frames_measured")}
                                    for m in rep["edit_drift_px"]["per_layer"]]}))
    return EXIT_OK


def cmd_config(args) -> int:
    from .config import dumps_toml
    print(dumps_toml(_config(args).to_dict()), end="")
    return EXIT_OK


# ------------------------------------------------------------------ parser
def _add_model_opts(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help=f"starting configuration (default {default_preset})")
    p.set_defaults(preset_default=default_preset)
    p.add_argument("--config", type=Path, help="TOML configuration file (overrides --preset)")
    p.add_argument("--set", action="append", default=[], dest="settings", metavar="SECTION.FIELD=VALUE",
                   help="change one configuration field, after --preset/--config and the options above "
                        "(repeatable; e.g. --set losses.optical_flow=0.01 --set train.batch_size=20000; "
                        "fields: docs/config.md)")
    p.add_argument("--iterations", type=int, help="training iterations (0: derived from the shot, see --spp)")
    p.add_argument("--spp", type=float, metavar="N",
                   help="derive the iterations from the shot: N training samples per pixel of the working-"
                        "resolution shot (pixels x frames); sets train.iterations = 0")
    p.add_argument("--budget", metavar="TIME",
                   help="time budget of the whole run, e.g. 90s, 10m, 1h: the iterations are capped from the "
                        "measured step time so that training and export end within it (0: none)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--long-edge", type=int, help="working resolution: long edge in pixels (never upscales)")
    p.add_argument("--max-frames", type=int, metavar="N",
                   help="decompose at most N frames of the source (default 100, the seed's; 0: no cap)")
    p.add_argument("--flow", choices=("dis", "raft_small", "raft_large", "auto"), help="optical flow method")
    p.add_argument("--grid-backend", choices=("auto", "torch", "triton", "tcnn"), help="hash-grid implementation")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m backend", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decompose", help="decompose a clip into layered atlases")
    p.add_argument("clip", help="frames folder, seed layout folder or video file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--masks", nargs="+", metavar="DIR", help="one mask folder per object (sorted by name)")
    p.add_argument("--frames", metavar="A:B", help="frame range of the source, stop exclusive")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing checkpoint")
    _add_model_opts(p, "seed")
    from .preprocess.cli import add_flow_arguments, add_mask_arguments
    add_mask_arguments(p)
    add_flow_arguments(p)
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("edit", help="apply edited atlases to a decomposed shot")
    p.add_argument("dir", type=Path, help="a decomposition folder")
    p.add_argument("--layer", action="append", required=True, metavar="I=EDIT.png",
                   help="edit image for layer I (repeatable)")
    p.add_argument("--mode", choices=("delta", "replace"), default="delta")
    p.add_argument("--frames", metavar="A:B", help="apply the edit only in this range of the shot")
    p.add_argument("--out", required=True, type=Path, help="output folder (frames/ and edited.mp4)")
    p.add_argument("--format", default="png,mp4", help="png, mp4 or png,mp4")
    p.add_argument("--resolution", choices=("working", "source"), default="working")
    p.add_argument("--opacity", type=Path, metavar="OPACITY.json",
                   help='per-frame opacity of edit layers: {"0": [o_0, ..., o_F-1]} or {"0": {"12": 0.5}}')
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("paint-frame", help="paint on a frame of the shot: the paint lands in the layers' edit images")
    p.add_argument("dir", type=Path, help="a decomposition folder (with its baked maps)")
    p.add_argument("--frame", type=int, required=True, metavar="T", help="the painted frame (0-based, as frames/)")
    p.add_argument("--image", type=Path, required=True, metavar="PAINT.png",
                   help="RGBA paint over frame T (straight alpha = coverage), working or source resolution")
    p.add_argument("--layer", type=int, metavar="I", help="send all paint to layer I (default: the layer seen there)")
    p.add_argument("--out-edits", type=Path, required=True, metavar="DIR",
                   help="edit layers layer_<i>.png: created transparent or painted over")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_paint_frame)

    p = sub.add_parser("render", help="re-export atlases, videos and report from the saved checkpoint")
    p.add_argument("dir", type=Path)
    p.add_argument("--device")
    p.add_argument("--bake", action="store_true",
                   help="write the per-frame maps edits need, even if the decomposition was made without")
    p.add_argument("--maps", action="store_true",
                   help="write only the STMap/residual EXR sequences (maps/ or maps_source/)")
    p.add_argument("--resolution", choices=("working", "source"),
                   help="with --maps: working (maps/, default) or source (maps_source/) resolution")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("demo", help="synthetic ground-truth shot: decompose, edit, measure drift")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=72)
    p.add_argument("--n-frames", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objects", type=int, default=1, metavar="N",
                   help="object layers in the synthetic clip (0-2; default 1), over the background")
    _add_model_opts(p, "demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("measure", help="edit drift and alpha IoU of a decomposition of a synthetic clip")
    p.add_argument("dir", type=Path, help="a decomposition folder")
    p.add_argument("--ground-truth", required=True, type=Path, help="the synthetic clip folder (ground_truth.npz)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("config", help="print a preset (with overrides) as TOML")
    _add_model_opts(p, "seed")
    p.set_defaults(func=cmd_config)

    from .preprocess.cli import add_commands as add_preprocess_commands
    add_preprocess_commands(sub)
    from .batch import add_command as add_batch_command  # many shots (the service's executors, no sockets)
    add_batch_command(sub)
    try:  # the service needs pyzmq, which an engine-only install (the GPU machine) may lack
        from .service.cli import add_commands as add_service_commands
    except ImportError:
        add_service_commands = None
    if add_service_commands is not None:
        add_service_commands(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled as e:
        print(f"stopped: {e}. Run the same command again to resume from the checkpoint.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NeuralAtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
