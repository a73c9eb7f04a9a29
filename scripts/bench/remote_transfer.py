#!/usr/bin/env python
"""What travels between Blender and a backend on another machine, for one shot.

Decomposes CLIP with the engine (``python -m backend decompose``), renders an edit of
layer 0 (``python -m backend edit``, PNG frames at the source resolution as Render Edit
asks), then adds up the files the add-on moves (``neural_atlas.core.remote``):

* up:   the clip's frames and the masks (identical files sent once), then per Render Edit
        the painted edit images; a re-render after a small stroke sends one edit image;
* down: of the decomposition what the add-on reads (``remote.DOWNLOADS["decompose"]``:
        atlases, the live preview's EXR maps, report.json), of the render its frames.

Bytes on the wire are the files' bytes plus one signed header per 4 MiB chunk (counted
here from the protocol's framing). Every number is also given scaled to ``--per`` frames
(default 100). With ``--wire`` (needs pyzmq: not on the GPU host) the clip and masks are
also sent through a real local server and the client's count is compared with the sum, and
the upload's throughput with a plain file copy of the same bytes in the same run.

    python scripts/bench/remote_transfer.py ../shared/data/car-turn --preset fast \\
        --iterations 2000 --work /tmp/rt --json docs/results/remote_transfer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DOWNLOADS_DECOMPOSE = ("atlas/", "maps/", "maps_source/", "report.json")  # = core.remote.DOWNLOADS
CHUNK = 4 * 1024 * 1024
# one chunk's request and reply framing (magic + HMAC + msgpack header each way), measured with
# protocol.make_header: an upload chunk 241 B + its reply ~200 B; a fetch ~180 B + its reply 321 B
HEADER_BYTES = 500


def files_under(folder: Path) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out.append((p.relative_to(folder).as_posix(), p))
    return out


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def wire_bytes(sizes: list[int]) -> int:
    return sum(s + max(1, math.ceil(s / CHUNK)) * HEADER_BYTES for s in sizes)


def device_name(device: str) -> str:
    try:
        import torch
        if device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run(cmd: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.monotonic() - t


def write_edit(atlas: Path, dest: Path, box: tuple[int, int, int, int]) -> None:
    """A transparent RGBA PNG the atlas's size with an opaque magenta rectangle."""
    import cv2
    import numpy as np
    a = cv2.imread(str(atlas), cv2.IMREAD_UNCHANGED)
    h, w = a.shape[:2]
    img = np.zeros((h, w, 4), np.uint8)
    t, l, bh, bw = box
    img[t:t + bh, l:l + bw] = (255, 0, 255, 255)  # BGRA
    cv2.imwrite(str(dest), img)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clip", type=Path, help="seed layout folder (video_frames/, masks/<obj>/)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--long-edge", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--per", type=int, default=100, help="scale the numbers to this many frames")
    ap.add_argument("--wire", action="store_true", help="also send the clip through a real local server")
    ap.add_argument("--wire-only", action="store_true", help="only the wire check (no decomposition)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="remote_transfer_"))
    work.mkdir(parents=True, exist_ok=True)
    frames = sorted(p for p in (a.clip / "video_frames").iterdir() if p.is_file())
    mask_dirs = sorted(p for p in (a.clip / "masks").iterdir() if p.is_dir()) if (a.clip / "masks").is_dir() else []
    masks = [p for d in mask_dirs for p in sorted(d.iterdir()) if p.is_file()]
    n = len(frames)
    scale = a.per / n
    seen: set[str] = set()
    up_files = []
    for p in frames + masks:
        h = sha(p)
        if h not in seen:
            seen.add(h)
            up_files.append(p.stat().st_size)
    if a.wire_only:
        res = {"device": device_name("cpu"), "clip": str(a.clip), "frames": n,
               "up": {"frames_bytes": sum(p.stat().st_size for p in frames),
                      "masks_bytes": sum(p.stat().st_size for p in masks),
                      "decompose_wire_bytes": wire_bytes(up_files)}}
        res["wire"] = wire_check(a.clip, frames, masks, mask_dirs, work, res)
        return report(res, a.json)
    py = sys.executable
    out = work / "decomposition"
    cmd = [py, "-m", "backend", "decompose", str(a.clip), "--out", str(out), "--preset", a.preset,
           "--device", a.device, "--quiet", "--masks", *map(str, mask_dirs)]
    if a.iterations:
        cmd += ["--iterations", str(a.iterations)]
    if a.long_edge:
        cmd += ["--long-edge", str(a.long_edge)]
    t_dec = run(cmd)
    down_dec = [(r, p.stat().st_size) for r, p in files_under(out) if r.startswith(DOWNLOADS_DECOMPOSE)]
    by_prefix: dict[str, int] = {}
    for r, s in down_dec:
        key = r.split("/")[0] + ("/" if "/" in r else "")
        by_prefix[key] = by_prefix.get(key, 0) + s
    atlas0 = out / "atlas" / "layer_0.png"
    edits = work / "edits"
    edits.mkdir(exist_ok=True)
    e0, e0b = edits / "layer_0.png", edits / "layer_0_stroke.png"
    write_edit(atlas0, e0, (40, 40, 120, 160))
    write_edit(atlas0, e0b, (40, 40, 124, 160))  # a few more rows: a small stroke
    t_ren = run([py, "-m", "backend", "edit", str(out), "--layer", f"0={e0}", "--out", str(work / "render"),
                 "--format", "png", "--resolution", "source", "--device", a.device, "--quiet"])
    down_ren = [p.stat().st_size for _r, p in files_under(work / "render")]
    atlases = sorted(p.stat().st_size for _r, p in files_under(out / "atlas") if _r.endswith(".png"))
    res = {
        "device": device_name(a.device), "clip": str(a.clip), "frames": n, "per": a.per,
        "source_size": json.loads((out / "report.json").read_text())["clip"].get("source_size"),
        "preset": a.preset, "iterations": a.iterations, "decompose_s": round(t_dec, 1),
        "render_s": round(t_ren, 1),
        "up": {"frames_bytes": sum(p.stat().st_size for p in frames), "masks_bytes": sum(p.stat().st_size for p in masks),
               "masks_unique_bytes": sum(up_files) - sum(p.stat().st_size for p in frames),
               "decompose_wire_bytes": wire_bytes(up_files),
               "edit_image_bytes": e0.stat().st_size, "rerender_edit_bytes": e0b.stat().st_size},
        "down": {"decompose_by_prefix": by_prefix, "decompose_wire_bytes": wire_bytes([s for _r, s in down_dec]),
                 "atlas_png_bytes": atlases, "render_frames_bytes": sum(down_ren),
                 "render_wire_bytes": wire_bytes(down_ren)},
    }
    res["per_frames"] = {k: int(v * scale) for k, v in (
        ("up_decompose", res["up"]["decompose_wire_bytes"]), ("down_maps", by_prefix.get("maps/", 0)),
        ("down_decompose", res["down"]["decompose_wire_bytes"] - sum(atlases)),
        ("down_render", res["down"]["render_wire_bytes"]))}
    res["per_frames"]["down_decompose"] += sum(atlases)  # atlases do not grow with frames
    res["per_frames"]["up_rerender"] = res["up"]["rerender_edit_bytes"]
    if a.wire:
        res["wire"] = wire_check(a.clip, frames, masks, mask_dirs, work, res)
    return report(res, a.json)


def report(res: dict, json_path: Path | None) -> int:
    """Print the result as JSON and write it to ``json_path`` when given; exit status 0."""
    text = json.dumps(res, indent=1)
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    return 0


def wire_check(clip: Path, frames, masks, mask_dirs, work: Path, res: dict) -> dict:
    """Send frames + masks through a real server on loopback; compare with a file copy."""
    from backend.service import keys as keymod
    from neural_atlas.core import remote as R
    from neural_atlas.core.client import Client, CurveKeys
    ws, keys = work / "server_ws", work / "keys"
    shutil.rmtree(ws, ignore_errors=True)  # an empty blob store: everything is sent
    keymod.init(keys)
    issued = keymod.add_client(keys, "bench")
    curve = CurveKeys.from_files(keys / "server.key", issued["client_secret"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "backend.service", "serve", "--endpoint", "tcp://127.0.0.1:*",
                             "--workspace", str(ws), "--keys", str(keys), "--no-device-probe", "--curve",
                             "--log-level", "WARNING"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (ws / "server.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        ep = json.loads((ws / "server.json").read_text())["endpoint"]
        with Client(ep, keys_dir=keys, curve=curve, timeout=30) as c:
            t = time.monotonic()
            prog = R.Progress()
            R.upload(c, [str(clip / "video_frames"), *map(str, mask_dirs)], prog)
            t_up = time.monotonic() - t
            again = R.Progress()
            R.upload(c, [str(clip / "video_frames"), *map(str, mask_dirs)], again)
        t = time.monotonic()
        dst = work / "copy"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(clip, dst)
        t_copy = time.monotonic() - t
    finally:
        proc.terminate()
        proc.wait(10)
    payload = res["up"]["decompose_wire_bytes"]
    return {"curve": True, "sent_bytes": prog.sent_bytes, "files_unique_bytes": payload, "upload_s": round(t_up, 2),
            "copy_s": round(t_copy, 2), "upload_vs_copy": round(t_up / max(t_copy, 1e-9), 2),
            "upload_MB_s": round(prog.sent_bytes / t_up / 1e6, 1), "second_upload_sent_bytes": again.sent_bytes}


if __name__ == "__main__":
    sys.exit(main())
