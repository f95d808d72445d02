"""Session 38: bench_speed.py --profile with the kernel timeline of the profiled forwards analysed: union of the
kernels' intervals (GPU busy as wall time), overlap between streams (sum - union), idle time (span - union) per
forward, and the largest idle gaps with the kernels on either side. CG_MODE set: the CUTLASS grouped_mm path
(cg_speed.py's settings), else the default path. The timeline is written to $OUT/trace-<label>.json."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
import cmoe.bench as cb  # noqa: E402

if os.environ.get("CG_MODE"):
    import cgpatch  # noqa: E402
    import cmoe.triton_experts as te  # noqa: E402

    te.GROUPED_MM_MIN_ROWS = 128
    cgpatch.MODE = os.environ["CG_MODE"]
    cgpatch.FOLD = os.environ.get("CG_FOLD") == "1"

_orig = cb.profile_kernels


def profile_kernels(run, n, log, label, top=40):
    from torch.profiler import ProfilerActivity, profile

    _orig(run, n, log, label, top)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run()
            torch.cuda.synchronize()
    ks = sorted(((e.time_range.start, e.time_range.end, e.name[:70]) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    # split into forwards at idle gaps over 200 us (the host sync between replays)
    runs, cur = [], [ks[0]]
    for k in ks[1:]:
        if k[0] - max(c[1] for c in cur) > 200:
            runs.append(cur)
            cur = []
        cur.append(k)
    runs.append(cur)
    fwd = runs[-1]
    t0 = fwd[0][0]
    total = sum(e - s for s, e, _ in fwd)
    union, gaps, end = 0.0, [], fwd[0][0]
    prev = None
    for s, e, name in fwd:
        if s > end:
            gaps.append((s - end, prev, name, s - t0))
            union += e - s
            end = e
        elif e > end:
            union += e - end
            end = e
        if e >= end:
            prev = name
    span = fwd[-1][1] - t0 if False else max(e for _, e, _ in fwd) - t0
    log(f"  timeline {label}: {len(runs)} forwards, the last: {len(fwd)} kernels, span {span:.1f} us, union {union:.1f}, "
        f"sum {total:.1f} (overlap {total - union:.1f}), idle {span - union:.1f} in {len(gaps)} gaps")
    for g, a, b, at in sorted(gaps, key=lambda x: -x[0])[:25]:
        log(f"    gap {g:6.1f} us at {at:7.1f}: after {a} -> before {b}")
    # each kernel name: its time, and the part of it overlapped by other kernels
    ov = {}
    for i, (s, e, name) in enumerate(fwd):
        o = 0.0
        for j, (s2, e2, _) in enumerate(fwd):
            if j != i:
                o = max(o, 0.0)  # noqa
        # overlapped length = length of [s,e] covered by the union of the others
        cov, cend = 0.0, s
        for s2, e2, _ in sorted((k for j, k in enumerate(fwd) if j != i and k[1] > s and k[0] < e), key=lambda k: k[0]):
            a, b = max(s2, cend), min(e2, e)
            if b > a:
                cov += b - a
                cend = b
        t = ov.setdefault(name, [0.0, 0.0, 0])
        t[0] += e - s
        t[1] += cov
        t[2] += 1
    for name, (t, c, cnt) in sorted(ov.items(), key=lambda kv: -kv[1][0])[:14]:
        log(f"    {t:8.1f} us {cnt:3d}x, overlapped {c:7.1f} us  {name}")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"trace-{label.split()[0]}-{'cutlass' if os.environ.get('CG_MODE') else 'default'}.json"), "w") as f:
        json.dump([(s - t0, e - t0, name) for s, e, name in fwd], f)


cb.profile_kernels = profile_kernels
sys.exit(cb.main(sys.argv[1:]))
