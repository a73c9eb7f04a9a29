"""A stand-in engine with the pipeline's signatures, for protocol tests that do not
need real training (fuzzing, uploads, restarts of an idle server).

Selected in the worker by NEURAL_ATLAS_ENGINE=tests.service.fake_engine. It
counts iterations with a short sleep, checkpoints like the engine, honours the
CancelToken and resumes from its checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from backend.errors import Cancelled, ClipError
from backend.progress import Progress

STEP_S = 0.01


def _ckpt(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoints" / "latest.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError):
        return 0


def _save(out: Path, it: int) -> None:
    d = out / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "latest.json.tmp"
    tmp.write_text(json.dumps({"iteration": it}))
    tmp.replace(d / "latest.json")


def decompose(source, out_dir, config, masks=None, frame_range=None, progress=None, cancel=None,
              resume=True):
    src = Path(source)
    if not src.exists() or (src.is_dir() and not any(src.iterdir())):
        raise ClipError(f"no frames in {src}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = config.train.iterations
    every = config.train.checkpoint_every
    it = _ckpt(out) if resume else 0
    t0 = time.monotonic()
    progress = progress or (lambda p: None)
    progress(Progress(phase="load", fraction=0.0, iterations=total))
    while it < total:
        if cancel is not None and cancel.cancelled:
            _save(out, it)
            raise Cancelled(cancel.reason)
        time.sleep(STEP_S)
        it += 1
        if it % every == 0:
            _save(out, it)
        progress(Progress(phase="train", iteration=it, iterations=total, fraction=it / max(total, 1),
                          psnr=20.0 + it / 100, elapsed_s=time.monotonic() - t0))
    (out / "atlas").mkdir(exist_ok=True)
    (out / "atlas" / "layer_0.png").write_bytes(b"\x89PNG fake atlas " + str(src).encode())
    (out / "report.json").write_text(json.dumps({"psnr": 30.0, "iterations": total}))
    progress(Progress(phase="export", fraction=1.0, iteration=total, iterations=total))
    return out


def render_edit(out_dir, edits, mode="delta", frame_range=None, out="edited", formats=("png", "mp4"),
                progress=None, cancel=None):
    out = Path(out)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    for k, p in edits.items():
        (out / "frames" / f"edit_{k}.txt").write_text(str(p))
    if progress:
        progress(Progress(phase="render", fraction=1.0))
    return {"frames_dir": str(out / "frames"), "video": None, "n_frames": 1}
