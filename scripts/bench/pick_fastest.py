#!/usr/bin/env python3
"""Print the variant with the shortest CUDA-graph step from a step_profile.py JSON (for chaining runs).

    python scripts/bench/pick_fastest.py STEP_PROFILE.json [--default fast]
"""

import argparse
import json
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("json")
ap.add_argument("--default", default="fast")
args = ap.parse_args()
try:
    rows = [r for r in json.load(open(args.json))["rows"] if "graph_step_ms" in r]
except (OSError, ValueError, KeyError):
    rows = []
print(min(rows, key=lambda r: r["graph_step_ms"])["variant"] if rows else args.default)
sys.exit(0)
