"""Run aj's table: the prefill rows of run ai's calls 4 and 5 (the prefill paths did not change
since), the decode rows of run aj's calls 1 and 2 (decode timed as bench_speed.py now times it,
``cmoe.generation.time_decode``), and, for S2A2E8 at b=256, the rows of call 4, the first run with
that cell on the grouped kernels (DENSE_MAX_WORK 384). Each part against its own run's ceilings and
each converted row against the dense model it alternated with; printed with cmoe.bench's table and
target count.

    PYTHONPATH=src python docs/benchmarks/raw/h200-2026-12-01-aj/stitch.py
"""
import json
import os

from cmoe import bench

HERE = os.path.dirname(os.path.abspath(__file__))
AI = os.path.join(HERE, "..", "h200-2026-11-30-ai")
REPLACED = ("S2A2E8", "decode", 256)  # (config, kind, batch) whose rows call 4 gives
PARTS = [  # (file, keep this row?)
    (os.path.join(AI, "call4/prefill-l2/speed.json"), lambda r: r["kind"] == "prefill"),
    (os.path.join(AI, "call5/prefill-l3/speed.json"), lambda r: r["kind"] == "prefill"),
    (os.path.join(HERE, "call1/dec-l2/speed.json"), lambda r: (r["config"], r["kind"], r["batch"]) != REPLACED),
    (os.path.join(HERE, "call2/dec-l3/speed.json"), lambda r: (r["config"], r["kind"], r["batch"]) != REPLACED),
    (os.path.join(HERE, "call4/s2a2e8/speed.json"), lambda r: (r["config"], r["kind"], r["batch"]) == REPLACED),
]


def rows_of(path: str, keep) -> list[bench.Row]:
    """The rows ``keep`` takes from one run's JSON, their ratios filled against that run's dense
    rows and ceilings."""
    data = json.load(open(path))
    rows = []
    for r in data["rows"]:
        r = dict(r, cost=bench.Cost(**r["cost"]), ffn=r["ffn"] and bench.Cost(**r["ffn"]), ratio=None, limit=None)
        rows.append(bench.Row(**r))
    bench.fill_ratios(rows, data["ceilings"])
    kept = {id(r) for r, raw in zip(rows, data["rows"]) if keep(raw)}
    return [r for r in rows if id(r) in kept]


rows = [r for path, keep in PARTS for r in rows_of(path, keep)]
order = {c: i for i, c in enumerate(["dense", *bench.CONFIGS])}
rows.sort(key=lambda r: (r.model, order[r.config], r.kind != "prefill", r.batch))
print(bench.table(rows, None))
n, misses = bench.target_misses(rows)
print(f"\n{n - len(misses)} of {n} MoE cells meet every target")
print("\n".join(misses))
