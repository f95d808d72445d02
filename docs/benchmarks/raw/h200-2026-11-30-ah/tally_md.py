"""Count the MoE cells of bench_speed.py's printed table (stdout) that meet every target of issue 3:
at least 0.995x dense (decode: from tokens/s; prefill: the printed ratio), 85 % of the roofline limit
(90 % for decode at batch 1); list the others.

    python tally_md.py speed-l2.txt
"""
import re, sys
n = ok = 0; miss = []; dense = {}
for line in open(sys.argv[1]):
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    if len(c) != 8 or not c[0].startswith("llama"):
        continue
    model, config, cell, speed, ratio, _, _, share = c
    tok = re.match(r"([\d.]+) tok/s", speed)
    if config == "dense":
        dense[cell] = float(tok.group(1)) if tok else None
        continue
    n += 1
    r = float(tok.group(1)) / dense[cell] if tok else float(ratio.rstrip("x"))
    need = 90 if cell == "decode b=1" else 85
    if r >= 0.995 and float(share.rstrip(" %")) >= need: ok += 1
    else: miss.append(f"{model} {config} {cell}: {r:.4f}x {share}")
print(f"{ok} of {n}"); print("\n".join(miss))
