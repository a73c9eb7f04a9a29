"""`decompose` says up front what it will run (preset, iterations, device) and roughly how long,
naming the faster preset when the run is long for its device; one line, never a prompt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from backend.cli import build_parser, run_notice
from backend.config import preset

ROOT = Path(__file__).resolve().parents[2]


def test_default_preset_on_cpu_names_the_cpu_preset_and_how_to_bound_it():
    line = run_notice(preset("seed").replace(train={"device": "cpu"}), "seed", preset_given=False)
    assert line.startswith("[plan] preset seed (the default") and "\n" not in line
    assert "50,000 iterations" in line and "on cpu" in line and "roughly" in line and " h " in line
    assert "--preset cpu" in line and "--budget" in line


def test_default_preset_on_gpu_names_fast_and_a_chosen_quick_run_says_nothing():
    line = run_notice(preset("seed").replace(train={"device": "cuda"}), "seed", preset_given=False)
    assert "on cuda" in line and "--preset fast" in line
    assert run_notice(preset("demo").replace(train={"device": "cpu"}), "demo", preset_given=True) is None
    assert run_notice(preset("fast").replace(train={"device": "cuda"}), "fast", preset_given=True) is None
    # chosen explicitly but long for the device: still said, with the faster preset
    long = run_notice(preset("seed").replace(train={"device": "cpu"}), "seed", preset_given=True)
    assert long and "50,000 iterations" in long and "--preset cpu" in long
    # a schedule derived from the shot says so (its length is known once the clip is loaded)
    derived = run_notice(preset("quality").replace(train={"device": "cuda", "budget_s": 300.0}), "quality", False)
    assert "iterations from the shot's size (150 samples/pixel" in derived and "budget of 5 min" in derived
    # --iterations is what runs
    few = run_notice(preset("seed").replace(train={"device": "cpu", "iterations": 10}), "seed", False)
    assert "10 iterations" in few


def test_preset_default_is_still_seed_for_decompose_and_demo_for_demo():
    ap = build_parser()
    from backend.cli import _config
    assert _config(ap.parse_args(["decompose", "c", "--out", "o"])).train.iterations == 50_000
    assert _config(ap.parse_args(["demo", "--out", "o"])).preset == "demo"
    assert _config(ap.parse_args(["decompose", "c", "--out", "o", "--preset", "fast"])).preset == "fast"


def test_decompose_prints_the_plan_before_anything_else(tmp_path):
    # a missing clip: the plan line comes first, then the clear error (exit 2), nothing trained
    r = subprocess.run([sys.executable, "-m", "backend", "decompose", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("[plan] preset seed (the default") and "--preset cpu" in lines[0]
    assert lines[-1].startswith("error: ")
    q = subprocess.run([sys.executable, "-m", "backend", "decompose", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o"), "--device", "cpu", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert "[plan]" not in q.stderr
