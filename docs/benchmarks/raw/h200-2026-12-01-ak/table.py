"""Run ak's table: every cell on the same code (2664618, the decode steps' kernels launched with
programmatic dependent launch), from three runs of bench_speed.py, one per device call: the decode
cells of llama2-7b (call 2) and of llama3-8b (call 3), the prefill cells of both (call 4). Each
converted row against the dense model it alternated with in its own run, and that run's ceilings;
printed with cmoe.bench's table and target count.

    PYTHONPATH=src python docs/benchmarks/raw/h200-2026-12-01-ak/table.py
"""
import json
import os

from cmoe import bench

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ["call4/pre/speed.json", "call2/dec-l2/speed.json", "call3/dec-l3/speed.json"]


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
