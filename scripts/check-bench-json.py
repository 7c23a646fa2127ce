"""Checks hive-bench's JSON: every scenario is there, each with a figure beside its ceiling.

The figures themselves are never asserted; that each is printed with its ceiling is."""
import json
import sys

SCENARIOS = ("ingest", "reads", "dispatch", "provisioning", "waiting", "reconcile")

with open(sys.argv[1], encoding="utf-8") as f:
    figures = json.load(f)
missing = [
    s for s in SCENARIOS
    if not any(f["scenario"] == s and f["ceiling"] is not None for f in figures)
]
if missing:
    sys.exit(f"{sys.argv[1]}: no figure beside a ceiling for {', '.join(missing)}")
