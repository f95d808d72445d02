"""Issue 5's ablation: each change to the paper's training-free conversion alone, and the best
combination, at 75 / 50 / 37.5 / 25 % activated FFN neurons; perplexity on held-out wiki, c4
and ptb-test (same windows for every row) and conversion time. Prints a markdown table.

    python benchmarks/ablation.py                                   # everything, CPU (slow)
    python benchmarks/ablation.py --save-tokens tokens.safetensors  # tokenise once, here
    python benchmarks/ablation.py --model SmolLM2-135M-Instruct.Q4_1.gguf --tokens tokens.safetensors --device cuda
    python benchmarks/ablation.py --fractions 0.5 --variants "paper,plus (default)" --windows 2   # a quick subset

Protocol: the core issue's (ppl_table.py): calibration 8 x 2048 wiki tokens (seed 0) unless a
variant says otherwise; the first --windows 2048-token windows of each held-out split.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _tokens import add_args, calib_key, get_tokens

import cmoe
from cmoe import evaluate

# activated fraction -> the uniform S{s}A{a}E{e} of the paper at that fraction
FRACTIONS = {0.75: "S3A3E8", 0.5: "S2A2E8", 0.375: "S3A3E16", 0.25: "S1A1E8"}
MIX = ("wiki+c4+code", 16)  # calibration variant: mixture, twice the tokens
WIKI_C4 = ("wiki+c4", 8)  # calibration variant: mixture, same number of tokens
# name -> (CMoEConfig overrides, calibration (source, samples) or None for the default)
VARIANTS = {
    "paper": (dict(recipe="paper"), None),
    "+ k-means to convergence": (dict(recipe="paper", kmeans_iters=0), None),
    "+ linear router (ridge)": (dict(recipe="paper", router="linear"), None),
    "+ contrib partition": (dict(recipe="paper", features="contrib", kmeans_iters=0), None),
    "+ down refit": (dict(recipe="paper", refit="down"), None),
    "+ down refit toward the dense stream": (dict(recipe="paper", refit="down", refit_stream=0.5), None),
    "+ sensitivity allocation": (dict(recipe="paper", allocation="sensitivity"), None),
    "+ calib wiki+c4": (dict(recipe="paper"), WIKI_C4),
    "+ calib wiki+c4+code x2": (dict(recipe="paper"), MIX),
    "plus uniform no refit": (dict(recipe="plus", allocation="uniform", refit="none"), None),
    "plus uniform": (dict(recipe="plus", allocation="uniform"), None),
    "plus (refit to the FFN output)": (dict(recipe="plus", refit_stream=0.0), None),
    "plus (default)": (dict(recipe="plus"), None),
    "plus + calib wiki+c4": (dict(recipe="plus"), WIKI_C4),
    "plus + calib wiki+c4+code x2": (dict(recipe="plus"), MIX),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="0.75,0.5,0.375,0.25")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    add_args(p)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    fractions = [float(f) for f in args.fractions.split(",")]
    extra = sorted({VARIANTS[v][1] for v in variants if VARIANTS[v][1]})
    calib, windows = get_tokens(args, extra)
    sources = list(windows)

    dense, _ = cmoe.load_model(args.model, dtype="float32", device=args.device)
    base = {s: evaluate.perplexity(dense, w, desc=f"dense {s}") for s, w in windows.items()}
    rows = []
    for frac in fractions:
        preset = FRACTIONS[frac]
        for name in variants:
            kw, cal = VARIANTS[name]
            source, samples = cal or (args.calib, args.samples)
            ids = calib[calib_key(source, samples, args)]
            cfg = cmoe.CMoEConfig.parse(preset, calib_samples=samples, calib_seqlen=args.seqlen, **kw)
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = cmoe.convert_(model, cfg, ids, device=args.device, progress=False)
            seconds = time.perf_counter() - t0
            ppl = {s: evaluate.perplexity(model, w, desc=f"{preset} {name} {s}") for s, w in windows.items()}
            agree = sum(r.stats.router_agreement for r in report.layers) / len(report.layers)
            dense_layers = sum(r.stats.top_k == 0 and r.stats.num_experts == 0 for r in report.layers)
            rows.append((frac, preset, name, seconds, agree, dense_layers, ppl))
            print(f"{frac:.3f} {preset} {name}: " + ", ".join(f"{s} {v:.2f}" for s, v in ppl.items())
                  + f", {seconds:.1f} s", flush=True)
            del model

    print("\n| active FFN | config | variant | " + " | ".join(sources) + " | gap cut " + " / ".join(sources)
          + " | router/oracle top-a | dense layers | convert s |")
    print("|---" * (7 + len(sources)) + "|")
    print("| 100 % | dense | - | " + " | ".join(f"{base[s]:.2f}" for s in sources) + " | - | - | - | - |")
    paper = {r[0]: r[6] for r in rows if r[2] == "paper"}
    for frac, preset, name, seconds, agree, dense_layers, ppl in rows:
        cut = "-"
        if frac in paper and name != "paper":
            cut = " / ".join(f"{100 * (1 - (ppl[s] - base[s]) / (paper[frac][s] - base[s])):.0f}" for s in sources) + " %"
        print(f"| {frac:.1%} | {preset} | {name} | " + " | ".join(f"{ppl[s]:.2f}" for s in sources)
              + f" | {cut} | {agree:.3f} | {dense_layers} | {seconds:.1f} |")
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"\ndevice: {dev}, torch {torch.__version__}; {args.windows} x {args.seqlen}-token windows per source; "
          f"gap cut = 1 - (PPL - dense) / (paper PPL - dense), per source")


if __name__ == "__main__":
    main()
