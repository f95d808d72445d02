"""Run ai's table: the prefill rows of calls 4 and 5 (prefill timed as bench_speed.py now times it,
the mean of a block after settling, ``block_time``) and the decode rows of calls 2 and 3 (the same
decode timing as now), each part with its own run's ceilings; printed with cmoe.bench's table and
target count.

    PYTHONPATH=src python docs/benchmarks/raw/h200-2026-11-30-ai/stitch.py
"""
import json
import os

from cmoe import bench

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = [  # (file, which rows)
    ("call4/prefill-l2/speed.json", "prefill"), ("call2/speed-l2/speed.json", "decode"),
    ("call5/prefill-l3/speed.json", "prefill"), ("call3/speed-l3/speed.json", "decode"),
]


def rows_of(path: str, kind: str) -> list[bench.Row]:
    data = json.load(open(os.path.join(HERE, path)))
    rows = []
    for r in data["rows"]:
        if r["kind"] != kind:
            continue
        r = dict(r, cost=bench.Cost(**r["cost"]), ffn=r["ffn"] and bench.Cost(**r["ffn"]), ratio=None, limit=None)
        rows.append(bench.Row(**r))
    bench.fill_ratios(rows, data["ceilings"])  # each part against its own run's ceilings
    return rows


rows = [r for path, kind in PARTS for r in rows_of(path, kind)]
order = {c: i for i, c in enumerate(["dense", *bench.CONFIGS])}
rows.sort(key=lambda r: (r.model, order[r.config]))  # stable: prefill before decode within a config
print(bench.table(rows, None))
n, misses = bench.target_misses(rows)
print(f"\n{n - len(misses)} of {n} MoE cells meet every target")
print("\n".join(misses))
