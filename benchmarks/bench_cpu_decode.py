"""Greedy decode at batch 1 on the CPU: converted SmolLM2 vs dense, measured in one run.

    python benchmarks/bench_cpu_decode.py [--config S1A1E8 ...] [--new-tokens 64] [--compile]

Loads the built-in SmolLM2-135M-Instruct (float32), times greedy decode steps with
``cmoe.generation.time_generation`` (static KV cache; ``--compile`` compiles the decode step
with inductor), converts it with ``cmoe.convert_`` (wiki calibration) and times it again.
Prints tokens/s of each, the ratio, and the weight memory of both.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

import torch

from cmoe.bench import shape_arg


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--configs", nargs="+", default=["S1A1E8", "S2A2E8", "S3A3E8"])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (median)")
    p.add_argument("--rounds", type=int, default=3, help="dense/MoE alternations per config (median ratio)")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-shape", type=shape_arg, default="8x512", help="calibration windows NxS")
    p.add_argument("--compile", action="store_true", help="compile the decode step (inductor, CPU)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cmoe import CMoEConfig, convert_, load_model
    from cmoe.data import calibration_tokens
    from cmoe.generation import time_generation

    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}")
    print(f"# command: python benchmarks/bench_cpu_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    dense, tok = load_model(args.model, dtype=torch.float32, device="cpu")
    dense.requires_grad_(False)
    dense.generation_config.eos_token_id = None

    def tps(model):
        t = time_generation(model, 1, args.prompt, args.new_tokens, compile=args.compile, repeats=args.repeats)
        return t.decode_tokens_per_s

    n, s = args.calib_shape
    calib = calibration_tokens(tok, args.calib, n, s)
    rows = []
    base = tps(dense)
    rows.append(("dense", base, 1.0, weight_bytes(dense)))
    print(f"dense: {base:.1f} tok/s, weights {weight_bytes(dense) / 2**20:.1f} MiB", flush=True)
    for name in args.configs:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        cfg = CMoEConfig.parse(name, calib_samples=n, calib_seqlen=s, allocation="uniform")  # every layer SsAaEe
        convert_(model, cfg, calib, device="cpu", progress=False)
        model.requires_grad_(False)
        conv_s = time.perf_counter() - t0
        ratios, moes = [], []
        for _ in range(args.rounds):  # alternate, so load drift hits both
            base = tps(dense)
            moe = tps(model)
            ratios.append(moe / base)
            moes.append(moe)
            print(f"  {name}: {moe:.1f} tok/s vs dense {base:.1f} -> {moe / base:.2f}x", flush=True)
        ratio = sorted(ratios)[len(ratios) // 2]
        moe = sorted(moes)[len(moes) // 2]
        rows.append((name, moe, ratio, weight_bytes(model)))
        print(f"{name}: median {ratio:.2f}x over {args.rounds} rounds (converted in {conv_s:.0f} s); "
              f"weights {weight_bytes(model) / 2**20:.1f} MiB", flush=True)
        del model
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f})")
    print("\n| model | tok/s (batch 1, greedy) | vs dense (median of rounds) | weights |\n| --- | --- | --- | --- |")
    for name, t, r, b in rows:
        print(f"| {name} | {t:.1f} | {r:.2f}x | {b / 2**20:.1f} MiB ({b / rows[0][3]:.4f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
