"""SmolLM2-135M-Instruct perplexity, dense vs CMoE configurations, on held-out wiki, c4, ptb.

    python benchmarks/ppl_table.py                       # S3A3E8 S2A2E8 S1A1E8 S2A2E16, fp32, CPU
    python benchmarks/ppl_table.py --configs S3A3E8 --sources wiki,c4

Protocol (the core issue's): calibration = 8 x 2048 tokens drawn from the first 60 % of the
wiki sample's documents; evaluation = the first 8 non-overlapping 2048-token windows of each
source's held-out split (wiki: the remaining 40 % of documents; ptb: the test split).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _tokens import add_args, get_tokens

import cmoe
from cmoe import evaluate

# the core issue's reference numbers for the paper's algorithm (same protocol, other calibration draws)
REFERENCE = {("dense", "wiki"): 19.64, ("S3A3E8", "wiki"): 41.69, ("S2A2E8", "wiki"): 164.8,
             ("dense", "c4"): 35.87, ("S3A3E8", "c4"): 87.17, ("S2A2E8", "c4"): 442.2}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="S3A3E8,S2A2E8,S1A1E8,S2A2E16")
    p.add_argument("--recipe", default="paper", help="conversion recipe (default: the paper's algorithm)")
    add_args(p)
    args = p.parse_args(argv)

    sources = args.sources.split(",")
    calib, windows = get_tokens(args)
    ids = calib["calib"]
    dense, _ = cmoe.load_model(args.model, dtype="float32", device=args.device)
    rows = [("dense", 0.0, {s: evaluate.perplexity(dense, w, desc=f"dense {s}") for s, w in windows.items()})]
    for name in args.configs.split(","):
        model = copy.deepcopy(dense)
        cfg = cmoe.CMoEConfig.parse(name, calib_samples=args.samples, calib_seqlen=args.seqlen, recipe=args.recipe)
        t0 = time.perf_counter()
        cmoe.convert_(model, cfg, ids, device=args.device)
        seconds = time.perf_counter() - t0
        rows.append((name, seconds, {s: evaluate.perplexity(model, w, desc=f"{name} {s}") for s, w in windows.items()}))
        del model

    head = " | ".join(f"{s} | {s} (issue ref)" for s in sources)
    print(f"\n| model | active FFN | convert s | {head} |")
    print("|---" * (3 + 2 * len(sources)) + "|")
    for name, seconds, ppl in rows:
        frac = "100 %" if name == "dense" else f"{cmoe.CMoEConfig.parse(name).active_fraction:.1%}"
        cells = " | ".join(f"{ppl[s]:.2f} | {REFERENCE.get((name, s), '-')}" for s in sources)
        print(f"| {name} | {frac} | {seconds:.1f} | {cells} |")
    print(f"\ndevice: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
