"""End-to-end decompositions of one clip with several presets or budgets, in one run on one device.

Usage:
  python3 scripts/bench/preset_runs.py --clip data/tennis --json OUT.json \
      --run "fast:--preset fast --device cuda" --run "quality:--preset quality --budget 5m --device cuda"

Each ``--run NAME:ARGS`` is one ``python -m backend decompose CLIP --out WORK/NAME ARGS`` in a fresh
process (its wall time includes the interpreter start and imports). The first run is the baseline:
the table gives every run's PSNR difference and wall-time ratio against it. Per run: PSNR with and
without the residual (the export's full-frame mean), the phases' seconds, the schedule the run
chose (``report.json["schedule"]``), host and GPU memory during training, and the load average
around it (this project's CPU machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KEEP = ("psnr", "psnr_no_residual", "iterations", "seconds", "pretrain_seconds", "export_seconds", "flow_seconds",
        "total_seconds", "iterations_per_second", "device", "atlas_size", "peak_gpu_memory_gb", "training_memory",
        "schedule", "history")


def run_one(name: str, args: str, clip: str, work: Path, logs: Path) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "backend", "decompose", clip, "--out", str(out), *shlex.split(args)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    row = {"name": name, "args": args, "rc": rc, "wall_s": round(wall, 2),
           "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    rep = out / "report.json"
    if rc == 0 and rep.exists():
        r = json.loads(rep.read_text(encoding="utf-8"))
        row.update({k: r[k] for k in KEEP if k in r})
        row["clip"] = {k: r["clip"][k] for k in ("width", "height", "frames")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", required=True)
    ap.add_argument("--run", action="append", required=True, metavar="NAME:ARGS")
    ap.add_argument("--work", type=Path, help="output folders (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path, help="write the rows here (logs beside it)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="preset_runs_"))
    logs = args.json.parent if args.json else work
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.run:
        name, _, extra = spec.partition(":")
        row = run_one(name, extra, args.clip, work, logs)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"clip": args.clip, "runs": rows}, indent=1), encoding="utf-8")
    base = rows[0]
    print(f"\n{'run':<14} {'PSNR':>7} {'atlas':>7} {'dPSNR':>6} {'wall':>7} {'x base':>6} {'iters':>7} "
          f"{'step ms':>8} {'train':>6} {'export':>6}  schedule")
    for r in rows:
        if "psnr" not in r:
            print(f"{r['name']:<14} failed rc={r['rc']}")
            continue
        s = r.get("schedule") or {}
        d = r["psnr"] - base["psnr"] if "psnr" in base else float("nan")
        print(f"{r['name']:<14} {r['psnr']:7.2f} {r['psnr_no_residual']:7.2f} {d:+6.2f} {r['wall_s']:7.1f} "
              f"{r['wall_s'] / base['wall_s']:6.2f} {r['iterations']:7d} {s.get('step_ms') or 0:8.2f} "
              f"{r['seconds']:6.1f} {r['export_seconds']:6.1f}  {s.get('capped_by', '')}")
    print(f"device: {rows[-1].get('device')}; load average after: {rows[-1]['loadavg_after']}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
