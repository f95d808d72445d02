"""Count the MoE cells of bench_speed.py's speed.json files that meet every target of issue 3: at least
0.995x dense, 85 % of the roofline limit (90 % for decode at batch 1); list the others.

    python tally.py call2/speed-l2/speed.json call3/speed-l3/speed.json
"""
import json, sys
def tally(files):
    n = ok = 0; miss = []
    for f in files:
        for r in json.load(open(f))["rows"]:
            if r["config"] == "dense": continue
            n += 1
            share = r["ratio"] / r["limit"]
            need = 0.90 if (r["kind"] == "decode" and r["batch"] == 1) else 0.85
            cell = f'{r["model"]} {r["config"]} {r["kind"]} b={r["batch"]}' + (f'x{r["seq"]}' if r["kind"]=="prefill" else "")
            if r["ratio"] >= 0.995 and share >= need: ok += 1
            else: miss.append(f"{cell}: {r['ratio']:.4f}x {100*share:.1f} %")
    print(f"{ok} of {n}"); print("\n".join(miss))
tally(sys.argv[1:])
