"""The fused MLP kernels' default launch shapes fit a Hopper GPU's shared memory (227 KB per block),
checked without a GPU: scripts/bench/kernel_facts.py compiles them ahead of time for sm_90 with
the installed Triton (its own process: the interpreter tests set TRITON_INTERPRET in this one).
The H200 refused the first shape (320 KB) at launch, which no interpreter test could see."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_default_launch_shapes_fit_sm90_shared_memory():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NEURAL_ATLAS_FUSED_OPTIONS")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "kernel_facts.py"), "--check",
                        "--networks", "texture"], capture_output=True, text=True, env=env, timeout=600)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, r.stderr[-2000:]
    assert {row["kernel"] for row in rows} == {"fwd", "bwd"}
    for row in rows:
        assert row["fits"] and 0 < row["shared"] <= 232_448, row
