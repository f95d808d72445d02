"""Run am's table: the prefill cells of both shapes on 0eb3dc6 (the prefill tiles of the grouped path with
the paired gate/up kernel; call 4 of run am), the decode cells from run ak (2664618, whose decode paths the
change does not touch: calls 2 and 3 of run ak). Each converted row against the dense model it alternated
with in its own run, and that run's ceilings; printed with cmoe.bench's table and target count.

    PYTHONPATH=src python docs/benchmarks/raw/h200-2026-12-01-am/table.py
"""
import json
import os

from cmoe import bench

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ["call4/pre/speed.json", "../h200-2026-12-01-ak/call2/dec-l2/speed.json", "../h200-2026-12-01-ak/call3/dec-l3/speed.json"]


def rows_of(path: str) -> list[bench.Row]:
    """One run's rows, their ratios filled against that run's dense rows and ceilings."""
    data = json.load(open(os.path.join(HERE, path)))
    rows = [bench.Row(**dict(r, cost=bench.Cost(**r["cost"]), ffn=r["ffn"] and bench.Cost(**r["ffn"]), ratio=None, limit=None))
            for r in data["rows"]]
    bench.fill_ratios(rows, data["ceilings"])
    return rows


rows = [r for path in RUNS for r in rows_of(path)]
order = {c: i for i, c in enumerate(["dense", *bench.CONFIGS])}
rows.sort(key=lambda r: (r.model, order[r.config], r.kind != "prefill", r.batch, r.seq))
print(bench.table(rows, None))
n, misses = bench.target_misses(rows)
print(f"\n{n - len(misses)} of {n} MoE cells meet every target")
print("\n".join(misses))
