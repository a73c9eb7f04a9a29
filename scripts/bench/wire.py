#!/usr/bin/env python
"""Wire benchmark: status round-trip latency and a 50 MB upload on loopback.

Starts a real server (``python -m backend.service serve``) in a temporary
workspace, then measures with the client library:

* ``ping`` and ``status`` round trips (blocking ``Client.call``), N times;
* the throughput of uploading a random file (default 50 MB) in signed 4 MiB chunks,
  with 4 chunks in flight, including the server's write and SHA-256 check.

    .venv/bin/python scripts/bench/wire.py [--n 2000] [--mb 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from neural_atlas.core.client import Client  # noqa: E402


def start_server(ws: Path, keys: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "backend.service", "serve", "--endpoint",
                             "tcp://127.0.0.1:*", "--workspace", str(ws), "--keys", str(keys),
                             "--no-device-probe", "--log-level", "WARNING"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if json.loads((ws / "server.json").read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("server did not start")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def timed_calls(c: Client, kind: str, body: dict, n: int) -> dict:
    for _ in range(50):  # warm-up
        c.call(kind, body)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        c.call(kind, body)
        ts.append((time.perf_counter() - t) * 1e3)
    return {"n": n, "p50_ms": round(statistics.median(ts), 3), "p95_ms": round(pct(ts, 0.95), 3),
            "p99_ms": round(pct(ts, 0.99), 3), "mean_ms": round(statistics.fmean(ts), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="round trips per message kind")
    ap.add_argument("--mb", type=int, default=50, help="upload size in MB")
    ap.add_argument("--repeat", type=int, default=3, help="uploads (the best and median are reported)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ws, keys = tmp / "ws", tmp / "keys"
        proc = start_server(ws, keys)
        try:
            c = Client(json.loads((ws / "server.json").read_text())["endpoint"], keys_dir=keys,
                       timeout=10, retries=0)
            c.hello()
            clip = ws / "clip"
            clip.mkdir()
            (clip / "00000.png").write_bytes(b"x")
            # a real job record to ask about (cancelled at once; no engine time is measured)
            job = c.submit(clip, preset="demo")
            c.cancel(job)
            c.wait(job, timeout=120)
            res = {"ping": timed_calls(c, "ping", {}, args.n),
                   "status": timed_calls(c, "status", {"job_id": job}, args.n)}
            data = tmp / "upload.bin"
            data.write_bytes(os.urandom(args.mb * 1_000_000))
            secs = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                c.upload(data)
                secs.append(time.perf_counter() - t)
            res["upload"] = {"bytes": args.mb * 1_000_000, "best_s": round(min(secs), 3),
                             "median_s": round(statistics.median(secs), 3),
                             "best_MB_per_s": round(args.mb / min(secs), 1),
                             "median_MB_per_s": round(args.mb / statistics.median(secs), 1)}
            res["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "platform": platform.platform(), "load_avg": os.getloadavg()}
            c.shutdown()
            c.close()
        finally:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(res, indent=1))
    print("\n| measure | value |\n|---|---|")
    for k in ("ping", "status"):
        r = res[k]
        print(f"| `{k}` round trip (n={r['n']}) | p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, "
              f"p99 {r['p99_ms']} ms |")
    u = res["upload"]
    print(f"| upload {args.mb} MB (4 MiB chunks, 4 in flight) | best {u['best_s']} s "
          f"({u['best_MB_per_s']} MB/s), median {u['median_s']} s ({u['median_MB_per_s']} MB/s) |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
