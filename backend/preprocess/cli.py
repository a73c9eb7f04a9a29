"""``python -m backend masks``: detect, track and write object masks; shared detector options.

Wiring (backend/cli.py)::

    from .preprocess.cli import add_commands as add_preprocess_commands
    add_preprocess_commands(sub)                  # the `masks` sub-command
    add_mask_arguments(decompose_parser)          # --detector/--class/--max-objects/...
    add_flow_arguments(decompose_parser)          # --flow-weights/--flow-long-edge
    ...
    opts = mask_options(args)                     # None unless --detector or --class given
    if opts: clip = attach_masks(clip, detect_masks(clip, **opts))

Output of ``masks``: one line of JSON on stdout (folders written, objects, frames each
was seen in); progress on stderr. Exit codes follow backend/cli.py (2: bad input).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

from .detect import ANYTHING, DETECTORS


def add_mask_arguments(p: argparse.ArgumentParser) -> None:
    """The detector options, for ``masks`` and ``decompose`` alike."""
    g = p.add_argument_group("object masks from a detector")
    g.add_argument("--detector", choices=DETECTORS,
                   help="instance segmentation model (torchvision Mask R-CNN v2, or detectron2's "
                        "when it is installed)")
    g.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help=f"COCO class to track (repeatable), or {ANYTHING!r}; default person")
    g.add_argument("--max-objects", type=int, metavar="N", help="keep at most N objects (layers)")
    g.add_argument("--detector-weights", metavar="PATH",
                   help="weights file (default: torchvision's / detectron2's cache; nothing is downloaded)")
    g.add_argument("--score", type=float, default=0.5, help="least detection score (default 0.5)")
    g.add_argument("--min-presence", type=float, default=0.2,
                   help="least share of frames an object must be detected in (default 0.2)")


def add_flow_arguments(p: argparse.ArgumentParser) -> None:
    """RAFT weights and flow resolution options (``--flow`` itself belongs to the config)."""
    p.add_argument("--flow-weights", metavar="PATH",
                   help="RAFT weights file (default: torchvision's cache; nothing is downloaded)")
    p.add_argument("--flow-long-edge", type=int, metavar="N",
                   help="compute flow at this long edge and rescale it to the working size")


def mask_options(args) -> Optional[dict]:
    """``detect_masks`` keyword arguments from parsed options, or None when no detector was asked for."""
    if not getattr(args, "detector", None) and not getattr(args, "classes", None):
        return None
    return {"detector": args.detector or "torchvision", "classes": args.classes or ["person"],
            "max_objects": args.max_objects, "weights": args.detector_weights or "default",
            "device": getattr(args, "device", None) if getattr(args, "device", None) != "auto" else None,
            "score_threshold": args.score, "min_presence": args.min_presence}


def flow_options(args) -> dict:
    """``compute_flow`` keyword arguments from ``add_flow_arguments``'s options."""
    return {"weights": getattr(args, "flow_weights", None) or "default",
            "long_edge": getattr(args, "flow_long_edge", None)}


def add_commands(subparsers) -> None:
    """Add the ``masks`` sub-command to backend/cli.py's sub-parsers."""
    p = subparsers.add_parser("masks", help="detect and track objects; write one mask folder per object")
    p.add_argument("clip", help="frames folder, seed layout folder or video file")
    p.add_argument("--out", type=Path,
                   help="folder for <object>/%%05d.png (default: CLIP/masks for a seed layout, "
                        "else CLIP_masks beside it)")
    p.add_argument("--frames", metavar="A:B", help="frame range (masks outside it are written empty)")
    p.add_argument("--long-edge", type=int, default=1024,
                   help="detect at this long edge (default 1024; masks are written at this size)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: CUDA when present)")
    p.add_argument("--batch", type=int, default=2, help="frames per detector call")
    p.add_argument("--overwrite", action="store_true", help="replace existing object folders")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_mask_arguments(p)
    p.set_defaults(func=cmd_masks)


def default_out(clip_path: Path) -> Path:
    if clip_path.is_dir() and (clip_path / "video_frames").is_dir():
        return clip_path / "masks"
    stem = clip_path.name if clip_path.is_dir() else clip_path.stem
    return clip_path.parent / f"{stem}_masks"


def cmd_masks(args) -> int:
    from ..clip import load_clip, parse_frame_range
    from .masks import detect_masks, write_masks

    src = Path(args.clip).expanduser()
    frame_range = parse_frame_range(args.frames) if args.frames else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(src, masks=[], frame_range=frame_range, long_edge=args.long_edge,
                         max_frames=None)
    opts = mask_options(args) or {}
    opts.setdefault("detector", "torchvision")
    opts.setdefault("classes", ["person"])
    opts["device"] = args.device

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"[masks] frame {done}/{total}", file=sys.stderr, flush=True)

    objects = detect_masks(clip, batch_size=args.batch, progress=progress, **opts)
    out = args.out or default_out(src)
    total = None
    if frame_range is not None or src.is_file():
        total = _source_frame_count(src, clip)
    folders = write_masks(objects, out, clip.frame_names, total_frames=total,
                          first_frame=clip.frame_range[0], overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "masks": [str(f) for f in folders], "objects": objects.names,
                      "frames_seen": objects.frames_seen, "n_frames": clip.n_frames,
                      "detector": objects.detector, **objects.info}))
    if not objects.names:
        print(f"[masks] no {', '.join(opts['classes'])} found in at least {args.min_presence:.0%} of "
              "the frames: nothing written", file=sys.stderr)
    return 0


def _source_frame_count(src: Path, clip) -> int:
    """Frames in the whole source (mask folders need one PNG per source frame)."""
    from ..clip import list_images

    if src.is_dir():
        folder = src / "video_frames" if (src / "video_frames").is_dir() else src
        return len(list_images(folder))
    from ..clip.video import open_video

    stream = open_video(src)
    try:
        return sum(1 for _ in stream.frames)
    finally:
        stream.close()
